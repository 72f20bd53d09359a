"""Assemble the deployable folder: model, tokenizer, task, profile, reference, card, runner.

Layout (``bundle.json`` is the manifest; ``runner.py`` is a copy of ``sieve_edge/runtime.py``)::

    B/bundle.json          format sieve-edge/bundle v1: what is where, parsed task and profile
    B/runner.py            torch-free runner: `python runner.py` checks this bundle here
    B/model/               the export folder as exported (model files, tokenizer, export.json)
    B/task/<name>.toml     the task spec, copied verbatim
    B/task/test.jsonl      its test split (the runner reads this, not the TOML's [data])
    B/task/extra/<n>.jsonl its [[extra_test]] sets, scored beside the test split
    B/prompt.json          the rendered prompt frame (chat template applied at bundle time)
    B/target.toml          the target profile, copied verbatim
    B/reference.json       the dense model's metric on the same test split
    B/MODEL_CARD.md        what was pruned, how much, on what data, measured where
    B/reports/<target>/    written later by `sieve-edge validate`

The folder is built as ``B.partial-<pid>`` and renamed into place only when complete.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
from pathlib import Path

from . import __version__
from .errors import ArtifactError, InputError, TaskSpecError
from .runtime import BUNDLE_MUTABLE
from .targets import TargetProfile, load_profile

BUNDLE_FORMAT = "sieve-edge/bundle"
BUNDLE_FORMAT_VERSION = 2  # 2: bundle.json records the sha256 of every file (runtime.verify_bundle)
_SENTINEL = "\u2063SIEVE_EDGE_TEXT\u2063"  # invisible separator: survives chat templates untouched
_FORMAT_RUNTIME = {"onnx": "onnxruntime", "openvino": "openvino"}
_MODEL_FILES = {"onnx": ("model.onnx",), "openvino": ("openvino_model.xml", "openvino_model.bin")}


def read_export(export_dir) -> dict:
    """``export.json`` of an export folder, checked complete against its ``files`` sizes."""
    from .outputs import refuse_leftover

    export_dir = Path(export_dir)
    refuse_leftover(export_dir, "export folder")
    path = export_dir / "export.json"
    if not path.is_file():
        raise ArtifactError(f"{export_dir}: not an export folder (no export.json); run `sieve-edge export` first")
    try:
        export = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{path}: not UTF-8 text (byte {e.start}): a corrupt export.json") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(export, dict):
        raise ArtifactError(f"{path}: must be a JSON object, got {type(export).__name__}")
    fmt = export.get("format")
    if fmt not in _MODEL_FILES:
        raise ArtifactError(f"{path}: 'format' = {fmt!r}; allowed: {', '.join(_MODEL_FILES)}")
    for name in _MODEL_FILES[fmt] + ("tokenizer.json", "config.json"):
        if not (export_dir / name).is_file():
            raise ArtifactError(f"{export_dir}: missing {name} for a {fmt} export")
    files = export.get("files") or {}
    if not isinstance(files, dict):
        raise ArtifactError(f"{path}: 'files' must be a table of file name -> size in bytes")
    for name, size in files.items():
        f = export_dir / name
        if not f.is_file() or f.stat().st_size != size:
            raise ArtifactError(f"{export_dir}: file {name} is missing or not the size export.json records "
                                f"({size} bytes): an incomplete export")
    return export


def prompt_frame(task, tokenizer, examples=()) -> dict:
    """The prompt as literal pieces and row fields (``parts``), plus the tokenizer's special prefix ids.

    Rendered once with ``sieve_edge.tasks.build_prompt`` (chat template included), each field
    replaced by its own invisible marker, then checked: for each of ``examples`` (Examples,
    field dicts, or texts of a one-field prompt) the runner's ids must equal sieve_edge.tasks'.
    A one-``{text}`` prompt also keeps ``prefix`` / ``suffix``, the frame's earlier form.
    """
    from .tasks import _fields, build_prompt, encode_prompts, special_prefix

    fields = task.fields
    marker = {name: _SENTINEL.replace("TEXT", f"FIELD{i}") for i, name in enumerate(fields)}
    rendered = build_prompt(task, tokenizer, marker)
    parts: list[list[str]] = []
    pattern = re.compile("|".join(re.escape(m) for m in marker.values())) if marker else None
    pos = 0
    for m in (pattern.finditer(rendered) if pattern else ()):
        if m.start() > pos:
            parts.append(["text", rendered[pos:m.start()]])
        parts.append(["field", next(name for name, v in marker.items() if v == m.group())])
        pos = m.end()
    if pos < len(rendered):
        parts.append(["text", rendered[pos:]])
    want_count = [value for kind, value in task.parts if kind == "field"]
    if sorted(v for k, v in parts if k == "field") != sorted(want_count):
        raise TaskSpecError(f"{task.path}: the chat template does not keep each field of the prompt as one piece; "
                            "the torch-free runner cannot frame this prompt")
    bos = special_prefix(tokenizer)
    for example in examples:
        values = _fields(task, example)
        want = encode_prompts(tokenizer, [build_prompt(task, tokenizer, values)])[0]
        text = "".join(v if k == "text" else values[v] for k, v in parts)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        got = ids if bos and ids[:len(bos)] == bos else bos + ids
        if got != want:
            raise TaskSpecError(f"{task.path}: the rendered prompt frame does not reproduce the task's "
                                f"token ids for {text[:40]!r}; the chat template depends on the text")
    frame = {"parts": parts, "special_prefix": bos, "chat_template": task.chat_template,
             "rendered_with": f"transformers tokenizer + sieve_edge.tasks.build_prompt (sieve-edge {__version__})"}
    if fields == [task.text_field] and len(want_count) == 1:
        frame["prefix"], frame["suffix"] = rendered.split(marker[task.text_field])
    return frame


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    raise TaskSpecError(f"cannot write {value!r} ({type(value).__name__}) into the bundled task TOML")


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "-_" for c in key) and key.isascii() else json.dumps(key)


def bundled_task_toml(path, extra_files: dict[str, str] | None = None) -> str:
    """The task TOML rewritten for the bundle: same spec, [data] holding only test = "test.jsonl"
    (and how rows are drawn), each [[extra_test]] pointing at ``extra_files[name]``."""
    from .tasks import tomllib

    path = Path(path)
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    keep = ("text_field", "label_field", "sample", "seed")
    data = {k: v for k, v in (raw.get("data") or {}).items() if k in keep}
    data["test"] = "test.jsonl"
    lines = [f"# {path.name} as bundled by sieve-edge {__version__}: only the test split and extra tests are shipped."]
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in raw.items() if not isinstance(v, (dict, list))]
    for table, values in [*((k, v) for k, v in raw.items() if isinstance(v, dict) and k != "data"), ("data", data)]:
        lines += ["", f"[{_toml_key(table)}]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items()]
    for entry in raw.get("extra_test") or []:
        name = entry["name"]
        lines += ["", "[[extra_test]]", f"name = {_toml_value(name)}",
                  f"path = {_toml_value((extra_files or {}).get(name, entry['path']))}"]
    return "\n".join(lines) + "\n"


def load_reference(reference) -> dict | None:
    """A reference as a dict, from a dict or a JSON file; it must hold ``metric`` and ``value``."""
    if reference is None:
        return None
    if isinstance(reference, (str, os.PathLike)):
        path = Path(reference)
        try:
            reference = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"reference file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(reference, dict) or "metric" not in reference or "value" not in reference:
        raise InputError(f"a reference needs keys 'metric' and 'value' (the dense model's test metric), "
                         f"got {reference!r}")
    return dict(reference)


def task_fingerprint(spec) -> str:
    """sha256 of what decides a test score: kind, prompt, system, chat template flag, labels, test rows,
    prompt limit and truncation, label score, row sampling.

    A reference measured under another prompt or other test data is no reference: the
    bundle refuses it (a task file edited between the two measurements is the usual cause).
    """
    import hashlib

    decides = {
        "kind": spec.kind, "prompt": spec.prompt, "system": spec.system, "chat_template": spec.chat_template,
        "labels": spec.labels, "text_field": spec.text_field, "label_field": spec.label_field,
    }
    # keys that came later count only when set, so that earlier references keep their fingerprint
    for key, default in (("max_prompt_tokens", None), ("truncation", "left"), ("label_score", "sum"),
                         ("sample", None), ("seed", 0)):
        if getattr(spec, key) != default:
            decides[key] = getattr(spec, key)
    h = hashlib.sha256(json.dumps(decides, sort_keys=True).encode())
    h.update(Path(spec.split_path("test")).read_bytes())
    return h.hexdigest()


def dense_reference(model, task, limit: int | None = None, trust_remote_code: bool = False) -> dict:
    """Measure the dense model's metric on the task's test split (and extra tests) with torch."""
    from .models import load_model, load_tokenizer
    from .tasks import load_task

    spec = load_task(task)
    tok = load_tokenizer(model, trust_remote_code=trust_remote_code)
    m = load_model(model, trust_remote_code=trust_remote_code)
    return measure_reference(m, tok, spec, model, limit)


def measure_reference(m, tok, spec, model, limit: int | None = None) -> dict:
    """The reference record of a loaded dense model ``m`` (named ``model``): its metric on the
    test split and each extra test, with torch."""
    from .evaluate import evaluate, score_extra_tests

    result = evaluate(m, tok, spec, "test", limit=limit)
    extra = {name: {"metric": r.metric, "value": r.value, "n": r.n, "sample": r.sample}
             for name, r in score_extra_tests(m, tok, spec, limit=limit).items()}
    # a local model is named by its folder or file name: a bundle carries no path of the machine that built it
    model_name = Path(str(model)).name if os.path.exists(str(model)) else str(model)
    return {"metric": result.metric, "value": result.value, "split": "test", "n": result.n, "model": model_name,
            "sample": result.sample, "truncated": result.truncated, "extra_tests": extra,
            "measured_with": "torch (sieve_edge.evaluate), float32", "measured_at": _now(),
            "task_fingerprint": task_fingerprint(spec)}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _is_dense(export: dict) -> bool:
    source = export.get("source")
    return not source or source.get("kind") == "dense" or not source.get("ranks")


def make_bundle(export_dir, task, target, out, reference=None, card_info: dict | None = None,
                force: bool = False, log=None, trust_remote_code: bool = False) -> Path:
    """Build the bundle folder ``out`` from an export folder, a task and a target profile.

    reference: the dense model's test metric (a dict or a JSON file with ``metric`` and
    ``value``). When None and the export is of a dense fp32 model, the bundle measures its
    own model with the runner; when None for a pruned or quantized model, reference.json records that none was
    given and the metric gate of ``validate`` reports "not run" (never a pass).
    card_info: extra lines for the model card (e.g. {"calibration": "1024 train phrases"}).
    trust_remote_code: let transformers run custom code the export folder's tokenizer names
    (refused otherwise, before transformers is asked).
    """
    from transformers import AutoTokenizer

    from .filechecks import check_model_folder
    from .outputs import check_output, dir_bytes
    from .runtime import RunnerError
    from .tasks import load_examples, load_task

    log = log or (lambda msg: None)
    export_dir, out = Path(export_dir), Path(out)
    export = read_export(export_dir)
    profile = target if isinstance(target, TargetProfile) else load_profile(target)
    spec = load_task(task)
    needed = _FORMAT_RUNTIME[export["format"]]
    if profile.runtime != needed:
        raise ArtifactError(f"target '{profile.name}' runs {profile.runtime}, but {export_dir} is a "
                            f"{export['format']} export (needs runtime {needed}); export for that runtime")
    if export.get("weights") and export["weights"] != profile.weights:
        raise ArtifactError(f"target '{profile.name}' wants {profile.weights} weights, but {export_dir} holds "
                            f"{export['weights']} weights; export with --weights {profile.weights}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / "bundle.json").is_file():
            raise ArtifactError(f"output folder '{out}' exists and is not a bundle (no bundle.json)")
        if not force:
            raise ArtifactError(f"bundle '{out}' already exists; pass --force to replace it")
    check_output(out, "bundle", force=force, expected_bytes=dir_bytes(export_dir))  # leftovers, writable, room
    reference = load_reference(reference)
    fingerprint = task_fingerprint(spec)
    if reference is not None and reference.get("task_fingerprint", fingerprint) != fingerprint:
        raise InputError(f"the reference was measured on another version of task '{spec.name}' (its prompt, "
                         f"labels or test data differ from {spec.path}); measure it again (--reference-model)")

    check_model_folder(export_dir, trust_remote_code, "export folder")
    # trust_remote_code explicit: left out, transformers asks on stdin whether to run custom code
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir), trust_remote_code=trust_remote_code)
    examples = load_examples(spec, "test")
    frame = prompt_frame(spec, tokenizer, examples[:8])

    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        log(f"assembling {partial}")
        shutil.copytree(export_dir, partial / "model")
        (partial / "task").mkdir()
        task_file = f"task/{spec.path.name}"
        shutil.copy2(spec.split_path("test"), partial / "task" / "test.jsonl")
        extra_files = {}
        for name, path in spec.extra_tests.items():  # scored beside the test split by the runner
            extra_files[name] = f"extra/{name}.jsonl"
            (partial / "task" / "extra").mkdir(exist_ok=True)
            shutil.copy2(path, partial / "task" / extra_files[name])
        (partial / task_file).write_text(bundled_task_toml(spec.path, extra_files), encoding="utf-8")
        load_task(partial / task_file)  # the rewritten spec must still be a valid task
        shutil.copy2(profile.path, partial / "target.toml")
        _write_json(partial / "prompt.json", frame)
        shutil.copy2(Path(__file__).with_name("runtime.py"), partial / "runner.py")
        from .tasks import tomllib

        manifest = {
            "format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION,
            "created_by": f"sieve-edge {__version__}", "created_at": _now(),
            "model_dir": "model", "model_format": export["format"], "weights": export.get("weights"),
            "task": task_file, "task_name": spec.name, "test_data": "task/test.jsonl",
            "n_test": len(examples), "target": "target.toml", "target_name": profile.name,
            "prompt_frame": "prompt.json", "reference": "reference.json", "runner": "runner.py",
            "model_card": "MODEL_CARD.md",
            # parsed copies, for runners on Pythons without tomllib
            "task_spec": tomllib.loads((partial / task_file).read_text(encoding="utf-8")),
            "target_profile": tomllib.loads(Path(profile.path).read_text(encoding="utf-8")),
            "card_info": card_info or {},
            # where the data came from, without the builder's paths: only the test split ships
            "task_data": {split: ("task/test.jsonl" if split == "test" else
                                  f"{Path(path).name} (sha256 {_sha256(Path(path))[:16]}, not bundled)")
                          for split, path in spec.data.items()},
        }
        _write_json(partial / "bundle.json", manifest)
        if reference is None and _is_dense(export) and export.get("weights", "fp32") == "fp32":
            log("measuring the dense reference with the runner")
            from .runtime import run_bundle

            try:
                m = run_bundle(partial, decode_tokens=0)
            except RunnerError as e:  # name the user's file, not its copy in the partial folder
                why = str(e).replace(str(partial / "model"), str(export_dir))
                raise ArtifactError(f"measuring the dense reference of {export_dir} failed: {why}") from None
            extra = {name: {"metric": x["metric"], "value": x["value"], "n": x["n_examples"], "sample": x["sample"]}
                     for name, x in (m.get("extra_tests") or {}).items()}
            reference = {"metric": m["metric"], "value": m["value"], "split": "test", "n": m["n_examples"],
                         "sample": m.get("sample"), "truncated": m.get("truncated"), "extra_tests": extra,
                         "measured_with": f"this bundle's dense model, {m['runtime']} {m['runtime_version']} "
                                          f"({m['inference_precision']})", "measured_at": _now(),
                         "task_fingerprint": fingerprint}
        if reference is None:  # pruned or quantized: its own score is no reference
            reference = {"metric": spec.metric, "value": None,
                         "note": "no dense reference was given (--reference or --reference-model); "
                                 "the metric-drop gate cannot be checked"}
        _write_json(partial / "reference.json", reference)
        _write_card(partial, manifest, export, reference, spec)
        shipped = [f for f in sorted(partial.rglob("*")) if f.is_file() and f.name != "bundle.json"]
        manifest["files"] = {f.relative_to(partial).as_posix(): f.stat().st_size for f in shipped}
        # what runner.py and validate check before loading anything (MODEL_CARD.md: validate rewrites it)
        manifest["sha256"] = {f.relative_to(partial).as_posix(): _sha256(f) for f in shipped
                              if f.relative_to(partial).as_posix() not in BUNDLE_MUTABLE}
        _write_json(partial / "bundle.json", manifest)
        _replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log(f"bundle written to {out}")
    return out


def _sha256(path: Path) -> str:
    from .runtime import file_sha256

    return file_sha256(path)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")


def _write_card(folder: Path, manifest: dict, export: dict, reference: dict, spec) -> None:
    from .report import model_card

    text = model_card(manifest, export, reference, reports=[])
    (folder / "MODEL_CARD.md").write_text(text, encoding="utf-8")


def _replace(partial: Path, out: Path) -> None:
    """Rename ``partial`` to ``out``; an existing ``out`` (a bundle, checked) is moved aside first."""
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, out)


def read_bundle(bundle) -> dict:
    """``bundle.json`` of a bundle folder, after checking every file against its sha256
    (``runtime.verify_bundle``: missing, modified or extra files are an ``ArtifactError``)."""
    from .outputs import refuse_leftover
    from .runtime import RunnerError, verify_bundle

    bundle = Path(bundle)
    refuse_leftover(bundle, "bundle")
    path = bundle / "bundle.json"
    if not path.is_file():
        raise ArtifactError(f"{bundle}: not a bundle (no bundle.json); build one with `sieve-edge bundle`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{path}: not UTF-8 text (byte {e.start}): a corrupt bundle.json; rebuild the "
                            "bundle") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e}): a corrupt bundle.json; rebuild the bundle") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: must be a JSON object, got {type(manifest).__name__}; rebuild the bundle")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ArtifactError(f"{path}: format {manifest.get('format')!r} is not {BUNDLE_FORMAT}")
    missing = [k for k in ("model_dir", "model_format", "task", "test_data", "target", "prompt_frame", "reference")
               if not isinstance(manifest.get(k), str)]
    if missing:
        raise ArtifactError(f"{path}: missing or non-string key(s) {', '.join(missing)}; rebuild the bundle")
    try:
        verify_bundle(bundle, manifest)
    except RunnerError as e:
        raise ArtifactError(str(e)) from None
    return manifest
