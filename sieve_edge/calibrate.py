"""Layer-by-layer calibration: streaming float64 input covariances of the linear matrices.

One forward pass records what every decoder layer receives (the hidden states entering
layer 0, and each layer's extra arguments: masks, rotary tables). From then on the model is
walked one layer at a time on those cached hidden states, so only one layer's statistics
are ever held, whatever the model's size. The same walk serves the sequential `sieve`
method, which runs a dense stream and a pruned stream side by side (see `prune.py`).

Shapes: hidden states (B, T, d); the mask (B, T) marks real tokens (padding never enters
a covariance); a covariance is (n, n) float64 where n is the matrix's input size.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from . import architectures as arch
from .errors import ArtifactError, UnsupportedArchitectureError
from .lowrank import Decomposition, decompose, whitening
from .progress import progress_bar


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once what it needed was seen."""


@dataclass
class LayerInputs:
    """What the decoder layers receive for one calibration batch."""

    hidden: torch.Tensor                         # (B, T, d) entering layer 0
    mask: torch.Tensor                           # (B, T) bool, real tokens
    args: list[tuple] = field(default_factory=list)    # per layer: positional args after hidden
    kwargs: list[dict] = field(default_factory=list)   # per layer: keyword args


def stats_device(model: nn.Module) -> torch.device:
    """Where float64 statistics accumulate: the model's CUDA device, else the CPU (MPS has no float64)."""
    device = next(model.parameters()).device
    return device if device.type == "cuda" else torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, batches: Iterable[dict], run_layers: bool = True) -> list[LayerInputs]:
    """Run each batch once and record every decoder layer's inputs (hidden only for layer 0).

    ``run_layers=False``: the decoder layers are not run (their weights may still be on the
    meta device, ``lazy.LazyCheckpoint``); each passes its input through, which is enough,
    as the arguments a layer gets besides the hidden states (masks, rotary tables) are made
    in front of the layers."""
    layers = arch.decoder_layers(model)
    device = model_device(model)
    captured: list[LayerInputs] = []
    for batch in batches:
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        record = LayerInputs(hidden=None, mask=mask.bool(), args=[None] * len(layers), kwargs=[None] * len(layers))

        def make_hook(i):
            def hook(module, args, kwargs):
                kwargs = dict(kwargs)
                if args:
                    hidden, rest = args[0], tuple(args[1:])
                else:
                    hidden, rest = kwargs.pop("hidden_states"), ()
                if i == 0:
                    record.hidden = hidden.detach()
                record.args[i], record.kwargs[i] = rest, kwargs
                if i == len(layers) - 1:
                    raise _StopForward
            return hook

        handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        if not run_layers:
            for layer in layers:
                layer.forward = _pass_through
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
            if not run_layers:
                for layer in layers:
                    del layer.forward
        if record.hidden is None:
            spec = arch.get_arch(model)
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} ({type(model).__module__}): a forward pass never called the decoder "
                f"layers at '{spec.layers}' that the '{spec.name}' registry entry names; the registry does not "
                "match this model class")
        captured.append(record)
    return captured


def _pass_through(hidden_states=None, *args, **kwargs):
    return hidden_states if hidden_states is not None else kwargs.get("hidden_states")


def run_layer(layer: nn.Module, inputs: LayerInputs, i: int, hidden: torch.Tensor) -> torch.Tensor:
    out = layer(hidden, *inputs.args[i], **inputs.kwargs[i])
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_module_input(layer: nn.Module, module_rel: str, inputs: LayerInputs, i: int,
                         hidden: torch.Tensor) -> torch.Tensor:
    """The input tensor (B, T, n) that `module_rel` of layer i sees; the layer stops there."""
    module = arch.get_module(layer, module_rel)
    seen = {}

    def hook(mod, args):
        seen["x"] = args[0].detach()
        raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        run_layer(layer, inputs, i, hidden)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "x" not in seen:
        raise UnsupportedArchitectureError(
            f"{type(layer).__name__} ({type(layer).__module__}), layer {i}: the registry's module '{module_rel}' "
            "was never called in a forward pass; the registry does not match this model class")
    return seen["x"]


def masked_rows(x: torch.Tensor, mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, T, n) → (real tokens, n) float64 on the statistics device."""
    return x[mask].to(device=device, dtype=torch.float64)


@dataclass
class ActivationStats:
    """Input covariance C = X Xᵀ / N per matrix; matrices that share an input share a tensor."""

    covariances: dict[str, torch.Tensor]
    tokens: int

    def cov(self, name: str) -> torch.Tensor:
        try:
            return self.covariances[name]
        except KeyError:
            raise KeyError(f"no statistics for '{name}'") from None


def _iter_layer_covariances(model: nn.Module, captured: list[LayerInputs], progress: bool, desc: str,
                            weights=None) -> Iterator[tuple[int, dict[str, torch.Tensor], int]]:
    """Walk the dense model layer by layer, yielding (layer index, {qualified name: C}, tokens).
    ``weights`` (a ``lazy.LazyCheckpoint``): layer i is read from disk for its turn only (it
    stays loaded while the consumer handles what was yielded for it)."""
    spec = arch.get_arch(model)
    layers = arch.decoder_layers(model)
    dev = stats_device(model) if weights is None else _stats_device_of(weights.device)
    hidden = [c.hidden for c in captured]
    tokens = sum(int(c.mask.sum()) for c in captured)
    for i in progress_bar(range(len(layers)), desc=desc, enabled=progress):
        layer = layers[i]
        if weights is not None:
            weights.load_layer(i)
        sums: dict[str, torch.Tensor] = {}
        hooks = []
        current_mask = {}

        def make_hook(key):
            def hook(mod, args):
                rows = masked_rows(args[0], current_mask["m"], dev)
                if key not in sums:
                    sums[key] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=dev)
                sums[key].addmm_(rows.T, rows)
            return hook

        for group in spec.groups:
            hooks.append(arch.get_module(layer, group[0]).register_forward_pre_hook(make_hook(group[0])))
        try:
            with torch.no_grad():
                for b, c in enumerate(captured):
                    current_mask["m"] = c.mask
                    hidden[b] = run_layer(layer, c, i, hidden[b])
        finally:
            for h in hooks:
                h.remove()
        prefix = f"{spec.layers}.{i}."
        covs = {}
        for group in spec.groups:
            C = sums[group[0]] / max(tokens, 1)
            for rel in group:
                covs[prefix + rel] = C
        del sums
        yield i, covs, tokens
        del covs
        if weights is not None:
            weights.drop_layer(i)


def _stats_device_of(device: torch.device) -> torch.device:
    return device if device.type == "cuda" else torch.device("cpu")


def collect_stats(model: nn.Module, batches: Iterable[dict], names: Iterable[str] | None = None,
                  progress: bool = False) -> ActivationStats:
    """All covariances at once (fine for small models; `decompose_all` keeps one layer at a time)."""
    wanted = set(names) if names is not None else None
    captured = capture_layer_inputs(model, batches)
    out, tokens = {}, 0
    for _, covs, tokens in _iter_layer_covariances(model, captured, progress, "calibrate"):
        out.update({n: C for n, C in covs.items() if wanted is None or n in wanted})
    return ActivationStats(out, tokens)


def decompose_all(model: nn.Module, batches: Iterable[dict] | None, method: str = "output",
                  max_rank: Callable[[str, int, int], int | None] | None = None,
                  progress: bool = False) -> tuple[dict[str, Decomposition], int]:
    """Decompose every registry matrix once (``iter_decompositions``, collected).

    Returns the decompositions (on the CPU, float64) and the number of calibration tokens.
    """
    decs, tokens = {}, 0
    for _, layer_decs, tokens in iter_decompositions(model, batches, method, max_rank, progress):
        decs.update(layer_decs)
    return decs, tokens


def iter_decompositions(model: nn.Module, batches: Iterable[dict] | None, method: str = "output",
                        max_rank: Callable[[str, int, int], int | None] | None = None,
                        progress: bool = False, weights=None) -> Iterator[tuple[int, dict[str, Decomposition], int]]:
    """Decompose every registry matrix, one decoder layer at a time: yields (layer index,
    {name: Decomposition on the CPU, float64}, calibration tokens), holding one layer's
    covariances. ``max_rank(name, m, n)`` bounds how many directions are kept (None: all).
    ``weights`` (a ``lazy.LazyCheckpoint`` whose ``model`` is ``model``): the weights stay on
    disk but for the layer being decomposed (``stream_decompositions``).
    """
    from .factorize import dense_weight

    def bound(name, w):
        return max_rank(name, *w.shape) if max_rank else None

    if method == "svd":
        by_layer: dict[int, list[str]] = {}
        for name in arch.linear_names(model):
            by_layer.setdefault(arch.layer_index(name), []).append(name)
        for i in progress_bar(sorted(by_layer), desc="decompose", enabled=progress):
            if weights is not None:
                weights.load_layer(i)
            decs = {}
            for name in by_layer[i]:
                w = dense_weight(arch.get_module(model, name))
                decs[name] = _to_cpu(decompose(w, None, "svd", bound(name, w)))
            if weights is not None:
                weights.drop_layer(i)
            yield i, decs, 0
        return
    if weights is None:
        captured = capture_layer_inputs(model, batches)
    else:
        weights.load_outer()  # the embedding, for the pass that records what layer 0 receives
        try:
            captured = capture_layer_inputs(model, batches, run_layers=False)
        finally:
            weights.drop_outer()
    for i, covs, tokens in _iter_layer_covariances(model, captured, progress, f"calibrate+decompose ({method})",
                                                   weights):
        whitened = {}  # matrices sharing an input share C, and so its whitening
        decs = {}
        for name, C in covs.items():
            w = dense_weight(arch.get_module(model, name))
            L = None
            if method == "output":
                L = whitened.setdefault(id(C), whitening(C))
            decs[name] = _to_cpu(decompose(w, C, method, bound(name, w), L=L))
        yield i, decs, tokens


def stream_decompositions(folder, batches: Iterable[dict] | None, method: str = "output",
                          max_rank: Callable[[str, int, int], int | None] | None = None, *,
                          device: str | torch.device | None = None, progress: bool = False,
                          trust_remote_code: bool = False) -> Iterator[tuple[int, dict[str, Decomposition], int]]:
    """``iter_decompositions`` of a model folder read one decoder layer at a time from its
    safetensors files (``lazy.LazyCheckpoint``): peak memory is about the largest layer plus
    the cached hidden states, not the model. Same results as the in-memory path."""
    from .lazy import LazyCheckpoint

    lazy = LazyCheckpoint(folder, device=device, trust_remote_code=trust_remote_code)
    try:
        yield from iter_decompositions(lazy.model, batches, method, max_rank, progress, weights=lazy)
    finally:
        lazy.close()


DECOMPOSITIONS = "decompositions.json"
DECOMPOSITIONS_FORMAT = "sieve-edge/decompositions"


def save_decompositions(folder: Path, layers: Iterable[tuple[int, dict[str, Decomposition], int]],
                        **meta) -> dict:
    """Write decompositions layer by layer as they come (``layer-NNN.safetensors``) plus
    ``decompositions.json``; returns that manifest.

    Bases (left (m, k), right (k, n)) are stored as float32, what a candidate is scored and a
    checkpoint refit with; the energies (k,) stay float64, as the spectrum error sums them.
    """
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    matrices: dict[str, dict] = {}
    tokens, method = 0, None
    for i, decs, tokens in layers:
        file = f"layer-{i:03d}.safetensors"
        tensors = {}
        for name, d in decs.items():
            method = d.method
            tensors[f"{name}.left"] = d.left.to(torch.float32).contiguous()
            tensors[f"{name}.right"] = d.right.to(torch.float32).contiguous()
            tensors[f"{name}.energy"] = d.energy.to(torch.float64).contiguous()
            matrices[name] = {"shape": list(d.shape), "max_rank": d.max_rank, "total": float(d.total), "file": file}
        save_file(tensors, str(folder / file))
    manifest = {"format": DECOMPOSITIONS_FORMAT, "format_version": 1, "method": method, "tokens": tokens,
                "bases_dtype": "float32", "energy_dtype": "float64", **meta, "matrices": matrices}
    (folder / DECOMPOSITIONS).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_decompositions_manifest(folder: Path) -> dict:
    import json

    f = Path(folder) / DECOMPOSITIONS
    if not f.is_file():
        raise ArtifactError(f"{folder}: no {DECOMPOSITIONS}; not the output of a calibrate stage")
    try:
        manifest = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{f}: not valid JSON ({e})") from e
    if manifest.get("format") != DECOMPOSITIONS_FORMAT or manifest.get("format_version") != 1:
        raise ArtifactError(f"{f}: not a sieve-edge decompositions manifest (format version 1)")
    return manifest


def load_decompositions(folder: Path) -> tuple[dict[str, Decomposition], int, dict]:
    """(name -> Decomposition with float32 bases, calibration tokens, manifest) of a folder
    written by ``save_decompositions``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = read_decompositions_manifest(folder)
    decs: dict[str, Decomposition] = {}
    by_file: dict[str, list[str]] = {}
    for name, m in manifest["matrices"].items():
        by_file.setdefault(m["file"], []).append(name)
    for file, names in sorted(by_file.items()):
        path = _layer_file(folder, file)
        tensors = load_file(str(path))
        for name in names:
            decs[name] = _decomposition(path, name, manifest, tensors.get)
    return decs, int(manifest["tokens"]), manifest


def _layer_file(folder: Path, file: str) -> Path:
    path = folder / file
    if not path.is_file():
        raise ArtifactError(f"{folder}: {file} is missing (an incomplete calibrate output)")
    return path


def _decomposition(path: Path, name: str, manifest: dict, get) -> Decomposition:
    """One matrix's Decomposition from ``get(tensor name)`` (None when absent), checked against the manifest."""
    m = manifest["matrices"][name]
    left, right, energy = (get(f"{name}.{part}") for part in ("left", "right", "energy"))
    if left is None or right is None or energy is None:
        raise ArtifactError(f"{path}: tensors of '{name}' are missing")
    if tuple(left.shape) != (m["shape"][0], m["max_rank"]) or tuple(right.shape) != (m["max_rank"], m["shape"][1]):
        raise ArtifactError(f"{path}: '{name}' bases have shapes {tuple(left.shape)} x {tuple(right.shape)}, "
                            f"the manifest says {m['shape']} at rank {m['max_rank']}")
    return Decomposition(left, right, energy, float(m["total"]), manifest["method"])


class DecompositionFiles(Mapping):
    """name -> Decomposition of a folder written by ``save_decompositions``, each read from
    its layer file when asked (only that matrix's tensors): one matrix's bases in memory at a
    time, not the model's (the offloaded search wraps the matrices one by one)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.manifest = read_decompositions_manifest(self.folder)
        self.method: str = self.manifest["method"]
        self.tokens = int(self.manifest["tokens"])

    def __getitem__(self, name: str) -> Decomposition:
        from safetensors import safe_open

        path = _layer_file(self.folder, self.manifest["matrices"][name]["file"])
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            # clone: nothing keeps the file's mapping alive once the Decomposition is dropped
            return _decomposition(path, name, self.manifest,
                                  lambda key: f.get_tensor(key).clone() if key in keys else None)

    def __iter__(self):
        return iter(self.manifest["matrices"])

    def __len__(self) -> int:
        return len(self.manifest["matrices"])


def _to_cpu(d: Decomposition) -> Decomposition:
    return Decomposition(d.left.cpu(), d.right.cpu(), d.energy.cpu(), d.total, d.method)


@contextlib.contextmanager
def swapped_modules(root: nn.Module, modules: dict[str, nn.Module]):
    """Temporarily put other modules at the given (relative) names; restore on exit."""
    saved = {name: arch.get_module(root, name) for name in modules}
    try:
        for name, m in modules.items():
            arch.set_module(root, name, m)
        yield
    finally:
        for name, m in saved.items():
            arch.set_module(root, name, m)
