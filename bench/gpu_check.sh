#!/usr/bin/env bash
# The GPU check, one script, under 8 minutes on one H100/H200 (the `device` tool's machine):
#   1. pytest -m gpu: DeepSpeed ZeRO-2 and ZeRO-3 on CUDA, bf16: fit, hf_model/ logits, export, SIGKILL + resume;
#   2. bench/gpu_throughput.py: the Qwen2.5-VL-3B architecture (random weights), bf16, 448 px: samples/s,
#      TFLOP/s, MFU, peak memory, with/without gradient checkpointing, no-evaluation vs standard mode;
#   3. bench/serve.py: vLLM vs qwen-cls predict on the same images (where the device's Python has a CUDA vllm:
#      none can be carried, 64 MiB; otherwise said and skipped).
# The device has torch, transformers, lightning, torchmetrics, safetensors, rich, but no deepspeed, jsonargparse,
# wandb, mlxtend or accelerate and no network: build their wheels here first and carry .whl/ along:
#   .venv/bin/pip wheel --no-deps -w .whl deepspeed jsonargparse docstring-parser typeshed-client mlxtend accelerate wandb
# Results: $OUT (default bench/results) holds gpu_pytest.txt and gpu_throughput.json; both are printed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
PY=${PY:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-deps .whl/*.whl
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
WANDB_MODE=offline timeout 300 $PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -25 | tee "$OUT/gpu_pytest.txt"
timeout 330 $PY bench/gpu_throughput.py --out "$OUT/gpu_throughput.json" > "$OUT/gpu_throughput.log" 2>&1
status=$?
tail -5 "$OUT/gpu_throughput.log"
cat "$OUT/gpu_throughput.json" 2>/dev/null
if $PY -c "import vllm" 2>/dev/null; then
    timeout 240 $PY bench/serve.py --vllm_python "$(command -v $PY)" --dtype bfloat16 --out "$OUT/serve.json" 2>&1 | tail -12
else
    echo "bench/serve.py: skipped, no vllm on this device"
fi
exit $status
