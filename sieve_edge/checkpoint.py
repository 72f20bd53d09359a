"""The factorized checkpoint: an ordinary Hugging Face folder plus `sieve_edge.json`.

Writes are atomic (a `.partial-<pid>` sibling renamed into place), loads never unpickle
(safetensors only), and the model class stays the original one with `LowRankLinear`
modules swapped in where `ranks` says.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from . import __version__
from . import architectures as arch
from .errors import ArtifactError, ModelLoadError
from .factorize import empty_factorized_, factorized_ranks, linear_shapes, param_counts
from .outputs import describe_folder  # noqa: F401 - re-exported: what kind of artifact a folder holds

MANIFEST = "sieve_edge.json"
FORMAT = "sieve-edge/checkpoint"
FORMAT_VERSION = 1


def read_manifest(path: str | Path) -> dict | None:
    """The folder's sieve_edge.json, checked; None when the folder has none."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{f}: not UTF-8 text (byte {e.start}); the checkpoint manifest is corrupt") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{f}: must be a JSON object (the checkpoint manifest), got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise ArtifactError(f"{f}: key 'format' is {data.get('format')!r}, expected '{FORMAT}'")
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{f}: format_version {data.get('format_version')!r} is not supported "
                            f"(this sieve-edge reads {FORMAT_VERSION}); upgrade sieve-edge")
    if not isinstance(data.get("ranks", {}), dict):
        raise ArtifactError(f"{f}: key 'ranks' must be a table of module name -> rank")
    return data


def build_manifest(model: nn.Module, *, base_model: str, method: str | None, task: str | None,
                   kind: str | None = None, **extra) -> dict:
    """Manifest of the model as it is now (ranks, shapes and parameter counts measured, not passed)."""
    shapes = linear_shapes(model)
    ranks = factorized_ranks(model)
    dense, current = param_counts(shapes, ranks)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind or ("factorized" if ranks else "dense"),
        "architecture": arch.get_arch(model).name,
        "base_model": str(base_model),
        "method": method,
        "task": task,
        "ranks": ranks,
        "shapes": {n: list(s) for n, s in shapes.items()},
        "linear_params_dense": dense,
        "linear_params": current,
        "linear_param_reduction": round(1 - current / dense, 6) if dense else 0.0,
        "created_by": f"sieve-edge {__version__}",
        **extra,
    }


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as they are in memory (the size of its safetensors)."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()  # tied weights counted once
    return sum(seen.values())


def check_output(out: str | Path, kind: str, force: bool = False, expected_bytes: int | None = None) -> Path:
    """Fail early (before hours of work) if `out` may not receive an artifact of `kind`.

    An existing folder holding another kind of artifact is never overwritten; one holding
    the same kind is replaced only with force. Also cleans the leftovers of killed writes of
    `out` and probes that it can be written (``sieve_edge.outputs.check_output``).
    """
    from .outputs import check_output as check

    return check(out, kind, force=force, expected_bytes=expected_bytes)


def prepare_output(out: str | Path, kind: str, force: bool = False) -> Path:
    """check_output, then a fresh partial folder beside `out` to write into."""
    out = check_output(out, kind, force)
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def finalize_output(partial: Path, out: str | Path) -> Path:
    """Move a complete partial folder into place (replacing an old artifact of the same kind)."""
    out = Path(out)
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        out.rename(old)
        partial.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(out)
    return out


def save_checkpoint(model: nn.Module, tokenizer, out: str | Path, manifest: dict, force: bool = False) -> Path:
    """Write model (safetensors), config, tokenizer and manifest; atomically."""
    partial = prepare_output(out, "checkpoint", force)
    try:
        model.save_pretrained(partial, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return finalize_output(partial, out)


def load_checkpoint(path: str | Path, device: str | torch.device | None = None,
                    dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild the original model class with LowRankLinear modules per the manifest.

    The folder is checked first (``sieve_edge.filechecks.check_model_folder``): custom code
    in an ``auto_map`` is refused unless ``trust_remote_code``, and every safetensors file
    must be complete.
    """
    from accelerate import init_empty_weights
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from .filechecks import check_model_folder
    from .outputs import refuse_leftover

    path = Path(path)
    refuse_leftover(path, "checkpoint")
    manifest = read_manifest(path)
    if manifest is None:
        raise ModelLoadError(f"{path} has no {MANIFEST}: not a sieve-edge checkpoint")
    weights = sorted(path.glob("model*.safetensors"))
    if not weights:
        raise ArtifactError(f"{path}: no model*.safetensors file (incomplete checkpoint?)")
    check_model_folder(path, trust_remote_code, "sieve-edge checkpoint")
    try:
        # trust_remote_code passed explicitly: left out, transformers would ask on stdin
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ArtifactError(f"{path / 'config.json'}: cannot be read as a model config "
                            f"({' '.join(str(e).split())[:300]})") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    arch.get_arch(model)
    ranks = {n: int(r) for n, r in manifest.get("ranks", {}).items()}
    for name in ranks:
        arch.get_module(model, name)  # a rank for a module the model lacks is a broken manifest
    empty_factorized_(model, ranks)
    state = {}
    for f in weights:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"{f}: cannot be read ({e}); the checkpoint is corrupt") from None
    result = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                                   strict=False, assign=True)
    if result.unexpected_keys:
        raise ArtifactError(f"{path}: tensors the model does not have: {result.unexpected_keys[:5]}")
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise ArtifactError(f"{path}: tensors missing from the checkpoint: {still_meta[:5]}")
    if device is not None:
        model.to(device)
    return model.eval()
