"""Output folders checked before the work starts, and what a killed write leaves behind.

Every command that writes an artifact folder writes it as ``OUT.partial-<pid>`` (the search
stages it as ``OUT.final-<pid>``) and renames it into place when complete; replacing an old
artifact moves it aside as ``OUT.old-<pid>`` for the instant of the swap. A process killed
in between leaves such a sibling behind. This module:

- ``check_output(out, kind, force=, expected_bytes=)``: the one call a writer makes BEFORE
  minutes of work: cleans the leftovers of dead writers of ``out``, refuses an ``out`` that
  holds another kind of artifact (or the same kind without ``force``), proves that the
  folder can be created and written (a real probe, not ``os.access``: root passes every
  permission check but not a read-only mount), and that the disk has room for
  ``expected_bytes`` when the caller knows them;
- ``check_room(out, expected_bytes)``: the room check alone, for writers that know the size
  only after loading the model (still before the long part);
- ``clean_leftovers(out)``: remove leftovers whose process is gone (an ``OUT.old-<pid>``
  is put back when ``OUT`` itself is missing: the swap was cut between its two renames);
- ``refuse_leftover(path, role)``: inputs (models, export sources, bundles) named like a
  leftover are refused with an error that says what they are.

Imports only the standard library (the CLI's error path and ``--help`` stay light).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import ArtifactError

# NAME.partial-1234, NAME.final-1234, NAME.old-1234 (pid of the writer)
LEFTOVER = re.compile(r"^(?P<name>.+)\.(?P<what>partial|final|old)-(?P<pid>\d+)$")
_WHAT = {"partial": "an unfinished write", "final": "a final folder being moved into place",
         "old": "a replaced artifact set aside for the swap"}
MARKERS = (("sieve_edge.json", "checkpoint"), ("export.json", "export"), ("bundle.json", "bundle"),
           ("search_state.json", "search"), ("run.json", "run"), ("report.json", "reports"),
           ("config.json", "model"))
ROOM_MARGIN = 1.10  # files written beside the main ones (tokenizer, manifests, reports)


def cache_dir() -> Path:
    """sieve-edge's cache: $SIEVE_EDGE_CACHE, else $XDG_CACHE_HOME/sieve-edge (~/.cache/sieve-edge)."""
    if os.environ.get("SIEVE_EDGE_CACHE"):
        return Path(os.environ["SIEVE_EDGE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sieve-edge"


def describe_folder(path: Path) -> str | None:
    """What kind of sieve-edge artifact a folder holds, if any (the first marker file found)."""
    path = Path(path)
    for marker, kind in MARKERS:
        if (path / marker).is_file():
            return kind
    return None


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:
        return False
    return True


def leftover_of(path) -> tuple[Path, str, int] | None:
    """(the leftover component, its kind, the writer's pid) when ``path`` or one of its
    parents is named like a leftover; None otherwise."""
    p = Path(path).absolute()
    for part in (p, *p.parents):
        m = LEFTOVER.match(part.name)
        if m:
            return part, m["what"], int(m["pid"])
    return None


def refuse_leftover(path, role: str = "input") -> None:
    """Raise ``ArtifactError`` when ``path`` is (inside) the leftover of a killed or running write."""
    hit = leftover_of(path)
    if hit is None:
        return
    part, what, pid = hit
    target = part.with_name(LEFTOVER.match(part.name)["name"])
    state = "is still running" if pid_alive(pid) else "is gone (killed or crashed)"
    raise ArtifactError(
        f"{role} '{path}' is {_WHAT[what]} of '{target}' ('{part.name}': process {pid} was writing it and "
        f"{state}), so it may be incomplete; rerun the command that writes '{target}' (the rerun removes "
        "this folder), or rename the folder if you know it is complete")


def leftovers(out) -> list[tuple[Path, str, int]]:
    """Siblings of ``out`` named ``OUT.partial-<pid>``, ``OUT.final-<pid>``, ``OUT.old-<pid>``."""
    out = Path(out)
    found = []
    if out.parent.is_dir():
        for p in sorted(out.parent.iterdir()):
            m = LEFTOVER.match(p.name)
            if m and m["name"] == out.name:
                found.append((p, m["what"], int(m["pid"])))
    return found


def clean_leftovers(out) -> list[Path]:
    """Remove the leftovers of dead writers of ``out``; return what was removed.

    A live writer's leftover (another process writing ``out`` right now) is an error. When
    ``out`` is missing and a dead writer's ``OUT.old-<pid>`` exists, the old artifact is put
    back instead of removed: the writer was killed between moving it aside and moving the
    new one in, so it is the last complete artifact.
    """
    out = Path(out)
    removed = []
    for path, what, pid in leftovers(out):
        if pid == os.getpid():
            continue  # our own, handled by the writer
        if pid_alive(pid):
            raise ArtifactError(f"output '{out}' is in use: process {pid} is writing it ('{path.name}'); "
                                "wait for it to finish or stop it, then rerun")
        if what == "old" and not out.exists() and not os.path.lexists(out):
            os.replace(path, out)
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def clean_temp_files(folder) -> list[Path]:
    """Remove ``NAME.tmp-<pid>`` files of dead processes in ``folder`` (a killed atomic write's temp file)."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            head, sep, pid = p.name.rpartition(".tmp-")
            if sep and head and pid.isdigit() and p.is_file() and not pid_alive(int(pid)):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _existing_ancestor(path: Path) -> Path:
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path(path.anchor or ".")


def free_bytes(path) -> int:
    """Free bytes on the filesystem holding ``path`` (tests monkeypatch this to fake a full disk)."""
    return shutil.disk_usage(path).free


def _probe(folder: Path, out: Path) -> None:
    try:
        probe = tempfile.mkdtemp(prefix=f".{out.name[:40]}.probe-", dir=folder)
        os.rmdir(probe)
    except OSError as e:
        raise ArtifactError(f"output '{out}' cannot be written: creating a folder in '{folder}' failed "
                            f"({e.strerror or e}); choose a writable --out") from None


def check_room(out, expected_bytes: int | None) -> None:
    """Raise ``ArtifactError`` when the disk that will hold ``out`` has no room for
    ``expected_bytes`` (x1.1 for the files written beside the main ones)."""
    if not expected_bytes:
        return
    out = Path(out).absolute()
    where = _existing_ancestor(out if out.exists() else out.parent)
    need = int(expected_bytes * ROOM_MARGIN)
    try:
        free = free_bytes(where)
    except OSError:
        return  # no way to ask: the write itself will tell
    if free < need:
        raise ArtifactError(f"output '{out}' needs about {_size(need)}, but the disk holding '{where}' "
                            f"has {_size(free)} free; free some space or choose another --out")


def _size(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 10 * 2**20 else f"{n / 2**20:.2f} MB"


def check_output(out, kind: str, *, force: bool = False, expected_bytes: int | None = None,
                 replace_kinds: tuple[str, ...] = ()) -> Path:
    """Check, before any work, that ``out`` can receive an artifact of ``kind``; return it as a Path.

    - leftovers of dead writers of ``out`` are removed (``clean_leftovers``);
    - an existing file at ``out``, or a folder under a regular file, is an error;
    - a non-empty folder must hold ``kind`` (or one of ``replace_kinds``) and is replaced
      only with ``force``; a folder holding anything else is never touched;
    - the folder ``out`` goes into (its parent, or the nearest existing ancestor) must
      accept a new folder (a real mkdir probe);
    - with ``expected_bytes``, the disk must have room for them (``check_room``).

    Raises ``ArtifactError`` naming ``out`` and what to do.
    """
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise ArtifactError(f"output '{out}' names no folder; give a folder path such as runs/my-model")
    clean_leftovers(out)
    if os.path.lexists(out):
        if not out.is_dir():
            raise ArtifactError(f"output '{out}' exists and is not a folder; choose another --out")
        if any(out.iterdir()):
            what = describe_folder(out)
            if what != kind and what not in replace_kinds:
                raise ArtifactError(f"output folder '{out}' already holds {_held(what)}; choose another --out")
            if not force:
                raise ArtifactError(f"output folder '{out}' already holds {_held(what)}; pass --force to replace it")
        _probe(out, out)
    absolute = out.absolute()
    ancestor = _existing_ancestor(absolute.parent)
    if not ancestor.is_dir():
        raise ArtifactError(f"output '{out}' cannot be created: '{ancestor}' is a file, not a folder; "
                            "choose another --out")
    _probe(ancestor, out)
    check_room(out, expected_bytes)
    return out


def _held(kind: str | None) -> str:
    return kind or "other files"


def dir_bytes(path) -> int:
    """Bytes of the regular files under ``path`` (0 when it does not exist)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0
