#!/usr/bin/env bash
# Installs what the launch tests' one-node Slurm cluster needs (Debian's slurm-wlm and munge), where missing.
# Needs root and apt; otherwise says what is missing and leaves it (the tests then skip, or fail in CI).
set -uo pipefail
missing=()
for program in munged mungekey slurmctld slurmd sbatch scontrol; do
    command -v "$program" > /dev/null || missing+=("$program")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get > /dev/null; then
    echo "slurm-env: ${missing[*]} missing; as root: apt-get install slurm-wlm munge (the Slurm tests skip without them)"
    exit 0
fi
echo "slurm-env: installing slurm-wlm and munge (${missing[*]} missing)"
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge > /dev/null
