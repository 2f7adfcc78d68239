"""FLOPs of the classifier's forward pass, counted from its config and the real inputs, and the devices'
peaks they are divided by for MFU. Pure functions of torch tensors (no host reads): the monitor calls them
every step."""

from __future__ import annotations

import platform

import torch

from qwen_cls.families import family_of
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


def vision_flops(vc, grid_thw: torch.Tensor, kind: str = "qwen2_5_vl") -> torch.Tensor:
    """Forward FLOPs of a family's vision tower (``kind``: :attr:`qwen_cls.families.Family.vision`) on images
    with (t, h, w) patch grids: patch embedding, per-patch projections and MLPs, attention, the merger (and
    Qwen3-VL's DeepStack mergers, one per ``deepstack_visual_indexes`` entry). Qwen2.5-VL attends in windows
    (full attention in ``fullatt_block_indexes``) with a gated MLP; Qwen2-VL and Qwen3-VL attend over each
    whole frame with a two-matrix MLP."""
    m = vc.spatial_merge_size
    t, gh, gw = grid_thw.to(torch.float64).unbind(-1)
    patches = (t * gh * gw).sum()
    full_sq = (t * (gh * gw) ** 2).sum()  # full attention runs per frame
    if kind == "qwen2_vl":
        h, mlp, out = vc.embed_dim, 2 * vc.embed_dim * vc.embed_dim * vc.mlp_ratio, vc.hidden_size
    else:
        h, out = vc.hidden_size, vc.out_hidden_size
        mlp = (3 if kind == "qwen2_5_vl" else 2) * h * vc.intermediate_size
    patch_in = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    linear = 2 * patches * (patch_in * h + vc.depth * (4 * h * h + mlp))
    merged_h = h * m * m
    mergers = 1 + len(getattr(vc, "deepstack_visual_indexes", None) or ())
    merger = mergers * 2 * (patches / m**2) * (merged_h * merged_h + merged_h * out)
    if kind != "qwen2_5_vl":
        return linear + merger + 4 * h * vc.depth * full_sq
    window = vc.window_size // m // vc.patch_size  # in merged tokens
    window_sq = (t * m**4 * _window_squares(gh / m, window) * _window_squares(gw / m, window)).sum()
    full_layers = len(vc.fullatt_block_indexes)
    attention = 4 * h * ((vc.depth - full_layers) * window_sq + full_layers * full_sq)
    return linear + merger + attention


DELTA_CHUNK = 64  # transformers' and flash-linear-attention's chunk length for the gated delta rule


def text_flops(tc, seq_lens: torch.Tensor) -> torch.Tensor:
    """Forward FLOPs of the language model on sequences of the given real lengths (no LM head), layer by
    layer: attention projections (Qwen3.5's full-attention query doubled by its output gate), the MLP or, in
    an MoE layer, the router and the ``num_experts_per_tok`` experts each token runs (not all experts), and
    attention's s² terms; Qwen3.5's linear-attention layers instead their projections, the short convolution
    and the chunked gated delta rule (64-token chunks; its two triangular solves, O(chunk²) per column, are
    left out, as torch's FLOP counter leaves them)."""
    h = tc.hidden_size
    head_dim = getattr(tc, "head_dim", None) or h // tc.num_attention_heads
    q, kv = tc.num_attention_heads * head_dim, tc.num_key_value_heads * head_dim
    lens = seq_lens.to(torch.float64)
    tokens, squares = lens.sum(), (lens**2).sum()
    layer_types = getattr(tc, "layer_types", None) or ["full_attention"] * tc.num_hidden_layers
    gate = 2 if "linear_attention" in layer_types else 1  # Qwen3.5's full-attention query carries its gate
    total = torch.zeros((), dtype=torch.float64, device=lens.device)
    for index, layer_type in enumerate(layer_types):
        if layer_type == "linear_attention":
            total = total + _delta_rule_layer(tc, lens)
        else:
            total = total + 2 * tokens * (h * q * gate + 2 * h * kv + q * h) + 4 * q * squares
        total = total + 2 * tokens * _mlp_macs(tc, index)
    return total


def _mlp_macs(tc, index: int) -> float:
    """Multiply-accumulates per token of layer ``index``'s MLP: dense (gate, up, down), or the router and the
    routed experts (plus a shared expert and its gate, Qwen3.5-MoE's)."""
    experts = getattr(tc, "num_experts", 0) or 0
    sparse = (
        experts > 0
        and index not in (getattr(tc, "mlp_only_layers", None) or ())
        and (index + 1) % getattr(tc, "decoder_sparse_step", 1) == 0
    )
    if not sparse:
        return 3 * tc.hidden_size * tc.intermediate_size
    h, shared = tc.hidden_size, getattr(tc, "shared_expert_intermediate_size", 0) or 0
    routed = h * experts + tc.num_experts_per_tok * 3 * h * tc.moe_intermediate_size
    return routed + (3 * h * shared + h if shared else 0)


def _delta_rule_layer(tc, lens: torch.Tensor) -> torch.Tensor:
    """One Gated-DeltaNet layer: in/out projections, the depthwise convolution, and per value head and chunk
    of C: k_beta·kᵀ and q·kᵀ (2C²·dk each), the chunk's attention on the new values (2C²·dv), and the state's
    read, correction and update (3 x 2C·dk·dv). Each sequence's chunks are its own (its last one padded)."""
    h, dk, dv = tc.hidden_size, tc.linear_key_head_dim, tc.linear_value_head_dim
    nk, nv = tc.linear_num_key_heads, tc.linear_num_value_heads
    key_dim, value_dim = nk * dk, nv * dv
    conv_dim = 2 * key_dim + value_dim
    tokens = lens.sum()
    projections = 2 * tokens * (h * conv_dim + h * value_dim + 2 * h * nv + value_dim * h)
    conv = 2 * tokens * conv_dim * tc.linear_conv_kernel_dim
    c = DELTA_CHUNK
    chunks = torch.ceil(lens / c).sum()
    per_chunk = 4 * c * c * dk + 2 * c * c * dv + 6 * c * dk * dv
    return projections + conv + chunks * nv * per_chunk


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
    kind = family_of(config.model_type).vision
    vision = (
        vision_flops(config.vision_config, grid_thw, kind)
        if grid_thw is not None and grid_thw.numel()
        else 0.0
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
