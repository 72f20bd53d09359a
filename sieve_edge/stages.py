"""Content-addressed stages: a stage reruns only when what it reads changed.

A ``Stage`` declares its name, the folder it writes (its *slot* in a work folder), a config
(a dict of the settings that change its result), its input files and folders (hashed by
content: model weights, a task TOML and its data files, a target profile) and the stages
whose outputs it consumes. Its key is the sha256 of all that plus the keys of those
upstream stages, so a key changes when anything upstream of it changed.

A ``Workflow`` runs a list of stages in order. A stage is skipped only when the record of
its last finished run (``SLOT.stage.json``) holds the same key AND its output still verifies
(every file listed in the record is there with its size); otherwise it runs, and so does
every stage that consumes it. ``run.json`` in the work folder shows, per stage, its key,
its inputs, whether it ran or was skipped, why, and how long it took.

A stage writes into ``SLOT.partial-<pid>`` beside its slot, which is renamed into place when
complete; its record (``SLOT.stage.json``, beside the folder so that whoever copies the
folder does not copy it) is written last. A killed run leaves a partial folder (removed by
the next run) or an output without a record: either way the stage runs again. File hashes are cached by
(path, size, mtime_ns, inode) in ``WORK/.cache/hashes.json``: a multi-GB model is hashed
once, not on every run.

Everything here is torch-free; stages import their backends inside ``build``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import ArtifactError

RECORD = "stage.json"
RECORD_FORMAT = "sieve-edge/stage"
RUN_FORMAT = "sieve-edge/run"
FORMAT_VERSION = 1
KILL_ENV = "SIEVE_EDGE_KILL_AT"  # tests only: "SLOT:POINT" makes the process SIGKILL itself there


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON beside ``path`` and rename it into place (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def kill_point(slot: str, point: str) -> None:
    """Test hook: SIGKILL this process at ``slot:point`` when ``SIEVE_EDGE_KILL_AT`` names it."""
    if os.environ.get(KILL_ENV) == f"{slot}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- content hashes

class HashCache:
    """sha256 of files and folders, remembered by (size, mtime_ns, inode) of each file."""

    def __init__(self, path: Path | None):
        self.path = None if path is None else Path(path)
        self.entries: dict[str, list] = {}
        self.dirty = False
        if self.path is not None and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.entries = {}  # a broken cache costs one rehash, nothing else

    def file(self, path: Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = self.entries.get(str(path))
        if hit and hit[:3] == stamp:
            return hit[3]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        self.entries[str(path)] = [*stamp, h.hexdigest()]
        self.dirty = True
        return h.hexdigest()

    def content(self, path: Path) -> str:
        """A file's sha256, or a folder's: over its files' relative paths and hashes (hidden names skipped)."""
        path = Path(path)
        if path.is_file():
            return self.file(path)
        if not path.is_dir():
            raise ArtifactError(f"input {path} does not exist")
        h = hashlib.sha256()
        for rel, f in _tree(path):
            h.update(f"{rel}\0{self.file(f)}\n".encode())
        return h.hexdigest()

    def save(self) -> None:
        if self.path is not None and self.dirty:
            write_json_atomic(self.path, self.entries)
            self.dirty = False


def _tree(folder: Path) -> list[tuple[str, Path]]:
    """(relative path, file) of every regular file under ``folder``, hidden names skipped, sorted."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith("."):
                f = Path(root) / name
                out.append((f.relative_to(folder).as_posix(), f))
    return sorted(out)


def list_files(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, int]:
    """relative path -> size of every file of an output folder (what its record verifies);
    ``skip`` holds names, and folders ending in '/', left out."""
    return {rel: f.stat().st_size for rel, f in _tree(folder)
            if rel not in skip and not any(p.endswith("/") and rel.startswith(p) for p in skip)}


# ---------------------------------------------------------------- what stages read

@dataclass
class ModelRef:
    """A model as stages see it: what ``load_model`` takes, and what its key is made of."""

    spec: str                                            # folder, GGUF file, alias or hub id
    inputs: dict[str, Path] = field(default_factory=dict)  # content-hashed files: {"model": folder or file}
    config: dict = field(default_factory=dict)           # key material that is not a file (hub id, in-memory hash)
    needs: tuple[str, ...] = ()                          # the stage whose output it is (tune)
    preloaded: tuple | None = None                       # (model, tokenizer) a caller handed in


def model_ref(spec, model=None, tokenizer=None, trust_remote_code: bool = False) -> ModelRef:
    """The ModelRef of a user's model spec; an in-memory ``model`` is keyed by its weights."""
    if model is not None:
        if tokenizer is None:
            from .models import load_tokenizer

            tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
        return ModelRef(str(spec), config={"weights": model_fingerprint(model),
                                           "tokenizer": tokenizer_fingerprint(tokenizer)},
                        preloaded=(model, tokenizer))
    from .models import resolve_source

    source = resolve_source(spec)
    if source.kind == "hub":
        try:  # a cached snapshot is hashed like a folder; an uncached id is keyed by its name
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source.hub_id, local_files_only=True))
            return ModelRef(str(spec), {"model": folder}, {"hub": source.hub_id})
        except Exception:
            return ModelRef(str(spec), {}, {"hub": source.hub_id})
    path = source.gguf_path if source.is_gguf else source.path
    return ModelRef(str(spec), {"model": Path(path)})


def model_fingerprint(model) -> str:
    """sha256 of a model's tensors (names, dtypes, shapes and bytes), for a model held in memory."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy())  # the bytes, without a copy
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(getattr(tokenizer, "get_vocab", lambda: {})())
    extra = json.dumps({"class": type(tokenizer).__name__, "special": getattr(tokenizer, "special_tokens_map", {}),
                        "chat_template": getattr(tokenizer, "chat_template", None)}, sort_keys=True, default=str)
    return hashlib.sha256((text + extra).encode()).hexdigest()


def task_inputs(task, splits: tuple[str, ...] = ()) -> dict[str, Path]:
    """{"task": the TOML, "task data SPLIT": its data file} for the splits a stage reads."""
    out = {"task": Path(task.path)}
    for split in splits:
        if split in task.data:
            out[f"task data {split}"] = Path(task.data[split])
    return out


def task_fingerprint(task) -> str:
    """sha256 of a task's TOML and every data file it declares."""
    cache = HashCache(None)
    return hashlib.sha256(json.dumps({label: cache.content(p) for label, p in
                                      task_inputs(task, tuple(sorted(task.data))).items()},
                                     sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- stages

class Stage:
    """One step: reads ``inputs`` and the outputs of the stages in ``needs``, writes its slot.

    Subclasses set the attributes in ``__init__`` and implement ``build``. ``config`` must
    hold every setting that changes the output (JSON-able values); ``inputs`` maps a label
    ("task data train") to a file or folder hashed by content; ``needs`` lists the slots
    consumed (their keys enter this key, their outputs are in ``ctx.output(slot)``).
    """

    name: str = "stage"
    version: int = 1          # bump when the stage's output format changes

    def __init__(self, *, slot: str | None = None, config: dict | None = None,
                 inputs: dict[str, Path] | None = None, needs: tuple[str, ...] = ()):
        self.slot = slot or self.name
        self.config = dict(config or {})
        self.inputs = {k: Path(v) for k, v in (inputs or {}).items()}
        self.needs = tuple(needs)

    always = False            # runs every time (a check, not a product)
    unverified: tuple[str, ...] = ()  # output files later steps may change (names, or folders ending in '/')
    external = False          # writes its own output atomically outside the work folder (the bundle)

    def applies(self, ctx: "StageContext") -> str | None:
        """None when the stage applies; else why it does not (it is then skipped)."""
        return None

    def output(self, work: Path) -> Path:
        return work / self.slot

    def record_path(self, work: Path) -> Path:
        # beside the output, not in it: consumers copy outputs (an export into a bundle)
        return work / f"{self.slot}.{RECORD}"

    def verify(self, output: Path) -> str | None:
        """Stage-specific check of a finished output beyond the listed files; None when fine."""
        return None

    def build(self, ctx: "StageContext", out: Path) -> dict | None:
        """Write the output into ``out`` (an empty folder); return a small JSON-able summary."""
        raise NotImplementedError

    def preflight(self, ctx: "StageContext") -> None:
        """Checks that must fail before any stage runs (every key is known by then)."""

    def committed(self, ctx: "StageContext", output: Path) -> None:
        """Called once the output is in place (clean up what a killed run would still need)."""


@dataclass
class StageRecord:
    """One stage of one run, as run.json shows it."""

    name: str
    slot: str
    status: str                  # pending | running | ran | skipped | failed | interrupted
    why: str = ""
    key: str = ""
    seconds: float = 0.0
    output: str = ""
    detail: str = ""
    inputs: dict = field(default_factory=dict)     # label -> {path, sha256}
    upstream: dict = field(default_factory=dict)   # slot -> key
    summary: dict = field(default_factory=dict)    # what the stage returned (or its record kept)


class StageContext:
    """What a running stage may use: the work folder, upstream outputs and summaries, a model cache."""

    def __init__(self, work: Path, log: Callable[[str], None], preloaded: dict | None = None,
                 trust_remote_code: bool = False, device: str | None = None):
        self.work = work
        self.log = log
        self.trust_remote_code = trust_remote_code  # for models the stages load (the user's choice)
        self.device = device                        # auto | cpu | cuda[:N] for models the stages load (not keyed)
        self.outputs: dict[str, Path] = {}
        self.summaries: dict[str, dict] = {}
        self.seconds: dict[str, float] = {}           # per slot: this run's time, or the finished run's
        self.keys: dict[str, str] = {}
        self.inputs: dict[str, dict[str, str]] = {}   # per slot: input label -> sha256
        self.forced: set[str] = set()
        self._models: dict[str, tuple] = dict(preloaded or {})
        self._held: dict[str, tuple[object, Callable[[], None], str | None]] = {}

    def output(self, slot: str) -> Path:
        return self.outputs[slot]

    def summary(self, slot: str) -> dict:
        return self.summaries.get(slot) or {}

    def scratch(self, slot: str) -> Path:
        """A folder that survives a killed run (a search's resumable state lives there)."""
        return self.work / f"{slot}.resume"

    def model(self, spec: str, *, take: bool = False):
        """(model, tokenizer) for ``spec``, loaded once per run. ``take`` hands it over for
        changes in place (a refit): the next caller loads a fresh copy."""
        if spec not in self._models:
            from .models import load_model, load_tokenizer

            self.log(f"loading {spec}")
            self._models[spec] = (load_model(spec, device=self.device, trust_remote_code=self.trust_remote_code),
                                  load_tokenizer(spec, trust_remote_code=self.trust_remote_code))
        return self._models.pop(spec) if take else self._models[spec]

    def hold(self, key: str, value, release: Callable[[], None], *, until: str | None = None) -> None:
        """Keep ``value`` (costly to rebuild: an offloaded model whose files are written) for a
        later stage of this run to ``claim``. Unclaimed, ``release()`` frees it once the stage
        in slot ``until`` has been dealt with (ran, skipped or failed), or at the end of the run."""
        self.release_held(key=key)
        self._held[key] = (value, release, until)

    def claim(self, key: str):
        """The value held under ``key`` (now the caller's to free), or None."""
        held = self._held.pop(key, None)
        return None if held is None else held[0]

    def release_held(self, slot: str | None = None, *, key: str | None = None) -> None:
        """Free what is held until ``slot`` (everything when both are None; one ``key``).
        A failing release is logged, not raised: it must not hide the error a run stops on."""
        for k in [k for k, (_, _, until) in self._held.items()
                  if (key is None or k == key) and (slot is None or until == slot)]:
            _, release, _ = self._held.pop(k)
            try:
                release()
            except Exception as e:  # noqa: BLE001
                self.log(f"could not release {k}: {e}")


class Workflow:
    """Run stages in order with content-addressed skipping; ``run.json`` logs every decision."""

    def __init__(self, work: str | Path, stages: list[Stage], *, force: bool | set[str] = False,
                 log: Callable[[str], None] | None = None, preloaded: dict | None = None,
                 hashes: HashCache | None = None, run_file: str = "run.json", meta: dict | None = None,
                 trust_remote_code: bool = False, device: str | None = None):
        self.work = Path(work)
        self.stages = list(stages)
        slots = [s.slot for s in self.stages]
        if len(set(slots)) != len(slots):
            raise ValueError(f"two stages share a slot: {slots}")
        self.force = set(slots) if force is True else set(force or ())
        self.say = log or (lambda msg: None)
        self.work.mkdir(parents=True, exist_ok=True)
        self.hashes = hashes or HashCache(self.work / ".cache" / "hashes.json")
        self.run_file = self.work / run_file
        self.meta = dict(meta or {})
        self.ctx = StageContext(self.work, self.say, preloaded, trust_remote_code, device)
        self.ctx.forced = self.force
        self.records: list[StageRecord] = []
        self._descriptions: dict[str, dict] = {}
        self._keys: dict[str, str] = {}

    # -- keys (computed from inputs only, so every key is known before anything runs)

    def describe(self, stage: Stage) -> dict:
        """What the key hashes: stage, versions, config, input content hashes, upstream keys."""
        if stage.slot in self._descriptions:
            return self._descriptions[stage.slot]
        missing = [s for s in stage.needs if s not in self._keys]
        if missing:
            raise ValueError(f"stage {stage.slot} needs {missing}, which do not run before it")
        desc = {
            "stage": stage.name, "stage_version": stage.version, "sieve_edge": __version__,
            "config": json.loads(json.dumps(stage.config, sort_keys=True, default=str)),
            "inputs": {label: self.hashes.content(path) for label, path in sorted(stage.inputs.items())},
            "upstream": {slot: self._keys[slot] for slot in stage.needs},
        }
        self._descriptions[stage.slot] = desc
        self._keys[stage.slot] = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()
        return desc

    def keys(self) -> dict[str, str]:
        for stage in self.stages:
            self.describe(stage)
            self.ctx.outputs[stage.slot] = stage.output(self.work)
        self.hashes.save()
        self.ctx.keys = dict(self._keys)
        self.ctx.inputs = {slot: dict(d["inputs"]) for slot, d in self._descriptions.items()}
        return dict(self._keys)

    # -- decisions

    def _read_record(self, stage: Stage) -> dict | None:
        path = stage.record_path(self.work)
        if not path.is_file():
            return None
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return rec if rec.get("format") == RECORD_FORMAT else None

    def _why_not_done(self, stage: Stage, ran: set[str]) -> str | None:
        """None when the stage's finished output can be reused; else the reason it runs."""
        if stage.always:
            return "always runs (it is the check)"
        if stage.slot in self.force:
            return "forced"
        rec = self._read_record(stage)
        output = stage.output(self.work)
        if not output.exists():
            return "output missing"
        if rec is None:
            return "no record of a finished run"
        if rec.get("key") != self._keys[stage.slot]:
            return "key changed: " + key_change(rec.get("description") or {}, self._descriptions[stage.slot],
                                                rec.get("inputs") or {}, self._input_paths(stage))
        for rel, size in (rec.get("files") or {}).items():
            f = output / rel
            if not f.is_file() or f.stat().st_size != size:
                return f"output incomplete: {rel} missing or changed"
        problem = stage.verify(output)
        if problem:
            return f"output incomplete: {problem}"
        upstream_ran = [s for s in stage.needs if s in ran]
        if upstream_ran:
            return f"upstream {', '.join(upstream_ran)} ran"
        return None

    def why_runs(self, slot: str) -> str | None:
        """None when the finished output of stage ``slot`` and of every stage before it would be
        reused as it stands; else why the first of them that would run runs. Runs nothing."""
        if slot not in (s.slot for s in self.stages):
            raise ValueError(f"no stage in slot '{slot}'; the stages: {[s.slot for s in self.stages]}")
        self.keys()
        for stage in self.stages:
            why = self._why_not_done(stage, set())
            if why is not None:
                return why if stage.slot == slot else f"{stage.slot}: {why}"
            if stage.slot == slot:
                return None

    def _input_paths(self, stage: Stage) -> dict[str, dict]:
        desc = self._descriptions[stage.slot]
        return {label: {"path": str(path), "sha256": desc["inputs"][label]} for label, path in stage.inputs.items()}

    # -- running

    def run(self) -> list[StageRecord]:
        self.keys()
        self.records = [StageRecord(s.name, s.slot, "pending", key=self._keys[s.slot],
                                    output=str(s.output(self.work)), inputs=self._input_paths(s),
                                    upstream=self._descriptions[s.slot]["upstream"]) for s in self.stages]
        self._write_log()
        for stage in self.stages:
            stage.preflight(self.ctx)
        ran: set[str] = set()
        try:
            for stage, record in zip(self.stages, self.records):
                try:
                    self._run_stage(stage, record, ran)
                finally:
                    self.ctx.release_held(stage.slot)  # held for this stage, which did not claim it
        finally:
            self.ctx.release_held()  # held for a stage that never came
        return self.records

    def _run_stage(self, stage: Stage, record: StageRecord, ran: set[str]) -> None:
        output = stage.output(self.work)
        not_applicable = stage.applies(self.ctx)
        if not_applicable:
            record.status, record.why = "skipped", f"does not apply: {not_applicable}"
            self.say(f"[{stage.slot}] skipped: {record.why}")
            self._write_log()
            return
        why = self._why_not_done(stage, ran)
        if why is None:
            rec = self._read_record(stage) or {}
            record.status, record.why = "skipped", "done (key matches, output verified)"
            record.summary = rec.get("summary") or {}
            record.detail = str(record.summary.get("detail", ""))
            self.ctx.summaries[stage.slot] = record.summary
            self.ctx.seconds[stage.slot] = float(rec.get("seconds") or 0.0)
            self.say(f"[{stage.slot}] skipped: done ({output})")
            self._write_log()
            return
        record.status, record.why = "running", why
        self._write_log()
        self.say(f"[{stage.slot}] running ({why}) ...")
        t0 = time.perf_counter()
        try:
            summary = self._build(stage, output, t0)
        except BaseException as e:
            record.status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            record.seconds = time.perf_counter() - t0
            self._write_log()
            raise
        record.status, record.seconds = "ran", time.perf_counter() - t0
        record.summary = summary
        record.detail = str(summary.get("detail", ""))
        self.ctx.summaries[stage.slot] = summary
        self.ctx.seconds[stage.slot] = record.seconds
        if not stage.always:
            ran.add(stage.slot)
        self.say(f"[{stage.slot}] done in {record.seconds:.0f} s {record.detail}".rstrip())
        self._write_log()

    def _build(self, stage: Stage, output: Path, t0: float) -> dict:
        kill_point(stage.slot, "start")
        if stage.always:
            return dict(stage.build(self.ctx, output) or {})
        record = stage.record_path(self.work)
        record.unlink(missing_ok=True)  # until the new output is in place, nothing here is done
        if stage.external:
            # the stage writes `output` atomically itself (the bundle)
            summary = dict(stage.build(self.ctx, output) or {})
            kill_point(stage.slot, "commit")
        else:
            clean_partials(output)
            partial = output.with_name(f"{output.name}.partial-{os.getpid()}")
            partial.mkdir(parents=True)
            try:
                summary = dict(stage.build(self.ctx, partial) or {})
                kill_point(stage.slot, "commit")
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            replace_folder(partial, output)
        write_json_atomic(record, self._record(stage, summary, output, t0))
        stage.committed(self.ctx, output)
        return summary

    def _record(self, stage: Stage, summary: dict, folder: Path, t0: float) -> dict:
        return {
            "format": RECORD_FORMAT, "format_version": FORMAT_VERSION,
            "name": stage.name, "slot": stage.slot, "key": self._keys[stage.slot],
            "config": self._descriptions[stage.slot]["config"], "inputs": self._input_paths(stage),
            "upstream": self._descriptions[stage.slot]["upstream"],
            "description": self._descriptions[stage.slot],
            "finished": now_iso(), "seconds": round(time.perf_counter() - t0, 3),
            "summary": summary, "files": list_files(folder, tuple(stage.unverified)),
        }

    def _write_log(self) -> None:
        write_json_atomic(self.run_file, {
            "format": RUN_FORMAT, "format_version": FORMAT_VERSION, "updated": now_iso(),
            "work": str(self.work), **self.meta,
            "stages": [asdict(r) for r in self.records],
        })


def key_change(old: dict, new: dict, old_inputs: dict, new_inputs: dict) -> str:
    """Why two stage descriptions differ, in words: the config keys, inputs and upstream stages."""
    reasons = []
    if old.get("sieve_edge") != new.get("sieve_edge") or old.get("stage_version") != new.get("stage_version"):
        reasons.append(f"sieve-edge {old.get('sieve_edge')} made it (now {new.get('sieve_edge')})")
    oc, nc = old.get("config") or {}, new.get("config") or {}
    for k in sorted(set(oc) | set(nc)):
        if k not in nc:
            reasons.append(f"config {k} no longer used")
        elif k not in oc:
            reasons.append(f"config {k} added ({_short(nc[k])})")
        elif oc[k] != nc[k]:
            reasons.append(f"config {k} {_short(oc[k])} -> {_short(nc[k])}")
    oi, ni = old.get("inputs") or {}, new.get("inputs") or {}
    for label in sorted(set(oi) | set(ni)):
        if oi.get(label) != ni.get(label):
            path = (new_inputs.get(label) or old_inputs.get(label) or {}).get("path", "")
            what = "now read" if label not in oi else "no longer read" if label not in ni else "changed"
            reasons.append(f"input {label} {path} {what}".replace("  ", " "))
    ou, nu = old.get("upstream") or {}, new.get("upstream") or {}
    for slot in sorted(set(ou) | set(nu)):
        if ou.get(slot) != nu.get(slot):
            what = "no longer consumed" if slot not in nu else "now consumed" if slot not in ou else "changed"
            reasons.append(f"upstream {slot} {what}")
    if not reasons:
        return "made by another version of this stage"
    return "; ".join(reasons[:4]) + (f" (+{len(reasons) - 4} more)" if len(reasons) > 4 else "")


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_partials(output: Path) -> None:
    """Remove ``OUTPUT.partial-<pid>`` folders left by killed runs (not those of live processes)."""
    for p in output.parent.glob(f"{output.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)


def replace_folder(partial: Path, output: Path) -> None:
    """Rename a complete ``partial`` to ``output``, moving an old ``output`` aside first."""
    if output.exists():
        old = output.with_name(f"{output.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(output, old)
        os.replace(partial, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, output)
