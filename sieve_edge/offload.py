"""Candidate scoring with the matrices on disk: accelerate's offload hooks on every SearchLinear.

With ``--offload DIR`` (``search``, ``run``) the scoring model's registry matrices live in
DIR: ``OffloadedSearch.attach`` wraps them in ``SearchLinear`` modules one at a time, writes
each one's tensors (the dense weight and bias, the search bases A (k, n) and Bt (k, m)) with
``accelerate.utils.offload_weight`` (one memory-mapped ``.dat`` file per tensor), and hooks
an ``accelerate.hooks.AlignDevicesHook`` on it that reads them back just before the module's
forward and puts them on the meta device just after. The embedding, the norms and the LM
head stay in memory. Scoring then holds one matrix and its bases at a time (plus the
activations), whatever the model's size, and reads every matrix from disk (the page cache,
when it fits) once per forward pass: slower, the same numbers. The int8 simulation quantizes
per call instead of caching codes (per output row: the first r rows of the quantized A are
the quantized first r rows of A). Code that reads a SearchLinear's tensors outside its
forward (the sensitivity's backward hooks) wraps it in
``factorize.materialized(module)``.

DIR is scratch: created if missing, marked as sieve-edge's, and emptied of what this module
wrote when the search detaches. A non-empty folder without the mark is refused: nothing of
the user's is ever deleted.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from . import architectures as arch
from .errors import InputError

MARKER = ".sieve-edge-offload"   # a folder holding it is this module's scratch
INDEX = "index.json"             # accelerate's offload index (written for inspection; the loader shares ours)


def check_offload_dir(folder: str | Path) -> Path:
    """``folder`` as an offload folder: missing, empty, or one this module made (a killed
    run's leftovers). Anything else is an ``InputError``, before anything loads."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--offload {folder}: exists and is not a folder")
    if folder.is_dir() and not (folder / MARKER).is_file() and any(folder.iterdir()):
        raise InputError(f"--offload {folder}: the folder is not empty and sieve-edge did not make it; the offload "
                         "folder is scratch (its files are deleted after the search), so give a new or empty folder")
    return folder


class OffloadedSearch:
    """The SearchLinear modules of one model, their tensors in files in ``folder``.

    ``device``: where a module's tensors are brought for its forward (the model's device).
    ``weights``: a ``lazy.LazyCheckpoint`` when the model is its meta-device skeleton: each
    matrix is read from the model's safetensors files just before it is written here, and
    nothing is restored on ``detach`` (the skeleton is dropped). Without it the model is in
    memory and ``detach`` puts each dense matrix back as it was.
    """

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", weights=None):
        self.folder = Path(folder)
        self.device = torch.device(device)
        self.weights = weights
        self.index: dict[str, dict] = {}
        self.names: list[str] = []
        self._created = False
        self._attached: tuple[int, str] | None = None  # (id of the model, the decompositions' folder)

    # -- the folder

    def _open(self) -> None:
        check_offload_dir(self.folder)
        if (self.folder / MARKER).is_file():  # a killed run's files: ours to remove
            self._created = bool(json.loads((self.folder / MARKER).read_text() or "{}").get("created"))
            self._remove_files()
        elif not self.folder.exists():
            self.folder.mkdir(parents=True)
            self._created = True
        (self.folder / MARKER).write_text(json.dumps({"created": self._created}) + "\n")

    def _remove_files(self) -> None:
        # a marked folder's leftovers: what offload_weight and this module write (*.dat, the
        # index, the mark), never anything else
        for p in self.folder.iterdir():
            if p.is_file() and (p.suffix == ".dat" or p.name in (INDEX, MARKER)):
                p.unlink()

    def close(self) -> None:
        """Delete the files this object wrote (and the folder, if it made it and it is empty)."""
        if not self.folder.is_dir() or not (self.folder / MARKER).is_file():
            return
        for name in [*(f"{key}.dat" for key in self.index), INDEX, MARKER]:
            (self.folder / name).unlink(missing_ok=True)
        self.index.clear()
        if self._created and not any(self.folder.iterdir()):
            self.folder.rmdir()

    # -- the model

    @property
    def attached(self) -> bool:
        return bool(self.names)

    def attach(self, model: nn.Module, decompositions: Mapping) -> nn.Module:
        """Wrap every matrix named in ``decompositions`` in an offloaded SearchLinear (all
        start dense), one matrix in memory at a time.

        Attached already to this model from the same decompositions' folder (the sensitivity
        stage hands its offloaded model to the search stage), the files are reused as they are:
        the modules must be dense again, which is how both stages leave them."""
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module
        from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight, save_offload_index
        from accelerate.utils.modeling import named_module_tensors

        from .factorize import SearchLinear

        source = getattr(decompositions, "folder", None)
        if self.attached:
            if self._attached != (id(model), str(source)) or source is None:
                raise ValueError(f"{self.folder}: already holds another model's or another calibration's matrices")
            if any(arch.get_module(model, name).rank is not None for name in self.names):
                raise ValueError(f"{self.folder}: the offloaded matrices are not all dense")
            return model
        self._open()
        loader = OffloadedWeightsLoader(save_folder=str(self.folder), index=self.index)  # shares self.index
        try:
            for name in [n for n in arch.linear_names(model) if n in decompositions]:
                module = arch.get_module(model, name)
                if isinstance(module, SearchLinear):
                    raise ValueError(f"{name}: already a SearchLinear")
                if self.weights is not None:
                    self.weights.load_tensors([n for n in self.weights.names if n.startswith(f"{name}.")])
                searched = SearchLinear(module, decompositions[name], offloadable=True)
                for tensor, value in named_module_tensors(searched, include_buffers=True, recurse=True,
                                                          remove_non_persistent=True):
                    offload_weight(value.detach(), f"{name}.{tensor}", str(self.folder), self.index)
                # the hook records where each tensor was (restored there on detach) and puts it on meta
                add_hook_to_module(searched, AlignDevicesHook(
                    execution_device=self.device, offload=True, weights_map=PrefixedDataset(loader, f"{name}."),
                    offload_buffers=True, place_submodules=True))
                arch.set_module(model, name, searched)
                self.names.append(name)
        except BaseException:
            self.detach(model)
            raise
        save_offload_index(self.index, str(self.folder))
        self._attached = (id(model), str(source))
        return model

    def detach(self, model: nn.Module) -> nn.Module:
        """Put the dense modules back (their weights restored from the files, one at a time,
        unless the model is a skeleton) and delete the files."""
        from accelerate.hooks import remove_hook_from_module

        try:
            for name in self.names:
                searched = arch.get_module(model, name)
                if self.weights is None:
                    remove_hook_from_module(searched)  # reads its tensors back where they were
                arch.set_module(model, name, searched.dense)
            self.names, self._attached = [], None
        finally:
            self.close()
        return model

    def resident_bytes(self, model: nn.Module) -> int:
        """Bytes of the model's tensors in memory now (what is not offloaded)."""
        seen, total = set(), 0
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type != "meta" and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total


def skeleton_with_resident_weights(folder: str | Path, device=None, trust_remote_code: bool = False):
    """A ``LazyCheckpoint`` of a dense safetensors folder with everything but the registry
    matrices read (embedding, norms, LM head): the model to hand ``OffloadedSearch`` with
    ``weights=`` that checkpoint, which reads each matrix when it wraps it."""
    from .lazy import LazyCheckpoint

    lazy = LazyCheckpoint(folder, device=device, trust_remote_code=trust_remote_code)
    model = lazy.model
    matrices = tuple(f"{name}." for name in arch.linear_names(model))
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and model.get_output_embeddings() is not None
    head = f"{lazy.spec.lm_head}."
    lazy.load_tensors([n for n in lazy.names if not n.startswith(matrices) and not (tied and n.startswith(head))])
    if tied:
        model.tie_weights()  # the head is the embedding's tensor again
    return lazy

