"""Prune a model per RankPlan with one of the four methods (``lowrank.py``), layer by layer.

- `svd`, `input-pca`, `output`: statistics from the dense model, one layer at a time.
- `sieve`: sequential and error-correcting. A dense stream and a pruned stream walk the
  layers together; each group of matrices (those sharing an input, in forward order) is
  fitted on the inputs the already pruned model gives it (X̂) against the outputs the dense
  model would give (W X), so later matrices repair what earlier cuts broke.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from . import architectures as arch
from .calibrate import (LayerInputs, capture_layer_inputs, capture_module_input, decompose_all, masked_rows,
                        run_layer, stats_device, swapped_modules)
from .errors import InputError
from .factorize import dense_weight, factorize_, linear_shapes, make_low_rank
from .lowrank import METHODS, Decomposition, decompose_sieve, sieve_stats
from .plan import RankPlan
from .progress import progress_bar


@dataclass
class PruneResult:
    model: nn.Module
    plan: RankPlan
    calibration_tokens: int
    seconds: float


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise InputError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")


def prune_with_batches(model: nn.Module, batches: Iterable[dict] | None, plan: RankPlan | float,
                       method: str = "sieve", *, multiple: int = 8, damp: float = 1e-4,
                       progress: bool = False) -> PruneResult:
    """Factorize `model` in place per `plan` (a RankPlan, or one keep fraction for all)."""
    _check_method(method)
    t0 = time.perf_counter()
    shapes, plan = _resolve_plan(model, plan, multiple, method)
    ranks = plan.factorized
    if method == "svd" and batches is not None:
        batches = None
    if method != "svd" and batches is None:
        raise InputError(f"method '{method}' needs calibration data")
    batches = list(batches) if batches is not None else None
    if not ranks:
        tokens = sum(int(b["attention_mask"].sum()) for b in batches) if batches else 0
        return PruneResult(model, plan, tokens, time.perf_counter() - t0)
    if method == "sieve":
        tokens = _sieve_(model, batches, ranks, damp, progress)
    else:
        decs, tokens = decompose_all(
            model, batches, method, max_rank=lambda name, m, n: ranks.get(name, 1), progress=progress
        )
        factorize_(model, {name: decs[name].factors(r) for name, r in ranks.items()})
    return PruneResult(model, plan, tokens, time.perf_counter() - t0)


@torch.no_grad()
def sieve_bases(model: nn.Module, batches: Iterable[dict], plan: RankPlan, basis_ranks: dict[str, int], *,
                damp: float = 1e-4, progress: bool = False) -> tuple[dict[str, Decomposition], int]:
    """The `sieve` refit of ``plan`` (``model`` factorized in place, as ``prune_with_batches``
    does) that also keeps, for every matrix of ``basis_ranks``, its sieve decomposition up to
    that rank: fitted on the inputs the plan's cut layers below it produce, so any rank of it
    is the matrix's sieve refit with the rest of the model at ``plan`` (a plan's own ranks
    sliced from it give exactly its refit). Returns (name -> Decomposition on the CPU, float32;
    calibration tokens). A matrix the plan keeps dense is decomposed but stays dense."""
    _, plan = _resolve_plan(model, plan, 8, "sieve")
    bases: dict[str, Decomposition] = {}
    tokens = _sieve_(model, list(batches), plan.factorized, damp, progress, bases=bases, basis_ranks=basis_ranks)
    return bases, tokens


@torch.no_grad()
def _sieve_(model: nn.Module, batches: list[dict], ranks: dict[str, int], damp: float, progress: bool,
            bases: dict | None = None, basis_ranks: dict[str, int] | None = None) -> int:
    basis_ranks = basis_ranks or {}
    spec = arch.get_arch(model)
    layers = arch.decoder_layers(model)
    dev = stats_device(model)
    captured: list[LayerInputs] = capture_layer_inputs(model, batches)
    tokens = sum(int(c.mask.sum()) for c in captured)
    dense_h = [c.hidden for c in captured]
    pruned_h = list(dense_h)
    for i in progress_bar(range(len(layers)), desc="sieve (sequential)", enabled=progress):
        layer = layers[i]
        prefix = f"{spec.layers}.{i}."
        originals: dict[str, nn.Module] = {}        # relative name -> dense module, as groups get cut
        for group in spec.groups:
            todo = [rel for rel in group if prefix + rel in ranks]
            wanted = [rel for rel in group if prefix + rel in basis_ranks]
            if not todo and not wanted:
                continue
            n = dense_weight(arch.get_module(layer, group[0])).shape[1]
            C_hat = torch.zeros(n, n, dtype=torch.float64, device=dev)
            C_cross = torch.zeros_like(C_hat)
            for b, c in enumerate(captured):
                with swapped_modules(layer, originals):
                    x = masked_rows(capture_module_input(layer, group[0], c, i, dense_h[b]), c.mask, dev)
                x_hat = masked_rows(capture_module_input(layer, group[0], c, i, pruned_h[b]), c.mask, dev)
                C_hat.addmm_(x_hat.T, x_hat)
                C_cross.addmm_(x.T, x_hat)              # Σ x x̂ᵀ
            shared = sieve_stats(C_hat / tokens, C_cross / tokens, damp)
            del C_hat, C_cross
            for rel in dict.fromkeys(todo + wanted):
                name = prefix + rel
                module = arch.get_module(layer, rel)
                dec = decompose_sieve(dense_weight(module), stats=shared,
                                      max_rank=max(ranks.get(name) or 0, basis_ranks.get(name) or 0))
                if bases is not None and name in basis_ranks:
                    bases[name] = Decomposition(dec.left.float().cpu(), dec.right.float().cpu(), dec.energy.cpu(),
                                                dec.total, dec.method).truncated(basis_ranks[name])
                if name in ranks:
                    originals[rel] = module
                    arch.set_module(layer, rel, make_low_rank(module, *dec.factors(ranks[name])))
        for b, c in enumerate(captured):
            with swapped_modules(layer, originals):
                dense_h[b] = run_layer(layer, c, i, dense_h[b])
            pruned_h[b] = run_layer(layer, c, i, pruned_h[b])
    return tokens


def _resolve_plan(model, plan, multiple: int, method: str):
    """(shapes, RankPlan) for ``model``: ``plan`` as given (checked against the model) or one
    keep fraction for every matrix."""
    shapes = linear_shapes(model)
    if not isinstance(plan, RankPlan):
        plan = RankPlan.from_keep(shapes, float(plan), multiple, method)
    plan.check_model(shapes)
    plan.method = method
    return shapes, plan


def prune(model: nn.Module, tokenizer, task, plan: RankPlan | float, method: str = "sieve", *,
          n_calibration: int = 512, batch_size: int = 16, max_length: int = 256, seed: int = 0,
          multiple: int = 8, damp: float = 1e-4, progress: bool = True) -> PruneResult:
    """Calibrate on the task's calibration split and factorize `model` in place."""
    from .tasks import calibration_batches

    _check_method(method)
    if isinstance(plan, RankPlan):
        plan.check_model(linear_shapes(model))  # a plan for another model fails before minutes of calibration
    batches = None
    if method != "svd":
        batches = list(calibration_batches(task, tokenizer, n_calibration, batch_size=batch_size,
                                           max_length=max_length, seed=seed))
    return prune_with_batches(model, batches, plan, method, multiple=multiple, damp=damp, progress=progress)


def check_decompositions(folder, model: str, task, method: str, n_calibration: int, seed: int,
                         max_length: int) -> None:
    """A calibrate stage's folder is reused only for the model, task data and settings it was made with."""
    import json

    from .calibrate import read_decompositions_manifest
    from .errors import ArtifactError
    from .stages import HashCache, model_ref, task_inputs

    folder = Path(folder)
    manifest = read_decompositions_manifest(folder)
    wanted = {"method": method, "n_calibration": n_calibration, "draw_seed": seed, "max_length": max_length}
    for key, value in wanted.items():
        if manifest.get(key) != value:
            flag = {"method": "--method", "n_calibration": "--calibration", "draw_seed": "--seed"}.get(key, key)
            raise InputError(f"{folder} holds a calibration with {key} {manifest.get(key)!r}, not {value!r}: pass "
                             f"{flag} {manifest.get(key)} to reuse it, or leave out --decompositions")
    record = folder.with_name(f"{folder.name}.stage.json")
    if not record.is_file():
        raise ArtifactError(f"{folder}: no {record.name} beside it, so nothing says which model and task it was "
                            "calibrated on; pass the calibrate folder of a finished `run` or `search`")
    made_from = json.loads(record.read_text()).get("inputs") or {}
    hashes = HashCache(None)
    ref = model_ref(model)
    if not ref.inputs:
        raise InputError(f"model {model} is not a file or folder whose content can be compared with {folder}'s")
    here = {**ref.inputs, **task_inputs(task, ("calibration",))}
    for label, path in here.items():
        if label in made_from and made_from[label].get("sha256") != hashes.content(path):
            raise ArtifactError(f"{folder} was calibrated on another {label} ({made_from[label].get('path')}, "
                                f"not {path}); leave out --decompositions to calibrate this one")


def prune_checkpoint(model: str, task: str, out, *, method: str = "sieve", keep: float | None = None,
                     plan_file=None, n_calibration: int = 512, batch_size: int = 16, max_length: int = 256,
                     seed: int = 0, multiple: int = 8, device: str | None = None, force: bool = False,
                     trust_remote_code: bool = False, progress: bool = True, decompositions=None) -> dict:
    """Load, calibrate, factorize and save a checkpoint; returns its manifest.

    decompositions: a calibrate stage's folder (``OUT.work/calibrate`` of ``run``,
    ``OUT/.stages/calibrate`` of ``search``) made from this model and task with these
    settings: its factors are reused instead of calibrating again (methods that need only
    the dense statistics: output, input-pca, svd).
    """
    from .checkpoint import build_manifest, check_output, model_bytes, save_checkpoint
    from .models import load_model, load_tokenizer
    from .outputs import check_room
    from .tasks import load_task

    _check_method(method)
    if (keep is None) == (plan_file is None):
        raise InputError("give exactly one of --keep (one fraction for every matrix) or --plan (a plan file)")
    if keep is not None and not 0.0 < keep <= 1.0:
        raise InputError(f"--keep must be in (0, 1], got {keep}")
    if decompositions is not None and method == "sieve":
        raise InputError("--decompositions holds factors of the dense statistics; method 'sieve' refits "
                         "sequentially and calibrates itself: use --method output (or leave --decompositions out)")
    plan = RankPlan.from_json(plan_file) if plan_file is not None else keep  # a malformed plan fails first
    check_output(out, "checkpoint", force)
    spec = load_task(task)
    if decompositions is not None:
        check_decompositions(decompositions, model, spec, method, n_calibration, seed, max_length)
    net = load_model(model, device=device, trust_remote_code=trust_remote_code)
    if isinstance(plan, RankPlan):
        plan.check_model(linear_shapes(net), source=str(plan_file))
    check_room(out, model_bytes(net))  # the dense size bounds the checkpoint's; before calibration
    tok = load_tokenizer(model, trust_remote_code=trust_remote_code)
    if decompositions is not None:
        result = _prune_from(net, decompositions, plan, method, multiple)
    else:
        result = prune(net, tok, spec, plan, method, n_calibration=n_calibration, batch_size=batch_size,
                       max_length=max_length, seed=seed, multiple=multiple, progress=progress)
    manifest = build_manifest(net, base_model=model, method=method, task=spec.name,
                              calibration={"examples": n_calibration, "tokens": result.calibration_tokens,
                                           "seed": seed, "split": "calibration"},
                              prune_seconds=round(result.seconds, 1))
    save_checkpoint(net, tok, out, manifest, force=force)
    return manifest


def _prune_from(model: nn.Module, folder, plan: RankPlan | float, method: str, multiple: int) -> PruneResult:
    """Factorize per ``plan`` with the factors of a calibrate stage's folder (no calibration)."""
    from .calibrate import load_decompositions

    t0 = time.perf_counter()
    shapes, plan = _resolve_plan(model, plan, multiple, method)
    decs, tokens, _ = load_decompositions(folder)
    for name, r in plan.factorized.items():
        if name not in decs:
            raise InputError(f"{folder} has no factors of '{name}': it was made for another model")
        if r > decs[name].max_rank:
            raise InputError(f"the plan needs rank {r} of '{name}'; {folder} keeps {decs[name].max_rank} (the "
                             "search ladder's top level): choose a smaller keep or leave out --decompositions")
    factorize_(model, {name: decs[name].factors(r) for name, r in plan.factorized.items()})
    return PruneResult(model, plan, tokens, time.perf_counter() - t0)
