"""Bundles: layout, reference, model card, atomicity. Also the tiny exports / tasks / profiles
that test_runtime.py and test_validate.py reuse (built once per test session)."""
import atexit
import filecmp
import functools
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from sieve_edge import bundle as bundle_mod
from sieve_edge.bundle import make_bundle, read_bundle
from sieve_edge.errors import ArtifactError

ROWS = [
    ("a charming and moving film", "positive"), ("a dull , boring and tedious mess", "negative"),
    ("the movie was great", "positive"), ("boring", "negative"), ("a great film , charming", "positive"),
    ("a tedious mess", "negative"), ("moving and great", "positive"), ("dull", "negative"),
]
_ROOT = Path(tempfile.mkdtemp(prefix="sieve-edge-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)


@functools.lru_cache(maxsize=None)
def tiny_export(fmt: str = "onnx", arch: str = "llama") -> Path:
    """A tiny random model exported with optimum (KV cache) + tokenizer + a minimal export.json."""
    from tiny import make_model, make_tokenizer

    out = _ROOT / f"export-{fmt}-{arch}"
    model, tok = make_model(arch), make_tokenizer()
    if fmt == "onnx":
        from optimum.exporters.onnx import onnx_export_from_model

        onnx_export_from_model(model, out, task="text-generation-with-past")
    else:
        from optimum.exporters.openvino import export_from_model

        export_from_model(model, out, task="text-generation-with-past", stateful=True)
    tok.save_pretrained(out)
    manifest = {"format": fmt, "weights": "fp32", "task_head": None, "source": None, "fidelity": None}
    manifest["files"] = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    (out / "export.json").write_text(json.dumps(manifest))
    return out


def write_task(folder: Path, kind: str = "classification", chat: bool = True, name: str = "tiny") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.jsonl", "w") as f:
        for text, label in ROWS:
            f.write(json.dumps({"text": text, "label": label if kind != "generation" else "great"}) + "\n")
    lines = [f'name = "{name}"', f'kind = "{kind}"', f"chat_template = {'true' if chat and kind != 'perplexity' else 'false'}"]
    if kind == "classification":
        lines += ['system = "You rate reviews."', 'prompt = "Review: {text}\\nSentiment:"',
                  "[labels]", 'negative = " negative"', 'positive = " positive"']
    elif kind == "generation":
        lines += ['prompt = "Review: {text}\\nOne word:"', "max_new_tokens = 5"]
    else:
        lines += ['prompt = "{text}"']
    lines += ["[data]", f'test = "{name}.jsonl"']
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_profile(folder: Path, runtime: str, name: str | None = None, extra: str = "", **budget) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    budget = {"max_metric_drop": 0.05, "max_first_token_ms": 5000.0, "max_token_ms": 5000.0,
              "max_example_ms": 5000.0, "max_peak_memory_mb": 8000.0, "max_size_mb": 100.0, **budget}
    name = name or f"test-{runtime}"
    text = (f'schema_version = 1\nname = "{name}"\nruntime = "{runtime}"\nweights = "fp32"\n'
            f'inference_precision = "f32"\nthreads = 1\n{extra}\n[budget]\n'
            + "".join(f"{k} = {v}\n" for k, v in budget.items() if v is not None))
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


@functools.lru_cache(maxsize=None)
def tiny_bundle(fmt: str = "onnx", kind: str = "classification") -> Path:
    """A bundle of a tiny dense export (reference measured by the runner). Do not modify it."""
    work = _ROOT / f"bundle-{fmt}-{kind}"
    task = write_task(work / "task", kind)
    profile = write_profile(work / "targets", "onnxruntime" if fmt == "onnx" else "openvino")
    return make_bundle(tiny_export(fmt), task, profile, work / "bundle")


def test_bundle_layout_and_reference():
    b = tiny_bundle("onnx")
    manifest = read_bundle(b)
    for name in ("runner.py", "MODEL_CARD.md", "reference.json", "target.toml", "prompt.json", "task/tiny.toml",
                 "task/test.jsonl", "model/model.onnx", "model/tokenizer.json", "model/export.json"):
        assert (b / name).is_file(), name
    assert filecmp.cmp(b / "runner.py", Path(bundle_mod.__file__).with_name("runtime.py"), shallow=False)
    assert manifest["model_format"] == "onnx" and manifest["target_name"] == "test-onnxruntime"
    assert manifest["task_spec"]["name"] == "tiny" and manifest["target_profile"]["runtime"] == "onnxruntime"
    ref = json.loads((b / "reference.json").read_text())
    assert ref["metric"] == "accuracy" and 0.0 <= ref["value"] <= 1.0 and ref["n"] == len(ROWS)
    frame = json.loads((b / "prompt.json").read_text())
    assert frame["prefix"].startswith("<|im_start|>system\nYou rate reviews.") and frame["suffix"].endswith("assistant\n")
    card = (b / "MODEL_CARD.md").read_text()
    assert "none (dense model)" in card and "dense reference: accuracy" in card


def test_pruned_source_card_and_missing_reference(tmp_path):
    export = tmp_path / "export"
    shutil.copytree(tiny_export("onnx"), export)
    manifest = json.loads((export / "export.json").read_text())
    manifest["source"] = {"format": "sieve-edge/checkpoint", "method": "output", "base_model": "tiny-llama",
                          "architecture": "llama", "ranks": {"model.layers.0.mlp.up_proj": 16},
                          "linear_params_dense": 1000, "linear_params": 700, "linear_param_reduction": 0.3}
    (export / "export.json").write_text(json.dumps(manifest))
    task, prof = write_task(tmp_path / "task"), write_profile(tmp_path, "onnxruntime")
    b = make_bundle(export, task, prof, tmp_path / "b", card_info={"calibration": "8 rows of tiny"})
    assert json.loads((b / "reference.json").read_text())["value"] is None  # pruned, no reference: not measured
    card = (b / "MODEL_CARD.md").read_text()
    assert "method `output`" in card and "30.0%" in card and "calibration: 8 rows of tiny" in card
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"metric": "accuracy", "value": 0.75, "n": 8, "measured_with": "torch"}))
    b = make_bundle(export, task, prof, tmp_path / "b", reference=ref, force=True)
    assert json.loads((b / "reference.json").read_text())["value"] == 0.75


def test_bundle_is_atomic(tmp_path, monkeypatch):
    task, prof = write_task(tmp_path / "task"), write_profile(tmp_path, "onnxruntime")
    ref = {"metric": "accuracy", "value": 0.5}

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(bundle_mod, "_write_card", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        make_bundle(tiny_export("onnx"), task, prof, tmp_path / "b", reference=ref)
    assert not (tmp_path / "b").exists()
    assert not list(tmp_path.glob("b.partial-*"))

    monkeypatch.undo()
    b = make_bundle(tiny_export("onnx"), task, prof, tmp_path / "b", reference=ref)
    with pytest.raises(ArtifactError, match="--force"):
        make_bundle(tiny_export("onnx"), task, prof, b, reference=ref)
    # a failed replacement keeps the old, complete bundle
    monkeypatch.setattr(bundle_mod, "_write_card", boom)
    with pytest.raises(RuntimeError):
        make_bundle(tiny_export("onnx"), task, prof, b, reference=ref, force=True)
    assert read_bundle(b)["format"] == "sieve-edge/bundle"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not a bundle")
    with pytest.raises(ArtifactError, match="not a bundle"):
        make_bundle(tiny_export("onnx"), task, prof, tmp_path / "other", reference=ref, force=True)


def test_bundle_rejects_mismatch_and_incomplete_export(tmp_path):
    task = write_task(tmp_path / "task")
    with pytest.raises(ArtifactError, match="runs openvino"):
        make_bundle(tiny_export("onnx"), task, write_profile(tmp_path, "openvino"), tmp_path / "b")
    with pytest.raises(ArtifactError, match="int8 weights"):
        make_bundle(tiny_export("onnx"), task, "kiosk", tmp_path / "b")
    export = tmp_path / "export"
    shutil.copytree(tiny_export("onnx"), export)
    with open(export / "model.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(ArtifactError, match="incomplete export"):
        make_bundle(export, task, write_profile(tmp_path, "onnxruntime"), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_bundled_task_toml_round_trips(tmp_path):
    import tomllib

    from sieve_edge.bundle import bundled_task_toml

    src = tmp_path / "t.toml"
    src.write_text('name = "q"\nkind = "classification"\nprompt = "Say \\"{text}\\"\\n\\tcafé:"\nchat_template = false\n'
                   '[labels]\n"label with space" = " yes"\nno = " no"\n'
                   '[data]\ntrain = "../x/train.jsonl"\ntest = "../x/test.jsonl"\ntext_field = "body"\n')
    raw = tomllib.loads(bundled_task_toml(src))
    want = tomllib.loads(src.read_text())
    assert raw["prompt"] == want["prompt"] and raw["labels"] == want["labels"]
    assert raw["data"] == {"text_field": "body", "test": "test.jsonl"}


def test_reference_of_another_task_version_is_refused(tmp_path):
    from sieve_edge.bundle import task_fingerprint
    from sieve_edge.errors import InputError
    from sieve_edge.tasks import load_task

    task, prof = write_task(tmp_path / "task"), write_profile(tmp_path, "onnxruntime")
    ref = {"metric": "accuracy", "value": 0.5, "task_fingerprint": task_fingerprint(load_task(task))}
    make_bundle(tiny_export("onnx"), task, prof, tmp_path / "b", reference=ref)
    task.write_text(task.read_text().replace("Sentiment:", "Feeling:"))  # the prompt was edited since
    with pytest.raises(InputError, match="another version of task"):
        make_bundle(tiny_export("onnx"), task, prof, tmp_path / "b2", reference=ref)
