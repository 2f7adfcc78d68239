"""Launching as cluster users do: the project's own Slurm script on a real one-node Slurm, stopped by its time
limit and by preemption, requeueing itself until the run's last step; and torchrun across two "nodes". Both end
with the weights of the same run launched by Lightning's own launcher, uninterrupted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwen_cls.run_dir import list_checkpoints
from tests import slurm_cluster
from tests.helpers import REPO, base_config, child_env, write_config

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STEPS, EVERY = 3000, 100


def launch_config(tiny_model: Path, demo_data: Path, output_dir: Path) -> dict:
    """2 processes of DDP on CPU (the launchers set how they are placed), 3000 steps (~2 minutes here, more than
    an allocation of the Slurm test trains), a checkpoint every 100."""
    config = base_config(tiny_model, demo_data, output_dir)
    config["data"].update(batch_size=8, num_workers=0)
    config["training"].update(epochs=20, max_steps=STEPS, save_steps=EVERY, logging_steps=50)
    config["trainer"].update(accelerator="cpu", devices=2, strategy="ddp")
    config["monitor"] = {"plots": False}
    return config


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / f"checkpoint-{STEPS}" / "hf_model" / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, f"largest difference {worst}"


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, demo_data, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The run launched by Lightning (trainer.devices: 2), from start to end."""
    tmp = tmp_path_factory.mktemp("launch")
    config = write_config(tmp / "c.yaml", launch_config(tiny_model, demo_data, tmp / "run"))
    out = subprocess.run(
        [sys.executable, "-m", "qwen_cls", "fit", "--config", str(config)],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return final_weights(tmp / "run")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    lacking = slurm_cluster.missing()
    if lacking:
        if os.environ.get("CI"):
            pytest.fail(f"Slurm: {', '.join(lacking)} missing; .ci/run installs slurm-wlm and munge")
        pytest.skip(f"Slurm: {', '.join(lacking)} missing (apt-get install slurm-wlm munge, as root)")
    cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    slurm_cluster.stop(cluster)


def test_the_slurm_script_requeues_itself_at_the_time_limit_and_on_preemption(
    slurm, uninterrupted, tiny_model, demo_data, tmp_path
):
    """`sbatch scripts/slurm_train.sbatch` as the README gives it, for 2 CPU tasks and a 3-minute limit with
    the SIGTERM 90 s before it (Slurm sends it up to ~30 s early: a 2-minute limit could signal during
    start-up): stopped by the time limit, requeued by itself, resumed; stopped again by
    `scancel --signal=TERM` (what preemption sends), requeued, resumed; finished. The final weights are the
    uninterrupted run's, every checkpoint is complete, and the log says each stop, requeue and start in a line.
    Slurm's requeue delay (2 minutes before a requeued job may start) is cut to ~10 s with `scontrol update
    StartTime=now`, as an administrator could (sooner, Slurm refused the start: "Job credential revoked");
    nothing else is done to the job."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", launch_config(tiny_model, demo_data, run))
    log = tmp_path / "job.log"
    submitted = slurm.run(
        "sbatch",
        "--parsable",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=3",
        "--signal=TERM@90",
        f"--output={log}",
        f"--chdir={REPO}",
        f"--export=ALL,CONFIG={config},PYTHON={sys.executable}",
        str(REPO / "scripts" / "slurm_train.sbatch"),
    )
    job = submitted.stdout.strip().split(";")[0]
    preempted, pending_since, deadline = False, None, time.monotonic() + 1200
    while True:
        state = slurm.job(job)
        if state.get("JobState") in (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
        ):
            break
        assert time.monotonic() < deadline, (
            f"job {job} still {state.get('JobState')}:\n{log.read_text()[-3000:]}"
        )
        waiting = state.get("JobState") == "PENDING" and state.get("Reason") == "BeginTime"
        pending_since = (pending_since or time.monotonic()) if waiting else None
        if (
            waiting and time.monotonic() - pending_since > 10
        ):  # not sooner: the last allocation is still ending
            slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        text = log.read_text() if log.exists() else ""
        first_stop = re.search(r"stopped by SIGTERM at checkpoint-(\d+)", text)
        if (
            not preempted
            and state.get("JobState") == "RUNNING"
            and state.get("Restarts") == "1"
            and first_stop
            and any(int(p.name.split("-")[1]) > int(first_stop.group(1)) for p in list_checkpoints(run))
        ):
            slurm.run("scancel", "--signal=TERM", job)  # to the tasks, as a preemption's SIGTERM
            preempted = True
        time.sleep(1)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED", text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("[qwen-cls slurm]")]
    said = [re.sub(r"^\[qwen-cls slurm\] \S+ job \d+: ", "", line) for line in lines]
    stops = [s for s in said if s.startswith("stopped by SIGTERM")]
    assert len(stops) >= 2 and all("; requeued (" in s for s in stops), said
    assert preempted and int(state["Restarts"]) == len(stops)
    starts = [s for s in said if s.startswith("start ")]
    assert len(starts) == len(stops) + 1 and "a new run in" in starts[0]
    for start, stop in zip(
        starts[1:], stops, strict=True
    ):  # each start resumes where the stop before it saved
        saved = re.search(r"checkpoint-\d+", stop).group(0)
        assert start.endswith(f"resuming {run} from {saved}")
    assert said[-1] == f"finished: the run's last checkpoint is checkpoint-{STEPS}"
    assert len(said) == len(starts) + len(stops) + 1  # one line per start, stop and the end, nothing else
    steps = [int(p.name.split("-")[1]) for p in list_checkpoints(run)]
    assert steps[-1] == STEPS and len(steps) == len(list(run.glob("checkpoint-*")))  # all complete
    assert set(range(EVERY, STEPS + 1, EVERY)) <= set(steps)
    assert_same_weights(final_weights(run), uninterrupted)


def test_a_real_error_is_not_requeued(slurm, tiny_model, demo_data, tmp_path):
    config = launch_config(tiny_model, demo_data, tmp_path / "run")
    config["data"]["train_jsonl"] = str(tmp_path / "missing.jsonl")
    path = write_config(tmp_path / "c.yaml", config)
    log = tmp_path / "job.log"
    job = slurm.run(
        "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
        "--time=5", f"--output={log}", f"--chdir={REPO}", f"--export=ALL,CONFIG={path},PYTHON={sys.executable}",
        str(REPO / "scripts" / "slurm_train.sbatch"),
    ).stdout.strip().split(";")[0]  # fmt: skip
    deadline = time.monotonic() + 300
    while slurm.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
        assert time.monotonic() < deadline
        time.sleep(1)
    state = slurm.job(job)
    text = log.read_text()
    said = [line for line in text.splitlines() if line.startswith("[qwen-cls slurm]")]
    assert state["JobState"] == "FAILED", text[-3000:]
    assert re.search(r"failed \(exit \d+\) at no checkpoint: not requeued", said[-1]), said
    # the error itself was not requeued: every requeue (0 here, unless a stray SIGTERM reached the tasks, as Slurm's
    # clean-up of the job before once did) has its "stopped by SIGTERM" line
    assert int(state["Restarts"]) == sum("stopped by SIGTERM" in line for line in said)
    assert "missing.jsonl" in text


def test_torchrun_across_two_nodes_gives_the_lightning_launchers_weights(
    uninterrupted, tiny_model, demo_data, tmp_path
):
    """The README's torchrun line, one process on each of two "nodes" (two torchrun agents on this machine,
    meeting over c10d on 127.0.0.1)."""
    config = write_config(tmp_path / "c.yaml", launch_config(tiny_model, demo_data, tmp_path / "run"))
    port = slurm_cluster._free_port()
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
            + ["--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"]
            + ["--rdzv_id", "qwen-cls-test", "-m", "qwen_cls", "fit", "--config", str(config)]
            + ["--trainer.devices", "1", "--trainer.num_nodes", "2"],
            cwd=REPO,
            # one thread per process, as Lightning's launcher sets for 2 processes on 2 cores (torchrun sets it only
            # for several processes per node): two threads each oversubscribed the cores ~4x
            env={**child_env(), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [agent.communicate(timeout=900)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert_same_weights(final_weights(tmp_path / "run"), uninterrupted)
