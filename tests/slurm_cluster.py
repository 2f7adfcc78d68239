"""A one-node Slurm cluster for the launch tests: munged, slurmctld and slurmd from Debian's ``slurm-wlm`` and
``munge`` packages, configured under a temporary folder (its own munge key and socket, its own ports), started as
root and stopped afterwards. ``.ci/run`` installs the packages; elsewhere the tests skip without them."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

NEEDED = (
    "munged",
    "mungekey",
    "slurmctld",
    "slurmd",
    "sbatch",
    "scontrol",
    "squeue",
    "scancel",
    "sinfo",
    "runuser",
)


def missing() -> list[str]:
    """What this machine lacks to start the cluster: programs, or root (the daemons run as root here)."""
    lacking = [name for name in NEEDED if shutil.which(name) is None]
    return lacking + ([] if os.geteuid() == 0 else ["root"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a mapping (JobState, Reason, Restarts, ...); empty once Slurm forgot it."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout.split()
        return dict(item.split("=", 1) for item in out if "=" in item)


def start(root: Path, cpus: int = 2) -> SlurmCluster:
    """Write the configuration, start the three daemons and wait until the node is idle."""
    host = socket.gethostname()
    munge = root / "munge"
    for folder in ("state", "spool", "log", "munge"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    munge.chmod(0o755)  # munged needs its socket's folder open to all
    subprocess.run(["mungekey", "-c", "-f", "-k", str(munge / "munge.key")], check=True, capture_output=True)
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=qwencls",
                f"SlurmctldHost={host}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "SlurmUser=root",
                "JobRequeue=1",
                "MpiDefault=none",
                "ReturnToService=2",
                "AuthType=auth/munge",
                f"AuthInfo=socket={munge / 'munge.socket'}",
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={root / 'spool'}",
                f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'slurmd.pid'}",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                f"NodeName={host} CPUs={cpus} State=UNKNOWN",
                f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(
        # as root (--force): the munge user could not reach a folder under pytest's root-only temporary folder
        ["munged", "--force", f"--key-file={munge / 'munge.key'}"]
        + [f"--socket={munge / 'munge.socket'}", f"--pid-file={munge / 'munged.pid'}"]
        + [f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'seed'}"],
        check=True,
        capture_output=True,
    )
    for daemon in ("slurmctld", "slurmd"):
        subprocess.run([daemon], env=env, check=True, capture_output=True)
    cluster = SlurmCluster(root, env)
    deadline = time.monotonic() + 60
    while "idle" not in cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout:
        if time.monotonic() > deadline:
            stop(cluster)
            raise RuntimeError(
                f"the Slurm node did not come up: {(root / 'log' / 'slurmctld.log').read_text()[-2000:]}"
            )
        time.sleep(0.5)
    return cluster


def stop(cluster: SlurmCluster) -> None:
    """Cancel what is left and let it end, stop the daemons (slurmd, slurmctld, munged: by their pid files), then
    end whatever the cluster started that outlived them: without this, a job still ending when munged stopped
    left its slurmd, its batch step and the script's shell running on this machine after the tests."""
    cluster.run("scancel", "--full", "-u", "root", check=False)
    deadline = time.monotonic() + 30
    while cluster.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
        try:
            pid = int((cluster.root / pid_file).read_text())
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            continue
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    for pid in _started_by(cluster):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _started_by(cluster: SlurmCluster) -> list[int]:
    """The processes that carry this cluster's SLURM_CONF: its daemons, their job steps, the jobs' scripts."""
    mark = f"SLURM_CONF={cluster.env['SLURM_CONF']}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if mark in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                pass
    return found
