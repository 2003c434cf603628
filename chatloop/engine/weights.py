"""Weight formats for serving: the base model's Linear layers stored lighter than fp32, with LoRA
kept on top.

Owns: ``PackedLinear`` (a weight-only packed ``nn.Linear``) and ``pack_for_serving``, which swaps a
served model's Linear layers for it; ``SERVE_WEIGHTS``, the formats, and ``resolve_serve_weights``.

- ``fp32``: as loaded, nothing packed.
- ``bf16``: each Linear weight in bf16 (activations cast to bf16 for the matmul only).
- ``int8``: int8 per output channel, symmetric, bf16 scales (torch's ``_weight_int8pack_mm``).
- ``int4``: 4 bits in groups of 32 input columns with a scale and a minimum per group, i.e.
  llama.cpp's Q4_1 layout (torch's ``_weight_int4pack_mm_for_cpu``), for every Linear but the
  output head, which is int8 as above. Packing a Q4_1 GGUF's de-quantized weights recovers its
  4-bit codes exactly (the group minimum and maximum are codes 0 and 15); only the scales and
  minima are rounded to bf16.
- The int8/int4 kernels are matrix-vector kernels (their cost grows with every row) and win
  for decode steps; a prompt's prefill runs a dense copy of the weight instead. That copy is bf16
  on a CPU with native bf16 matrix products (oneDNN's own check; there it is several times faster
  than int4 or fp32 for a prompt) and the fp32 weight itself elsewhere (on an AVX2 CPU bf16
  products are emulated and far slower than fp32; figures in docs/LOG.md), as ``prefill_dtype``
  says for the machine. Streaming either copy costs more than the packed kernels up to about
  16 positions (the fp32 one up to about two dozen), so a forward of up to ``PACKED_MAX_POSITIONS``
  positions per row (a short prompt, a small chunk of a long one) stays on the packed kernels.
  The choice depends only on the positions per row, never on how many rows share the batch, so
  a row's output does not depend on who else is in it.

Invariants:
- Only the serving engine's model is packed; training always loads the full-precision weights.
- A packed layer is still an ``nn.Linear`` (``in_features``/``out_features``, a float ``weight``
  placeholder that carries dtype and device, an unchanged ``bias``), so PEFT wraps it with its
  own LoRA layers and hot-swaps and mixed-version batches work unchanged; LoRA runs in the
  activations' dtype (fp32 on CPU).
- Activations and outputs keep their dtype; only a matmul's input is cast (to bf16 for the
  int8/int4 kernels and a bf16 copy).
- ``fuse``/``unfuse`` hold one version's LoRA factors inside the layer (the single-version fast
  path for packed weights, see ``merged.py``): its output then adds what PEFT's own LoRA
  forward adds, ``lora_B(lora_A(x)) * scaling``, as the same two products (the scaling and
  the addition fused into the second), with no PEFT wrapper in between. Adding the
  delta into packed weights would round most of it away, so it is never folded into them.
- A layer a kernel cannot take (int4: input width not a multiple of 32 or outputs not of 16)
  stays as it is.
- The torch CPU kernels are the chosen library here (torchao's int4/int8 CPU layouts call the
  same ``aten`` ops and would add a dependency); on CUDA ``auto`` keeps the loaded weights.
"""

from __future__ import annotations

import torch
from torch import nn

from chatloop.config import SERVE_WEIGHT_FORMATS as SERVE_WEIGHTS
GROUP = 32  # int4 group size along the input dimension (llama.cpp's Q4_1 block)


def resolve_serve_weights(setting: str, device: torch.device) -> str:
    """The format ``setting`` means on ``device``: ``auto`` is int4 on a CPU, the loaded weights
    (``fp32``, i.e. nothing packed) elsewhere; packed formats need the CPU kernels."""
    if setting not in SERVE_WEIGHTS:
        raise ValueError(f"unknown serve_weights {setting!r}; use one of {', '.join(SERVE_WEIGHTS)}")
    if setting == "auto":
        return "int4" if device.type == "cpu" else "fp32"
    if setting in ("int8", "int4") and device.type != "cpu":
        raise ValueError(f"serve_weights={setting} uses torch's CPU kernels; use auto or bf16 on {device.type}")
    return setting


def _int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.to(torch.bfloat16)


def _int4_grouped(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_1's rule: per group of 32, codes 0..15 with step (max - min) / 15 from the minimum.
    Returns torch's packed weight and its [groups, out, 2] bf16 (scale, zero) where the kernel
    reads w = (code - 8) * scale + zero."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // GROUP, GROUP)
    low = g.amin(dim=-1, keepdim=True)
    step = (g.amax(dim=-1, keepdim=True) - low) / 15
    codes = torch.round((g - low) / step.clamp(min=torch.finfo(torch.float32).tiny)).clamp(0, 15)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).reshape(out_f, in_f), 1)
    scales = torch.cat([step, low + 8 * step], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, scales


def prefill_dtype() -> torch.dtype:
    """The dtype of the dense copy packed layers prefill with: bf16 where oneDNN computes bf16
    matrix products natively (AVX-512 or AMX), else fp32."""
    try:
        fast_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        fast_bf16 = False
    return torch.bfloat16 if fast_bf16 else torch.float32


def int4_fits(layer: nn.Linear) -> bool:
    return layer.in_features % GROUP == 0 and layer.out_features % 16 == 0


PACKED_MAX_POSITIONS = 16  # per row: forwards of more positions per row go through the dense copy
# torch's int4 CPU kernel computes rows in blocks of 4: 5 to 8 rows cost what 8 do (docs/LOG.md
# 2026-12-05, afternoon)
INT4_ROW_BLOCK = 4


def row_block(model: nn.Module) -> int:
    """The block of rows the model's packed kernels compute together: rows up to the end of a
    started block cost next to nothing (1: no such blocks)."""
    return INT4_ROW_BLOCK if any(isinstance(m, PackedLinear) and m.fmt == "int4" for m in model.modules()) else 1


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is stored as ``fmt`` (bf16, int8 or int4), computed in bf16;
    prompts (more than one position per row) go through a dense copy in ``dense_dtype`` (bf16 or
    fp32; default ``prefill_dtype()``; the bf16 format's copy is its weight)."""

    def __init__(self, layer: nn.Linear, fmt: str, dense_dtype: torch.dtype | None = None):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a full weight
        if fmt not in ("bf16", "int8", "int4"):
            raise ValueError(f"cannot pack a Linear as {fmt!r}")
        self.in_features, self.out_features, self.fmt = layer.in_features, layer.out_features, fmt
        w = layer.weight.detach().float()
        # an empty float weight: PEFT reads its dtype and device to place the LoRA layers
        self.weight = nn.Parameter(torch.empty(0, dtype=layer.weight.dtype, device=w.device), requires_grad=False)
        self.bias = layer.bias
        dense_dtype = torch.bfloat16 if fmt == "bf16" else (dense_dtype or prefill_dtype())
        if dense_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"a packed layer's prefill copy is bf16 or fp32, not {dense_dtype}")
        self.register_buffer("dense", w.to(dense_dtype).contiguous())  # fp32: the weight itself, no copy
        # forwards of more positions per row than this go through the dense copy
        self.packed_positions = PACKED_MAX_POSITIONS
        if fmt == "bf16":
            self.register_buffer("packed", None)
            self.register_buffer("scales", None)
        elif fmt == "int8":
            q, s = _int8_per_channel(w)
            self.register_buffer("packed", q)
            self.register_buffer("scales", s)
        else:
            p, s = _int4_grouped(w)
            self.register_buffer("packed", p)
            self.register_buffer("scales", s)
        self._fused: tuple[torch.Tensor, torch.Tensor, float] | None = None  # A^T, B^T, scaling

    prefill_dense = True  # benchmarks switch it off to measure the decode kernels on whole texts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a decode step of a small model is bound by per-operator dispatch as much as by the
        # weights: every tensor operation here is one that the result needs
        rows = x.reshape(-1, self.in_features)
        if self.fmt == "bf16" or (self.prefill_dense and x.dim() >= 3 and x.shape[-2] > self.packed_positions):
            y = rows.to(self.dense.dtype) @ self.dense.t()
        elif self.fmt == "int8":
            y = torch._weight_int8pack_mm(rows.to(torch.bfloat16), self.packed, self.scales)
        else:
            y = torch._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16), self.packed, GROUP, self.scales)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        if self._fused is not None:
            a_t, b_t, scaling = self._fused
            if rows.dtype == a_t.dtype:
                y = torch.addmm(y, rows @ a_t, b_t, alpha=scaling)
            else:
                y = torch.addmm(y.to(a_t.dtype), rows.to(a_t.dtype) @ a_t, b_t, alpha=scaling).to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def fuse(self, lora_a: nn.Linear, lora_b: nn.Linear, scaling: float) -> None:
        """Hold one version's LoRA factors: the forward adds ``scaling * (x A^T) B^T`` in the
        factors' dtype, as two raw matrix products on transposed contiguous copies (PEFT's own
        ``lora_B(lora_A(x)) * scaling`` through two modules costs several times as long: a
        decode step's LoRA products are tiny and their dispatch is most of their cost)."""
        self._fused = (lora_a.weight.detach().t().contiguous(), lora_b.weight.detach().t().contiguous(), scaling)

    def unfuse(self) -> None:
        self._fused = None

    @property
    def fused(self) -> bool:
        return self._fused is not None

    def dequantized(self) -> torch.Tensor:
        """The weight a decode step computes with, as fp32 (for tests and quality checks)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.dense.device)
        saved, self._fused = self._fused, None
        try:
            bias, self.bias = self.bias, None
            return self.forward(eye).float().t().contiguous()
        finally:
            self.bias, self._fused = bias, saved

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def pack_for_serving(model: nn.Module, fmt: str, dense_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Swap ``model``'s Linear layers for ``PackedLinear`` in ``fmt`` (in place, before any LoRA
    is attached), prefilling through a dense copy in ``dense_dtype`` (default ``prefill_dtype()``);
    returns how many layers were packed per format. ``fp32`` packs nothing."""
    if fmt == "fp32":
        return {}
    counts: dict[str, int] = {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            layer_fmt = fmt
            if fmt == "int4" and (child is head or not int4_fits(child)):
                layer_fmt = "int8"  # the output head (Q8_0 in the GGUFs) and odd shapes
            packed = PackedLinear(child, layer_fmt, dense_dtype)
            setattr(module, child_name, packed)
            counts[layer_fmt] = counts.get(layer_fmt, 0) + 1
    return counts
