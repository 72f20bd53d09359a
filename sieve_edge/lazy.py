"""A model whose decoder layers stay in their safetensors files until calibration reaches them.

``LazyCheckpoint(folder)`` builds the model class on the meta device (no memory), reads the
weights in front of the decoder layers (the embedding) for the one pass that records what
layer 0 receives, drops them again, then hands out one decoder layer at a time:
``load_layer(i)`` reads its tensors with ``safetensors.safe_open`` (memory-mapped, only that
layer's bytes) onto the device, ``drop_layer(i)`` puts it back on the meta device. So the
calibration's peak memory is one layer's weights plus the cached hidden states and one
layer's float64 statistics, whatever the model's size (``calibrate.stream_decompositions``).

Only dense Hugging Face folders in safetensors (``model.safetensors`` or a sharded
``model.safetensors.index.json``) stream; a GGUF file or a factorized checkpoint is loaded
whole, as before. The output head is never read: calibration stops at the last layer.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import architectures as arch
from .errors import ArtifactError, ModelLoadError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def streamable(folder: str | Path) -> bool:
    """Whether ``folder`` is a dense safetensors model folder that ``LazyCheckpoint`` can stream."""
    folder = Path(folder)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        return False
    if not ((folder / SINGLE).is_file() or (folder / INDEX).is_file()):
        return False
    manifest = folder / "sieve_edge.json"
    if manifest.is_file():  # a sieve-edge checkpoint streams only when nothing in it is factorized
        try:
            return not (json.loads(manifest.read_text(encoding="utf-8")).get("ranks") or {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return False
    return True


class LazyCheckpoint:
    """The model skeleton (parameters on the meta device) and where each tensor lives on disk."""

    def __init__(self, folder: str | Path, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from .models import check_source, pick_device, resolve_source

        self.folder = Path(folder)
        if not streamable(self.folder):
            raise ModelLoadError(f"{self.folder}: not a dense safetensors model folder ({SINGLE} or {INDEX}); "
                                 "load it whole instead")
        check_source(resolve_source(self.folder), trust_remote_code)
        self.device = pick_device(device)
        self.dtype = dtype
        config = AutoConfig.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
        arch.get_arch(config)  # an unsupported architecture fails before anything is read
        with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed, not stored
            self.model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                          dtype=dtype).eval()
        self.model.to(dtype)
        self.spec = arch.get_arch(self.model)
        self.files = self._index()
        # tensors are read in the model's own names; a checkpoint saved with other names is refused
        self.names = [n for n, _ in self.model.named_parameters(remove_duplicate=False)]
        self.layer_prefix = f"{self.spec.layers}."
        head = f"{self.spec.lm_head}."
        self.outer = [n for n in self.names if not n.startswith(self.layer_prefix) and not n.startswith(head)]
        self.bytes_read = 0

    def _index(self) -> dict[str, Path]:
        if (self.folder / INDEX).is_file():
            try:
                weight_map = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise ArtifactError(f"{self.folder / INDEX}: not a safetensors index ({e})") from None
            return {name: self.folder / file for name, file in weight_map.items()}
        from safetensors import safe_open

        with safe_open(str(self.folder / SINGLE), framework="pt") as f:
            return {name: self.folder / SINGLE for name in f.keys()}

    def _load(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise ArtifactError(f"{self.folder}: no tensor '{name}' in its safetensors files (the model "
                                    f"class {type(self.model).__name__} expects it)")
            by_file.setdefault(self.files[name], []).append(name)
        for path, members in by_file.items():
            if not path.is_file():
                raise ArtifactError(f"{path}: missing (the safetensors index names it)")
            # opened for this layer only: the mapped pages it touched are unmapped on close, so the
            # process does not keep every layer read so far resident
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in members:
                    t = f.get_tensor(name)
                    self.bytes_read += t.numel() * t.element_size()
                    # .to copies (the dtype changes, or the device): nothing keeps the mapping alive
                    value = t.to(device=self.device, dtype=self.dtype, copy=True)
                    del t
                    set_module_tensor_to_device(self.model, name, self.device, value=value)

    def _drop(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            set_module_tensor_to_device(self.model, name, "meta")

    def layer_names(self, i: int) -> list[str]:
        prefix = f"{self.layer_prefix}{i}."
        return [n for n in self.names if n.startswith(prefix)]

    def load_outer(self) -> None:
        """The weights in front of and after the decoder layers (not the output head)."""
        self._load(self.outer)

    def drop_outer(self) -> None:
        self._drop(self.outer)

    def load_tensors(self, names: list[str]) -> None:
        """These tensors (the model's own names) from the files onto the device."""
        self._load(list(names))

    def load_layer(self, i: int) -> None:
        self._load(self.layer_names(i))

    def drop_layer(self, i: int) -> None:
        self._drop(self.layer_names(i))

    def close(self) -> None:
        """Nothing stays open between layers; kept for symmetry with the callers' ``finally``."""
