"""Fewer, larger kernels per layer: one MatMul for every matrix of a group that reads one input.

At one token (decoding) a 576-wide model is bound by per-node overhead, not by arithmetic,
and factorization doubles the MatMuls of a layer (W x becomes B (A x)). The registry groups
the matrices that read the same input (``architectures.ArchSpec.groups``: q/k/v, gate/up).
``fuse_groups_`` rewrites each such group, in the torch model just before export, so the
exported graph computes

    H = x @ [W_dense rows ; A_1 ; A_2 ; ...]ᵀ (+ [b_dense ; 0 ; ...])   one MatMul (+ one Add)
    h_1, h_2, ... = Split(H)                                           per member
    y_i = h_i (a dense member)   or   y_i = B_i h_i (+ b_i) (a factorized member)

so a group of three factorized matrices costs four MatMuls instead of six, and a dense group
one instead of three. The fused weight is a concatenation of rows, so a weight quantizer
that works per output row (NNCF INT8_ASYM) or per column block (ONNX ``MatMulNBits``) gives
every row the scale it would have had alone: the search's int8 simulation still holds.

How: each member becomes a plain callable (not an ``nn.Module``) stored on its parent (the
attention or MLP module). Its ops are then traced into the parent's graph, where the shared
product (computed by one ``SharedInputLinear`` child of the parent) may be reused by the
next member: torch tracers record a submodule call as its own graph, which could not see a
tensor another submodule computed. The shared product is reused only for the very same
input tensor object and once per member; anything else recomputes it, so a model that calls
its members in another way stays correct, only slower.
"""
from __future__ import annotations

import copy
import re

from ..errors import UnsupportedArchitectureError


def _torch():
    import torch
    from torch import nn

    return torch, nn


def structure_copy(model):
    """A copy of ``model``'s modules that shares every parameter and buffer tensor with it.

    Surgery on the copy (module swaps) leaves the original intact without doubling the
    weights in memory; nothing here changes a tensor in place."""
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        memo[id(t)] = t
    return copy.deepcopy(model, memo)


class _Member:
    """What a fused group member's name now points to: ``parent.q_proj(x)`` still works."""

    def __init__(self, shared, index: int, second, in_features: int, out_features: int, rank: int | None):
        self.shared, self.index, self.second = shared, index, second
        self.in_features, self.out_features, self.rank = in_features, out_features, rank

    def __call__(self, x):
        h = self.shared.part(x, self.index)   # (..., rank_i) or (..., out_i)
        return h if self.second is None else self.second(h)

    def __repr__(self) -> str:
        kind = "dense" if self.rank is None else f"rank {self.rank}"
        return f"FusedMember(part {self.index} of {self.shared.name}, {kind}, {self.in_features}->{self.out_features})"


def _shared_input_linear_class():
    torch, nn = _torch()

    class SharedInputLinear(nn.Module):
        """y = x Wᵀ (+ b) over the stacked rows of a group; ``part(x, i)`` is member i's slice."""

        def __init__(self, weight, bias, sizes: list[int], name: str):
            super().__init__()
            self.weight = nn.Parameter(weight, requires_grad=False)                 # (Σ sizes, in)
            self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # (Σ sizes,)
            self.sizes, self.name = list(sizes), name
            self._input = None
            self._parts = None
            self._taken: set[int] = set()

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight, self.bias)

        def part(self, x, index: int):
            if self._input is not x or index in self._taken:
                self._parts = torch.split(self(x), self.sizes, dim=-1)   # one MatMul, then Split
                self._input, self._taken = x, set()
            self._taken.add(index)
            out = self._parts[index]
            if len(self._taken) == len(self.sizes):   # every member served: drop the references
                self._input = self._parts = None
                self._taken = set()
            return out

        def __deepcopy__(self, memo):
            # the per-input cache is transient: never copied
            new = self.__class__.__new__(self.__class__)
            memo[id(self)] = new
            for k, v in self.__dict__.items():
                setattr(new, k, None if k in ("_input", "_parts") else copy.deepcopy(v, memo))
            new._taken = set()
            return new

        def extra_repr(self) -> str:
            return f"{self.name}: in={self.weight.shape[1]}, parts={self.sizes}"

    return SharedInputLinear


def _parts_of(module):
    """(first rows (k, in), bias of those rows or None, second module or None, rank or None).

    Dense ``nn.Linear`` / Conv1D: its rows and bias. ``LowRankLinear``: its first factor
    (no bias) and its second module, applied after the split."""
    torch, nn = _torch()
    from ..factorize import LowRankLinear, _is_conv1d

    if isinstance(module, LowRankLinear):
        return module.first.weight.detach(), None, module.second, module.rank
    if _is_conv1d(module):
        w = module.weight.detach().T     # Conv1D stores (in, out)
        return w, module.bias.detach() if module.bias is not None else None, None, None
    if isinstance(module, nn.Linear):
        return module.weight.detach(), module.bias.detach() if module.bias is not None else None, None, None
    return None


def fuse_groups_(model) -> list[dict]:
    """Fuse every registry group of two or more matrices that read one input, in place.

    Returns one record per fused group: its qualified names, each member's kind, and the
    weight MatMuls of the group before and after. Groups of one matrix (Phi-3's qkv_proj,
    GPT-2's c_attn, which their models already fuse) are left as they are.
    """
    torch, nn = _torch()
    from .. import architectures as arch

    SharedInputLinear = _shared_input_linear_class()
    done = []
    for group in arch.linear_groups(model):
        if len(group) < 2:
            continue
        parents = {name.rpartition(".")[0] for name in group}
        if len(parents) != 1:
            raise UnsupportedArchitectureError(
                f"cannot fuse group {group}: its matrices live in different modules {sorted(parents)}")
        parent_name = parents.pop()
        parent = arch.get_module(model, parent_name)
        children = [name.rpartition(".")[2] for name in group]
        modules = [arch.get_module(model, name) for name in group]
        parts = [_parts_of(m) for m in modules]
        if any(p is None for p in parts):
            continue   # something this module does not know (already fused, a search wrapper): leave it
        ins = {p[0].shape[1] for p in parts}
        if len(ins) != 1:
            raise UnsupportedArchitectureError(f"cannot fuse group {group}: input sizes {sorted(ins)} differ")
        weights = [p[0] for p in parts]
        dtype = weights[0].dtype
        weight = torch.cat([w.to(dtype) for w in weights], dim=0).contiguous()   # (Σ rows, in)
        bias = None
        if any(p[1] is not None for p in parts):
            bias = torch.cat([p[1].to(dtype) if p[1] is not None else torch.zeros(w.shape[0], dtype=dtype)
                              for p, w in zip(parts, weights)])
        sizes = [int(w.shape[0]) for w in weights]
        shared_name = "fused_" + "_".join(children)
        shared = SharedInputLinear(weight, bias, sizes, f"{parent_name}.{shared_name}")
        parent.add_module(shared_name, shared)
        for i, (child, module, (w, _, second, rank)) in enumerate(zip(children, modules, parts)):
            out_features = int(w.shape[0]) if second is None else int(second.weight.shape[0])
            delattr(parent, child)               # drop the child module ...
            if second is not None:
                parent.add_module(f"{child}_second", second)
            # ... and put a plain callable in its place (traced into the parent's graph)
            object.__setattr__(parent, child, _Member(shared, i, second, int(w.shape[1]), out_features, rank))
        done.append({
            "group": group,
            "members": ["dense" if p[3] is None else f"rank {p[3]}" for p in parts],
            "matmuls_before": sum(1 if p[3] is None else 2 for p in parts),
            "matmuls_after": 1 + sum(p[3] is not None for p in parts),
        })
    return done


def is_fused(model) -> bool:
    return any(type(m).__name__ == "SharedInputLinear" for m in model.modules())


# ---------------------------------------------------------------------------- counting


def torch_matmuls_per_layer(model) -> list[int]:
    """Weight MatMuls per decoder layer as the model stands (dense 1, factorized pair 2)."""
    from ..factorize import LowRankLinear, _is_conv1d

    _, nn = _torch()
    counts = []
    from ..architectures import decoder_layers

    for layer in decoder_layers(model):
        n = 0
        for m in layer.modules():
            if isinstance(m, LowRankLinear):
                continue   # its two nn.Linear children are counted
            if isinstance(m, nn.Linear) or _is_conv1d(m) or type(m).__name__ == "SharedInputLinear":
                n += 1
        counts.append(n)
    return counts


def _layer_pattern(model) -> re.Pattern:
    from ..architectures import get_arch

    last = get_arch(model).layers.rsplit(".", 1)[-1]     # "layers" (model.layers), "h" (transformer.h)
    return re.compile(rf"(?:^|[./_]){re.escape(last)}[._](\d+)(?:[./_]|$)")


def graph_matmuls_per_layer(folder, fmt: str, model) -> dict:
    """Weight MatMuls in an exported fp32 graph, per decoder layer (counted by node name).

    A weight MatMul is a MatMul / Gemm (ONNX) or MatMul (OpenVINO) whose second input is a
    constant. Returns ``{"per_layer": [...], "outside_layers": n}``."""
    from pathlib import Path

    from ..architectures import decoder_layers

    pattern = _layer_pattern(model)
    n_layers = len(decoder_layers(model))
    per_layer = [0] * n_layers
    outside = 0

    def add(name: str):
        nonlocal outside
        m = pattern.search(name)
        if m and int(m.group(1)) < n_layers:
            per_layer[int(m.group(1))] += 1
        else:
            outside += 1

    folder = Path(folder)
    if fmt == "onnx":
        import onnx

        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        consts = {t.name for t in graph.initializer}
        consts |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
        for node in graph.node:
            if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in consts:
                add(node.name)
    else:
        import openvino as ov

        model_ir = ov.Core().read_model(str(folder / "openvino_model.xml"))
        for op in model_ir.get_ordered_ops():
            if op.get_type_name() != "MatMul":
                continue
            src = op.input_value(1).get_node()
            while src.get_type_name() in ("Convert", "Reshape", "Transpose") and src.get_input_size():
                src = src.input_value(0).get_node()
            if src.get_type_name() == "Constant":
                add(op.get_friendly_name())
    return {"per_layer": per_layer, "outside_layers": outside}
