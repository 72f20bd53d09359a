"""Checks of model files made before any library is asked to load them.

A library that meets a truncated or hostile file answers with its own traceback (or, for
custom code, a question on stdin); these checks answer first, with one sentence that names
the file and what is wrong:

- ``check_model_folder``: config/tokenizer JSON files that name custom code (``auto_map``)
  are refused unless the user passed ``--trust-remote-code``; a config that is not a JSON
  object is refused; every ``*.safetensors`` file is checked (``check_safetensors``).
- ``check_safetensors``: the header length, the header JSON and every tensor's byte range
  fit the file (a truncated download, a garbage header). The tensor bytes themselves are
  not read.
- ``check_gguf``: the GGUF header, metadata, tensor table and every tensor's data range fit
  the file (an empty file, a file cut anywhere).

Standard library only (``gguf`` for its table of block sizes, imported when needed).
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from .errors import ModelLoadError

_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                   "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
_ST_MAX_HEADER = 100 << 20  # safetensors' own limit on the header (100 MB)


def _json_object(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path}: {what} is not UTF-8 text (byte {e.start}); the file is corrupt") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: {what} is not valid JSON ({e}); the file is corrupt") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def custom_code_entries(folder) -> list[tuple[Path, str]]:
    """(file, "AutoClass -> module.Class") for every ``auto_map`` entry in the folder's top-level JSON files.

    transformers runs the named module (a .py file in the folder, or in another hub repo)
    to build the config, model or tokenizer: that is custom code.
    """
    found = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not a config file transformers would read as one; checked where it matters
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            items = auto_map.items() if isinstance(auto_map, dict) else [("auto_map", auto_map)]
            for cls, ref in items:
                found.append((path, f"{cls} -> {ref if isinstance(ref, str) else json.dumps(ref)}"))
    return found


def check_no_custom_code(folder, role: str = "model folder", flag: str | None = "--trust-remote-code") -> None:
    """Raise ``ModelLoadError`` when the folder's config or tokenizer config names custom code."""
    found = custom_code_entries(folder)
    if not found:
        return
    path, entry = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    allow = (f"; sieve-edge never runs a folder's own code unless you pass {flag} (dangerous: it runs "
             "that Python code with your rights)") if flag else "; sieve-edge never runs a folder's own code here"
    raise ModelLoadError(f"{path}: {role} names custom code in 'auto_map' ({entry}){more}{allow}")


def check_safetensors(path) -> None:
    """Raise ``ModelLoadError`` unless ``path`` has a readable safetensors header whose tensors fit the file."""
    path = Path(path)
    size = path.stat().st_size
    bad = f"{path}: not a complete safetensors file"
    if size < 8:
        raise ModelLoadError(f"{bad}: {size} bytes, too short for the 8-byte header length (truncated download?)")
    with open(path, "rb") as f:
        n, = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > _ST_MAX_HEADER:
            raise ModelLoadError(f"{bad}: header length {n} bytes exceeds the {size}-byte file (truncated, or "
                                 "not safetensors)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{bad}: the header is not UTF-8 (byte {8 + e.start}): a corrupt file") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{bad}: the header is not valid JSON ({e.msg} at byte {8 + e.pos}): "
                             "a corrupt file") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{bad}: the header is not a JSON object")
    data_bytes = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
                  and all(isinstance(d, int) and d >= 0 for d in shape))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ModelLoadError(f"{bad}: tensor '{name}' has a malformed header entry {json.dumps(info)[:120]}")
        if end > data_bytes:
            raise ModelLoadError(f"{bad}: tensor '{name}' ends at byte {8 + n + end}, past the end of the "
                                 f"{size}-byte file (truncated download?)")
        itemsize = _ST_DTYPE_BYTES.get(dtype)
        if itemsize is not None and (end - begin) != math.prod(shape) * itemsize:
            raise ModelLoadError(f"{bad}: tensor '{name}' ({dtype} {shape}) should take "
                                 f"{math.prod(shape) * itemsize} bytes, the header gives {end - begin}")


def check_model_folder(folder, trust_remote_code: bool = False, role: str = "model folder",
                       flag: str | None = "--trust-remote-code") -> None:
    """The checks a Hugging Face folder (or checkpoint, export) passes before transformers reads it."""
    folder = Path(folder)
    if not trust_remote_code:
        check_no_custom_code(folder, role, flag)
    if (folder / "config.json").is_file():
        _json_object(folder / "config.json", "the model config")
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path)


# ---------------------------------------------------------------- GGUF

_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Cut(Exception):
    """A read past the end of the file."""


def check_gguf(path) -> None:
    """Raise ``ModelLoadError`` unless ``path`` is a GGUF file (v2/v3) whose header, metadata,
    tensor table and tensor data all lie inside the file."""
    import mmap

    path = Path(path)
    size = path.stat().st_size
    bad = f"{path}: not a complete GGUF file"
    if size < 24:
        raise ModelLoadError(f"{bad}: {size} bytes, shorter than the 24-byte GGUF header "
                             "(empty or truncated download?)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")

        def read(fmt: str, at: int):
            end = at + struct.calcsize(fmt)
            if end > size:
                raise _Cut(at)
            return struct.unpack_from(fmt, buf, at), end

        def skip_string(at: int) -> int:
            (n,), at = read("<Q", at)
            if at + n > size:
                raise _Cut(at)
            return at + n

        def skip_value(kind: int, at: int) -> int:
            if kind in _GGUF_SCALAR:
                if at + _GGUF_SCALAR[kind] > size:
                    raise _Cut(at)
                return at + _GGUF_SCALAR[kind]
            if kind == _GGUF_STRING:
                return skip_string(at)
            if kind == _GGUF_ARRAY:
                (item, count), at = read("<IQ", at)
                if item in _GGUF_SCALAR:
                    end = at + count * _GGUF_SCALAR[item]
                    if end > size:
                        raise _Cut(at)
                    return end
                for _ in range(count):
                    at = skip_value(item, at)
                return at
            raise ModelLoadError(f"{bad}: unknown metadata value type {kind} at byte {at - 4}")

        try:
            (version,), pos = read("<I", 4)
            if version not in (2, 3):
                raise ModelLoadError(f"{path}: unsupported GGUF version {version} (2 and 3 are read)")
            (n_tensors, n_kv), pos = read("<QQ", pos)
            alignment = 32
            for _ in range(n_kv):
                key_at = pos + 8
                key_end = skip_string(pos)
                key = bytes(buf[key_at:key_end]).decode("utf-8", errors="replace")
                (kind,), pos = read("<I", key_end)
                if key == "general.alignment" and kind == 4:
                    (alignment,), _ = read("<I", pos)
                pos = skip_value(kind, pos)
            tensors = []
            for _ in range(n_tensors):
                (n,), name_at = read("<Q", pos)
                pos = skip_string(pos)
                name = bytes(buf[name_at:pos]).decode("utf-8", errors="replace")
                (n_dims,), pos = read("<I", pos)
                if n_dims > 8:
                    raise ModelLoadError(f"{bad}: tensor '{name}' claims {n_dims} dimensions (at most 8 are valid)")
                dims, pos = read(f"<{n_dims}Q", pos)
                (ggml_type, offset), pos = read("<IQ", pos)
                tensors.append((name, dims, ggml_type, offset))
        except _Cut as e:
            raise ModelLoadError(f"{bad}: cut at {size} bytes, inside its metadata (at byte {e.args[0]}); "
                                 "truncated download?") from None
    if alignment <= 0:
        raise ModelLoadError(f"{bad}: general.alignment = {alignment}")
    data_start = -(-pos // alignment) * alignment
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for name, dims, ggml_type, offset in tensors:
        try:
            block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise ModelLoadError(f"{bad}: tensor '{name}' has unknown type {ggml_type}") from None
        nbytes = math.prod(dims) // block * type_bytes
        end = data_start + offset + nbytes
        if end > size:
            raise ModelLoadError(f"{bad}: tensor '{name}' ends at byte {end}, past the end of the {size}-byte "
                                 "file (truncated download?)")
