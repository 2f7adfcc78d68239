"""FLOPs of the classifier's forward pass, counted from its config and the real inputs, and the devices'
peaks they are divided by for MFU. Pure functions of torch tensors (no host reads): the monitor calls them
every step."""

from __future__ import annotations

import platform

import torch

from qwen_cls.lora import is_lora_param

# Dense bf16 peak per device in TFLOP/s (vendor datasheets, no sparsity); the first matching name wins
PEAK_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("gh200", 989.0),
    ("h200", 989.0),
    ("h100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("h800", 989.0),
    ("h20", 148.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.0),
    ("l40", 181.0),
    ("l4", 121.0),
    ("a10g", 70.0),
    ("a10", 125.0),
    ("rtx 4090", 165.0),
)


def device_peak_flops(device: torch.device, peak_tflops: float | None = None) -> tuple[float | None, str]:
    """The device's dense peak in FLOP/s and where the number came from; ``None`` where no peak is known."""
    if peak_tflops:
        return peak_tflops * 1e12, "monitor.peak_tflops"
    if device.type != "cuda":
        return None, f"no peak known for {device.type}; set monitor.peak_tflops"
    name = torch.cuda.get_device_name(device)
    peak = peak_for_name(name)
    return peak, f"{name}, dense bf16" if peak else f"no peak known for {name}; set monitor.peak_tflops"


def describe_device(device: torch.device) -> str:
    """``cuda: NVIDIA H100 80GB HBM3`` or ``cpu: x86_64, 2 threads``: what a report says the run ran on."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"{device.type}: {platform.machine()}, {torch.get_num_threads()} threads"


def peak_for_name(name: str) -> float | None:
    """Dense bf16 FLOP/s of a GPU from its CUDA device name, or ``None`` when the table lacks it."""
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key in name.lower()), None)


def _window_squares(n: torch.Tensor, window: int) -> torch.Tensor:
    """Sum of squared window lengths when ``n`` positions are cut into windows of ``window`` (last partial)."""
    return (n // window) * window**2 + (n % window) ** 2


def vision_flops(vc, grid_thw: torch.Tensor) -> torch.Tensor:
    """Forward FLOPs of the Qwen2.5-VL vision tower on images with (t, h, w) patch grids: patch embedding,
    per-patch projections and MLPs, windowed attention (full attention in ``fullatt_block_indexes``), merger."""
    h, m = vc.hidden_size, vc.spatial_merge_size
    t, gh, gw = grid_thw.to(torch.float64).unbind(-1)
    patches = (t * gh * gw).sum()
    patch_in = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    linear = 2 * patches * (patch_in * h + vc.depth * (4 * h * h + 3 * h * vc.intermediate_size))
    merged_h = h * m * m
    merger = 2 * (patches / m**2) * (merged_h * merged_h + merged_h * vc.out_hidden_size)
    window = vc.window_size // m // vc.patch_size  # in merged tokens
    window_sq = (t * m**4 * _window_squares(gh / m, window) * _window_squares(gw / m, window)).sum()
    full_sq = (t * (gh * gw) ** 2).sum()  # full attention runs per frame
    full_layers = len(vc.fullatt_block_indexes)
    attention = 4 * h * ((vc.depth - full_layers) * window_sq + full_layers * full_sq)
    return linear + merger + attention


def text_flops(tc, seq_lens: torch.Tensor) -> torch.Tensor:
    """Forward FLOPs of the language model on sequences of the given real lengths (no LM head)."""
    h, layers = tc.hidden_size, tc.num_hidden_layers
    kv = tc.num_key_value_heads * (h // tc.num_attention_heads)
    lens = seq_lens.to(torch.float64)
    per_token = 2 * layers * (2 * h * h + 2 * h * kv + 3 * h * tc.intermediate_size)
    return per_token * lens.sum() + 4 * layers * h * (lens**2).sum()


def forward_flops(config, seq_lens: torch.Tensor, grid_thw: torch.Tensor | None) -> torch.Tensor:
    """Forward FLOPs of the classifier on sequences as they really are: their images' patch grids, their
    real lengths (visual + text tokens, no padding), the pooled head. A tensor on the inputs' device, so
    counting never waits for the accelerator."""
    text, vision = forward_flops_by_part(config, seq_lens, grid_thw)
    return text + vision


def forward_flops_by_part(config, seq_lens: torch.Tensor, grid_thw: torch.Tensor | None):
    """(language model with the head, vision tower) forward FLOPs: see :func:`forward_flops`."""
    hidden = config.text_config.hidden_size
    text = text_flops(config.text_config, seq_lens) + 2 * seq_lens.numel() * hidden * config.num_labels
    vision = (
        vision_flops(config.vision_config, grid_thw) if grid_thw is not None and grid_thw.numel() else 0.0
    )
    return text, vision


def pass_factors(net: torch.nn.Module) -> tuple[int, int]:
    """Training FLOPs per forward FLOP for (the language model with the head, the vision tower).

    Backward has two halves, each costing about one forward: the gradient with respect to activations,
    needed through a part whenever a trained weight lies in it or before it (the vision tower feeds the
    language model), and the gradient with respect to weights, only for weights that train. So a full
    fine-tune counts 3 x forward everywhere; a frozen vision tower 1 x for it; LoRA 2 x for the parts it
    adapts (its own rank-r matmuls, ~1% of a 7B projection's at r=16, are not counted) and 1 x for a frozen,
    unadapted vision tower."""

    def parts(prefix: str) -> tuple[bool, bool]:
        base = [p for n, p in net.named_parameters() if n.startswith(prefix) and not is_lora_param(n)]
        trained = [p for n, p in net.named_parameters() if n.startswith(prefix) and p.requires_grad]
        return bool(trained), bool(base) and all(p.requires_grad for p in base)

    vision_trains, vision_full = parts("model.visual.")
    text_trains, text_full = parts("model.language_model.")
    text = 1 + (text_trains or vision_trains) + text_full
    vision = 1 + vision_trains + vision_full
    return text, vision
