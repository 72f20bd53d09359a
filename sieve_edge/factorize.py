"""Module surgery: swap a model's linear matrices for low-rank pairs, in place.

The math lives in `lowrank.py`; this module only moves tensors into modules. A factorized
matrix becomes a `LowRankLinear` (two `nn.Linear`, the bias on the second), so the model
class stays the original one and exporters see plain MatMuls.
"""
from __future__ import annotations

import torch
from torch import nn

from . import architectures as arch
from .lowrank import Decomposition


class LowRankLinear(nn.Module):
    """y = second(first(x)): (…, in) → (…, rank) → (…, out)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: weight (in, out), y = x W + b
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) matrix a linear-like module applies (a product for a LowRankLinear)."""
    if isinstance(module, LowRankLinear):
        return module.second.weight @ module.first.weight
    if isinstance(module, SearchLinear):
        return dense_weight(module.dense)
    if _is_conv1d(module):
        return module.weight.T
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"{type(module).__name__} is not a linear layer sieve-edge can factorize")


def module_bias(module: nn.Module) -> torch.Tensor | None:
    if isinstance(module, LowRankLinear):
        return module.second.bias
    if isinstance(module, SearchLinear):
        return module_bias(module.dense)
    return getattr(module, "bias", None)


def module_shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, (LowRankLinear,)):
        return module.out_features, module.in_features
    if isinstance(module, SearchLinear):
        return module_shape(module.dense)
    w = dense_weight(module)
    return tuple(w.shape)


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every registry matrix, in forward order."""
    return {name: module_shape(arch.get_module(model, name)) for name in arch.linear_names(model)}


def factorized_ranks(model: nn.Module) -> dict[str, int]:
    """Rank of every registry matrix that is currently a LowRankLinear."""
    out = {}
    for name in arch.linear_names(model):
        module = arch.get_module(model, name)
        if isinstance(module, LowRankLinear):
            out[name] = module.rank
    return out


def param_counts(shapes: dict[str, tuple[int, int]], ranks: dict[str, int | None]) -> tuple[int, int]:
    """(dense weight parameters, weight parameters under `ranks`) over the registry matrices."""
    dense = current = 0
    for name, (m, n) in shapes.items():
        r = ranks.get(name)
        dense += m * n
        current += m * n if r is None else r * (m + n)
    return dense, current


def linear_param_reduction(shapes: dict[str, tuple[int, int]], ranks: dict[str, int | None]) -> float:
    dense, current = param_counts(shapes, ranks)
    return 1.0 - current / dense if dense else 0.0


def make_low_rank(module: nn.Module, B: torch.Tensor, A: torch.Tensor) -> LowRankLinear:
    """A LowRankLinear computing B A x (+ the module's bias), in the module's dtype and device."""
    w = dense_weight(module)
    m, n = w.shape
    r = A.shape[0]
    if B.shape != (m, r) or A.shape != (r, n):
        raise ValueError(f"factor shapes {tuple(B.shape)} x {tuple(A.shape)} do not fit a ({m}, {n}) matrix")
    bias = module_bias(module)
    new = LowRankLinear(n, m, r, bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.first.weight.copy_(A.to(w.dtype))
        new.second.weight.copy_(B.to(w.dtype))
        if bias is not None:
            new.second.bias.copy_(bias)
    return new


def factorize_(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """Replace each named matrix by its low-rank pair (B, A), in place."""
    for name, (B, A) in factors.items():
        arch.set_module(model, name, make_low_rank(arch.get_module(model, name), B, A))
    return model


def empty_factorized_(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Swap in LowRankLinear modules of the given ranks with uninitialised weights (for loading)."""
    for name, r in ranks.items():
        module = arch.get_module(model, name)
        w = dense_weight(module)
        m, n = w.shape
        new = LowRankLinear(n, m, int(r), bias=module_bias(module) is not None, device=w.device, dtype=w.dtype)
        arch.set_module(model, name, new)
    return model


class SearchLinear(nn.Module):
    """A matrix whose active rank can change instantly: dense, or any rank of a Decomposition.

    Holds the full factor basis (up to `max_rank`) so that trying a rank is a slice, not a
    refit; used by the genetic search to score hundreds of candidate plans.
    """

    def __init__(self, dense: nn.Module, decomposition: Decomposition, offloadable: bool = False):
        super().__init__()
        self.dense = dense
        w = dense_weight(dense)
        # (k, n) and (k, m): row slices stay contiguous, so x @ A[:r].T @ Bt[:r] needs no copy.
        # Offloadable: persistent buffers (accelerate's offload hooks move only those) and no
        # int8 cache (the codes would keep a quarter of every matrix in memory between calls)
        self.register_buffer("A", decomposition.right.to(device=w.device, dtype=w.dtype).contiguous(),
                             persistent=offloadable)
        self.register_buffer("Bt", decomposition.left.T.to(device=w.device, dtype=w.dtype).contiguous(),
                             persistent=offloadable)
        self.rank: int | None = None
        self.int8 = False          # score as the export's int8 weights will compute (simulate_int8_)
        self.cache_int8 = not offloadable
        self._qcache: dict = {}

    @property
    def max_rank(self) -> int:
        return self.A.shape[0]

    def _quantized(self, what: str, dtype: torch.dtype, rows: int | None = None) -> torch.Tensor:
        # per-output-channel weights that do not depend on the rank: quantized once, kept as
        # int8 codes (a quarter of the float32 memory), dequantized per call; without the cache
        # only the rows asked for are quantized, per call (per row: the same values)
        if not self.cache_int8:
            src = dense_weight(self.dense) if what == "dense" else self.A
            return dequantize_int8(*quantize_int8(src[:rows].detach())).to(dtype)
        if what not in self._qcache:
            src = dense_weight(self.dense) if what == "dense" else self.A
            self._qcache[what] = quantize_int8(src.detach())
        return dequantize_int8(*self._qcache[what]).to(dtype)[:rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = module_bias(self.dense)
        if self.rank is None:
            if not self.int8:
                if not self.cache_int8 and torch.is_grad_enabled() and x.requires_grad and \
                        not any(p.requires_grad for p in self.dense.parameters()):
                    return _ReadBackLinear.apply(x, self)  # offloaded: the graph keeps no weight
                return self.dense(x)
            y = x @ self._quantized("dense", x.dtype).T
            return y if bias is None else y + bias
        r = self.rank
        if self.int8:
            # first (r, in): per output row, as quantized once; second (out, r): its rows span
            # only the first r directions, so their ranges (and scales) depend on r
            if not self.cache_int8:
                second = dequantize_int8(*quantize_int8(self.Bt[:r].T)).to(x.dtype)
            else:
                if self._qcache.get("second_rank") != r:  # a candidate scores many batches at one rank
                    self._qcache["second_rank"], self._qcache["second"] = r, quantize_int8(self.Bt[:r].T)
                second = dequantize_int8(*self._qcache["second"]).to(x.dtype)
            y = (x @ self._quantized("A", x.dtype, r).T) @ second.T
        else:
            y = (x @ self.A[:r].T) @ self.Bt[:r]
        return y if bias is None else y + bias


class _ReadBackLinear(torch.autograd.Function):
    """y = dense(x) for an offloaded SearchLinear whose weights are frozen: the backward reads
    the weight back from disk (``materialized``) instead of autograd keeping every module's
    weight alive until then (the sensitivity's backward would hold the whole model)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return module.dense(x)

    @staticmethod
    def backward(ctx, grad):
        with materialized(ctx.module):
            w = dense_weight(ctx.module.dense)
            return grad @ w.to(grad.dtype), None


def materialized(module: nn.Module):
    """A context in which a module's tensors are in memory outside its forward pass: under
    disk offload (``offload.OffloadedSearch``) accelerate's ``align_module_device`` reads
    them for the duration and drops them after; for any other module it does nothing."""
    from accelerate.utils import align_module_device

    return align_module_device(module)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 asymmetric per-output-channel quantization, as NNCF's ``INT8_ASYM`` weight
    compression stores it (OpenVINO decompresses it before the MatMul): per row,
    scale = (max - min) / 255 and an integer zero point. Returns (codes uint8, scale, zero)."""
    w = w.float()
    lo = w.amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = w.amax(dim=-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / 255.0).clamp(min=torch.finfo(torch.float32).tiny)
    zero = torch.round(-lo / scale).clamp(0, 255)
    q = torch.clamp(torch.round(w / scale) + zero, 0, 255).to(torch.uint8)
    return q, scale, zero


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero) * scale


def fake_quant_int8(w: torch.Tensor) -> torch.Tensor:
    """W after int8 asymmetric per-output-channel quantization and back (float32)."""
    return dequantize_int8(*quantize_int8(w))


def simulate_int8_(model: nn.Module):
    """Make a model carrying SearchLinear modules score as its int8 export will: every
    SearchLinear (dense or any rank) and the input embedding / LM head rows are
    fake-quantized. Returns a function that undoes it (the embedding is restored exactly)."""
    modules = [m for m in model.modules() if isinstance(m, SearchLinear)]
    for m in modules:
        m.int8 = True
    restore, seen = [], set()
    for get in (model.get_input_embeddings, model.get_output_embeddings):
        emb = get()
        weight = getattr(emb, "weight", None) if emb is not None else None
        if weight is None or id(weight) in seen:
            continue  # tied: one tensor, quantized once
        seen.add(id(weight))
        original = weight.data
        weight.data = fake_quant_int8(original).to(original.dtype)
        restore.append((weight, original))

    def undo():
        for m in modules:
            m.int8 = False
        for weight, original in restore:
            weight.data = original

    return undo


def attach_search_(model: nn.Module, decompositions: dict[str, Decomposition]) -> nn.Module:
    """Wrap every decomposed matrix in a SearchLinear (all start dense)."""
    for name, dec in decompositions.items():
        module = arch.get_module(model, name)
        if not isinstance(module, SearchLinear):
            arch.set_module(model, name, SearchLinear(module, dec))
    return model


def set_ranks_(model: nn.Module, ranks: dict[str, int | None]) -> nn.Module:
    """Set the active rank of SearchLinear modules (None = dense); unnamed ones go dense."""
    for name in arch.linear_names(model):
        module = arch.get_module(model, name)
        if isinstance(module, SearchLinear):
            r = ranks.get(name)
            if r is not None and r > module.max_rank:
                raise ValueError(f"{name}: rank {r} above the decomposed maximum {module.max_rank}")
            module.rank = r
    return model


def detach_search_(model: nn.Module) -> nn.Module:
    """Put the original dense modules back."""
    for name in arch.linear_names(model):
        module = arch.get_module(model, name)
        if isinstance(module, SearchLinear):
            arch.set_module(model, name, module.dense)
    return model
