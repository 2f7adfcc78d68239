"""Launching as cluster users do: the project's own Slurm script on a real one-node Slurm, stopped by its time
limit and by preemption, requeueing itself until the run's last step; and torchrun across two "nodes". Both have
the weights of the same run launched by Lightning's own launcher, uninterrupted, at a checkpoint after their stops."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwen_cls.run_dir import is_complete, list_checkpoints
from tests import slurm_cluster
from tests.helpers import REPO, base_config, child_env, write_config

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STEPS, EVERY = 2000, 100
TORCHRUN_STEP = 3 * EVERY  # the torchrun test compares there


def launch_config(tiny_model: Path, demo_data: Path, output_dir: Path) -> dict:
    """2 processes of DDP on CPU (the launchers set how they are placed), 2000 steps (~3.3 minutes here, ~100 s on a
    machine twice as fast: more than the first allocation of the Slurm test can train), a checkpoint every 100."""
    config = base_config(tiny_model, demo_data, output_dir)
    config["data"].update(batch_size=8, num_workers=0)
    config["training"].update(epochs=20, max_steps=STEPS, save_steps=EVERY, logging_steps=50)
    config["trainer"].update(accelerator="cpu", devices=2, strategy="ddp")
    config["monitor"] = {"plots": False}
    return config


def weights_at(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / f"checkpoint-{step}" / "hf_model" / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, f"largest difference {worst}"


def train_until(commands: list[list[str]], run: Path, step: int, logs: list[Path], env: dict) -> None:
    """Start the commands (each process in a session of its own, its output in its log), wait until
    ``checkpoint-<step>`` of ``run`` is complete, then stop them with SIGTERM (SIGKILL if one hangs)."""
    outputs = [log.open("w") for log in logs]
    processes = [
        subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        for command, out in zip(commands, outputs, strict=True)
    ]
    try:
        deadline = time.monotonic() + 900
        while not is_complete(run / f"checkpoint-{step}"):
            ended = any(p.poll() is not None for p in processes)
            assert not ended and time.monotonic() < deadline, logs[0].read_text()[-3000:]
            time.sleep(1)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for out in outputs:
            out.close()


class Reference:
    """The run launched by Lightning (trainer.devices: 2), uninterrupted, of the same 2000-step schedule, trained
    only as far as the tests compare (the Slurm test's comparison point depends on where its job was stopped):
    ``weights(step)`` trains it there the first time it is asked, and reuses it for any step it has reached."""

    def __init__(self, tiny_model: Path, demo_data: Path, folder: Path):
        self.config = write_config(folder / "c.yaml", launch_config(tiny_model, demo_data, folder / "run"))
        self.folder, self.run = folder, folder / "run"

    def weights(self, step: int, train_to: int | None = None) -> dict[str, torch.Tensor]:
        if not is_complete(self.run / f"checkpoint-{step}"):
            assert not self.run.exists(), f"the reference stopped before checkpoint-{step}: ask for it first"
            command = [sys.executable, "-m", "qwen_cls", "fit", "--config", str(self.config)]
            train_until([command], self.run, train_to or step, [self.folder / "fit.log"], child_env())
        return weights_at(self.run, step)


@pytest.fixture(scope="module")
def reference(tiny_model, demo_data, tmp_path_factory) -> Reference:
    return Reference(tiny_model, demo_data, tmp_path_factory.mktemp("launch"))


def start_requeued_soon(slurm, job: str, state: dict, pending_since: float | None) -> float | None:
    """Cut Slurm's requeue delay (2 minutes before a requeued job may start) to ~10 s, as an administrator could
    (sooner, Slurm refused the start: "Job credential revoked"): returns since when the job has been waiting."""
    waiting = state.get("JobState") == "PENDING" and state.get("Reason") == "BeginTime"
    pending_since = (pending_since or time.monotonic()) if waiting else None
    if waiting and time.monotonic() - pending_since > 10:  # not sooner: the last allocation is still ending
        slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    return pending_since


def wait_for_the_end(slurm, job: str, log: Path, seconds: float) -> tuple[dict, str]:
    """Wait until the job has ended, its requeues started soon; its last state and its log."""
    deadline, pending_since = time.monotonic() + seconds, None
    while (state := slurm.job(job)).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
        text = log.read_text() if log.exists() else ""
        assert time.monotonic() < deadline, (
            f"job {job}: {state.get('JobState')} ({state.get('Reason')}), {state.get('Restarts')} restarts;"
            f" the node: {slurm.run('sinfo', '-h', '-N', '-o', '%T %E', check=False).stdout.strip()}\n{text[-3000:]}"
        )
        pending_since = start_requeued_soon(slurm, job, state, pending_since)
        time.sleep(1)
    return state, log.read_text()


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
    slurm, reference, tiny_model, demo_data, tmp_path
):
    """`sbatch scripts/slurm_train.sbatch` as the README gives it, for 2 CPU tasks and a 3-minute limit with
    the SIGTERM 90 s before it (Slurm sends it up to ~60 s early: a 2-minute limit could signal during
    start-up): stopped by the time limit, requeued by itself, resumed; stopped again by
    `scancel --signal=TERM` (what preemption sends), requeued, resumed; finished. The weights are the
    uninterrupted run's at the first periodic checkpoint after the second resume (the reference is trained that far
    and no further), every checkpoint is complete, and the log says each stop, requeue and start in a line.
    Slurm's requeue delay is cut to ~10 s (`start_requeued_soon`); and with the preemption the job's time limit
    is raised to 20 minutes, so the third allocation trains to the end whatever this machine's speed (at 3 minutes a slow machine needed 12 allocations, ~40 minutes)."""
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
        pending_since = start_requeued_soon(slurm, job, state, pending_since)
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
            slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=20")  # for the allocation after it
            preempted = True
        time.sleep(1)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED", text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("[qwen-cls slurm]")]
    said = [re.sub(r"^\[qwen-cls slurm\] \S+ job \d+: ", "", line) for line in lines]
    stops = [s for s in said if s.startswith("stopped by SIGTERM")]
    assert stops, f"the first allocation trained all {STEPS} steps before its time limit: raise STEPS"
    assert len(stops) == 2 and all("; requeued (" in s for s in stops), said
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
    after = (int(re.search(r"checkpoint-(\d+)", stops[-1]).group(1)) // EVERY + 1) * EVERY
    assert_same_weights(weights_at(run, after), reference.weights(after, train_to=max(after, TORCHRUN_STEP)))


def test_one_tasks_own_error_is_said_and_not_requeued(slurm, tiny_model, demo_data, tmp_path):
    """Rank 1 alone meets an error (its node has no copy of the model folder) while rank 0 goes on and waits for
    it in a collective: srun ends rank 0 with SIGTERM, so srun exits 143 as on a stop, and rank 0 never says an
    error. The job log must still name the error (rank 1 says it) and the job must fail, not requeue: requeued,
    it would fail the same way up to MAX_REQUEUES times (a slow CI machine once showed this: rank 1, silent then,
    exited before rank 0 had said the error both met)."""
    config = launch_config(tiny_model, demo_data, tmp_path / "run")
    path = write_config(tmp_path / "c.yaml", config)
    python = tmp_path / "python"  # the srun tasks' interpreter: rank 1's node lacks the model folder
    python.write_text(
        "#!/bin/bash\n"
        'if [ -n "${SLURM_STEP_ID:-}" ] && [ "$SLURM_PROCID" = 1 ]; then\n'
        f'    exec {sys.executable} "$@" --model.pretrained_name {tmp_path / "not-on-this-node"}\n'
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    log = tmp_path / "job.log"
    job = slurm.run(
        "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
        "--time=5", "--signal=TERM@60", f"--output={log}", f"--chdir={REPO}",
        f"--export=ALL,CONFIG={path},PYTHON={python}", str(REPO / "scripts" / "slurm_train.sbatch"),
    ).stdout.strip().split(";")[0]  # fmt: skip
    state, text = wait_for_the_end(slurm, job, log, seconds=300)
    said = [line for line in text.splitlines() if line.startswith("[qwen-cls slurm]")]
    assert state["JobState"] == "FAILED" and state["Restarts"] == "0", text[-3000:]
    assert re.search(r"failed \(exit 143\) at no checkpoint: not requeued", said[-1]), said
    assert re.search(r"^srun: error: .*: task 1: Exited with exit code 2$", text, re.M), text[-3000:]
    error = f"qwen-cls: error: rank 1: model.pretrained_name: {tmp_path / 'not-on-this-node'} is not a folder here"
    assert error in text.splitlines(), text[-3000:]


def test_a_signal_lead_the_time_limit_cannot_hold_is_not_requeued_again_and_again(
    slurm, tiny_model, demo_data, tmp_path
):
    """The script's own lead (TERM@600) with a 1-minute limit: Slurm signals each allocation at once, during
    start-up (a wrapper interpreter stands for a model that takes minutes to load), so nothing is ever saved.
    The first such stop is requeued (a preemption during start-up looks the same), the second is not, and the
    log says why: before, the job requeued itself MAX_REQUEUES (100) times."""
    python = tmp_path / "python"
    python.write_text(
        "#!/bin/bash\n"
        'if [ -n "${SLURM_STEP_ID:-}" ]; then sleep 600; fi\n'  # the tasks' start-up, longer than the limit
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    config = write_config(tmp_path / "c.yaml", launch_config(tiny_model, demo_data, tmp_path / "run"))
    log = tmp_path / "job.log"
    job = slurm.run(
        "sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
        "--time=1", f"--output={log}", f"--chdir={REPO}", f"--export=ALL,CONFIG={config},PYTHON={python}",
        str(REPO / "scripts" / "slurm_train.sbatch"),
    ).stdout.strip().split(";")[0]  # fmt: skip
    state, text = wait_for_the_end(slurm, job, log, seconds=300)
    said = [re.sub(r"^\[qwen-cls slurm\] \S+ job \d+: ", "", line) for line in text.splitlines()]
    stops = [line for line in said if line.startswith("stopped by SIGTERM")]
    assert state["JobState"] == "FAILED" and state["Restarts"] == "1", text[-3000:]
    assert len(stops) == 2 and all(
        "at no checkpoint" in s and "nothing saved in this allocation" in s for s in stops
    )
    assert stops[0].endswith("requeued (1 of at most 100)")
    assert "not requeued: the allocation before it stopped before saving too" in stops[1]
    assert "shorten the lead or lengthen --time" in stops[1]


def test_torchrun_across_two_nodes_gives_the_lightning_launchers_weights(
    reference, tiny_model, demo_data, tmp_path
):
    """The README's torchrun line, one process on each of two "nodes" (two torchrun agents on this machine,
    meeting over c10d on 127.0.0.1), up to its third checkpoint: the same weights there as the run Lightning
    launched (the schedule is the 2000-step one in both). Then the agents are stopped with SIGTERM."""
    run, step = tmp_path / "run", TORCHRUN_STEP
    config = write_config(tmp_path / "c.yaml", launch_config(tiny_model, demo_data, run))
    port = slurm_cluster._free_port()
    agents = [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
        + ["--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"]
        + ["--rdzv_id", "qwen-cls-test", "-m", "qwen_cls", "fit", "--config", str(config)]
        + ["--trainer.devices", "1", "--trainer.num_nodes", "2"]
        for rank in (0, 1)
    ]
    # one thread per process, as Lightning's launcher sets for 2 processes on 2 cores (torchrun sets it only for
    # several processes per node): two threads each oversubscribed the cores ~4x
    logs = [tmp_path / f"agent{rank}.log" for rank in (0, 1)]
    train_until(agents, run, step, logs, {**child_env(), "OMP_NUM_THREADS": "1"})
    assert_same_weights(weights_at(run, step), reference.weights(step))
