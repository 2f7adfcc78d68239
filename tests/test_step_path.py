"""The training step path: no host synchronisation of ours between logging steps (a GPU would stall there),
and the DataLoader worker default that fits the machine."""

from __future__ import annotations

import sys

import pytest
import torch

from qwen_cls.data import auto_num_workers
from qwen_cls.train import run_lightning_cli
from tests.helpers import REPO, STEP, base_config, write_config

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.slow
def test_no_host_read_in_our_code_between_logging_steps(tiny_model, demo_data, tmp_path, monkeypatch):
    """Every read of a tensor's value into Python made by qwen_cls code (the module, callbacks, monitor) during
    training happens on a logging step or a save step: a counting hook on the Tensor methods that read."""
    ours = str(REPO / "qwen_cls")
    reads: list[tuple[int, str, str]] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(ours) and STEP["current"]:
                reads.append((STEP["current"], _name, f"{caller.co_filename}:{caller.co_name}"))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    config = base_config(tiny_model, demo_data, tmp_path / "run")
    config["training"].update(max_steps=12, logging_steps=5, save_steps=10)
    config["trainer"]["callbacks"] = [{"class_path": "tests.helpers.StepClock"}]
    run_lightning_cli(["fit", "--config", str(write_config(tmp_path / "c.yaml", config))])
    assert reads, "the hook saw nothing: it would not catch a read either"
    assert {step for step, _, _ in reads} <= {5, 10, 12}, sorted(set(reads))


@pytest.mark.parametrize(
    ("cpus", "processes", "cuda", "workers"),
    [
        (2, 1, False, 0),  # a 2-core CPU run: the compute threads need both cores
        (4, 1, False, 3),
        (16, 8, True, 1),  # 8 GPUs on 16 cores
        (96, 8, True, 8),  # at most 8 per process
        (64, 1, True, 8),
        (8, 8, True, 0),
    ],
)
def test_auto_num_workers_fits_the_machine(cpus, processes, cuda, workers):
    assert auto_num_workers(cpus, processes, cuda) == workers
