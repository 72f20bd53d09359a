"""Outputs checked before the work, leftovers of killed writes, file checks, bundle integrity."""
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

import bad_inputs as B
from sieve_edge import outputs
from sieve_edge.errors import ArtifactError, ModelLoadError
from sieve_edge.filechecks import check_gguf, check_safetensors, custom_code_entries
from sieve_edge.outputs import check_output, check_room, clean_leftovers, refuse_leftover


# ---------------------------------------------------------------- leftovers


def test_dead_writers_leftovers_are_cleaned_and_live_ones_refused(tmp_path):
    out, dead = tmp_path / "ckpt", B.dead_pid()
    for what in ("partial", "final"):
        (tmp_path / f"ckpt.{what}-{dead}").mkdir()
        (tmp_path / f"ckpt.{what}-{dead}" / "config.json").write_text("{}")
    (tmp_path / f"other.partial-{dead}").mkdir()              # another output's: not ours to touch
    live = tmp_path / f"ckpt.partial-{os.getppid()}"
    live.mkdir()
    with pytest.raises(ArtifactError, match=f"in use: process {os.getppid()} is writing it"):
        check_output(out, "checkpoint")
    live.rmdir()
    assert check_output(out, "checkpoint") == out
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"other.partial-{dead}"]


def test_a_swap_cut_between_its_renames_puts_the_old_artifact_back(tmp_path):
    out, dead = tmp_path / "ckpt", B.dead_pid()
    old = tmp_path / f"ckpt.old-{dead}"
    old.mkdir()
    (old / "sieve_edge.json").write_text("{}")
    (tmp_path / f"ckpt.partial-{dead}").mkdir()
    assert clean_leftovers(out) == [tmp_path / f"ckpt.partial-{dead}"]
    assert (out / "sieve_edge.json").is_file() and not old.exists()
    with pytest.raises(ArtifactError, match="already holds checkpoint; pass --force"):
        check_output(out, "checkpoint")


def test_leftovers_are_refused_as_inputs(tmp_path):
    dead = B.dead_pid()
    folder = tmp_path / f"tuned.partial-{dead}"
    with pytest.raises(ArtifactError, match=f"unfinished write of '.*tuned'.*process {dead}.*is gone"):
        refuse_leftover(folder / "model.gguf", "model path")
    with pytest.raises(ArtifactError, match="still running"):
        refuse_leftover(tmp_path / f"search.final-{os.getpid()}", "export source")
    refuse_leftover(tmp_path / "tuned.partial", "model path")       # no pid: an ordinary name
    refuse_leftover(tmp_path / "my.old-model", "model path")


def test_a_rerun_after_a_killed_prune_cleans_its_leftovers(tmp_path):
    """The state a SIGKILL during the final write leaves (partial and final folders of a dead
    pid); the rerun of the same command finishes and removes them."""
    model, task = B.write_model(tmp_path / "m"), B.write_task(tmp_path / "t")
    out, dead = tmp_path / "pruned", B.dead_pid()
    shutil.copytree(model, tmp_path / f"pruned.partial-{dead}")       # complete-looking, but unfinished
    (tmp_path / f"pruned.final-{dead}").mkdir()
    result = CliRunner().invoke(main_cli(), ["prune", "--model", str(model), "--task", str(task), "--keep", "0.5",
                                             "--calibration", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "sieve_edge.json").is_file() and B.leftovers_of(out) == []


def main_cli():
    from sieve_edge.cli import main

    return main


# ---------------------------------------------------------------- writable, room


def test_outputs_that_cannot_be_written_fail_before_the_work(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="exists and is not a folder"):
        check_output(tmp_path / "file", "export")
    with pytest.raises(ArtifactError, match="'.*file' is a file, not a folder"):
        check_output(tmp_path / "file" / "deeper" / "out", "export")
    ro = B.read_only_folder()
    if ro is not None:  # tests run as root: a 0555 folder would not stop us, sysfs does
        with pytest.raises(ArtifactError, match="cannot be written"):
            check_output(ro / "out", "export")
    assert check_output(tmp_path / "new" / "deeper", "export", expected_bytes=1000) == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # the probe leaves nothing behind
    monkeypatch.setattr(outputs, "free_bytes", lambda path: 5 * 2**20)
    with pytest.raises(ArtifactError, match="needs about 11 MB, but the disk .* has 5.00 MB free"):
        check_output(tmp_path / "big", "export", expected_bytes=10 * 2**20)
    check_room(tmp_path / "small", 2**20)


# ---------------------------------------------------------------- file checks


def _safetensors(path, tensors: dict, header_extra: bytes = b""):
    import numpy as np
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path))
    return path


def test_safetensors_checks_name_what_is_wrong(tmp_path):
    f = _safetensors(tmp_path / "ok.safetensors", {"a": [[1, 2], [3, 4]], "b": [5.0]})
    check_safetensors(f)
    data = f.read_bytes()
    n, = struct.unpack("<Q", data[:8])
    cases = {
        "short": (data[:5], "too short"),
        "header-cut": (data[:8 + n // 2], "exceeds the"),
        "data-cut": (data[:-2], "past the end"),
        "not-utf8": (data[:8] + b"\xff" * n + data[8 + n:], "not UTF-8"),
        "not-json": (data[:8] + b"{" * n + data[8 + n:], "not valid JSON"),
    }
    for name, (content, match) in cases.items():
        g = tmp_path / f"{name}.safetensors"
        g.write_bytes(content)
        with pytest.raises(ModelLoadError, match=match):
            check_safetensors(g)
    header = json.loads(data[8:8 + n])
    header["a"]["shape"] = [3, 3]  # 36 bytes claimed, 16 stored
    raw = json.dumps(header).encode().ljust(n)
    (tmp_path / "shape.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(ModelLoadError, match="should take 36 bytes"):
        check_safetensors(tmp_path / "shape.safetensors")


def test_gguf_checks_find_every_cut(tmp_path):
    whole = B.write_gguf(tmp_path / "m.gguf", tensor_mb=0.25).read_bytes()
    check_gguf(tmp_path / "m.gguf")
    for cut in (0, 23, 24, 40, 200, len(whole) // 2, len(whole) - 1):
        (tmp_path / "cut.gguf").write_bytes(whole[:cut])
        with pytest.raises(ModelLoadError, match="not a complete GGUF file"):
            check_gguf(tmp_path / "cut.gguf")
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + whole[4:])
    with pytest.raises(ModelLoadError, match="bad magic"):
        check_gguf(tmp_path / "magic.gguf")


def test_custom_code_entries_in_any_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert custom_code_entries(tmp_path) == []
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["x.Tok", None]}}))
    assert custom_code_entries(tmp_path) == [(tmp_path / "tokenizer_config.json", 'AutoTokenizer -> ["x.Tok", null]')]


# ---------------------------------------------------------------- bundle integrity


def test_bundle_records_every_files_sha256_and_no_builder_path():
    import test_bundle

    from sieve_edge.bundle import read_bundle

    b = test_bundle.tiny_bundle("onnx")
    manifest = read_bundle(b)
    assert manifest["format_version"] == 2
    shipped = {f.relative_to(b).as_posix() for f in b.rglob("*") if f.is_file()} - {"bundle.json"}
    assert set(manifest["sha256"]) == shipped - {"MODEL_CARD.md"}
    assert all(len(h) == 64 for h in manifest["sha256"].values())
    assert manifest["task_data"] == {"test": "task/test.jsonl"}
    text = (b / "bundle.json").read_text() + (b / "reference.json").read_text()
    assert str(test_bundle._ROOT) not in text  # the builder's folders stay on the builder


def test_validate_output_and_the_card_do_not_break_verification(tmp_path):
    import test_bundle

    from sieve_edge.runtime import verify_bundle

    b = shutil.copytree(test_bundle.tiny_bundle("onnx"), tmp_path / "b")
    (b / "reports" / "kiosk").mkdir(parents=True)
    (b / "reports" / "kiosk" / "report.json").write_text("{}")
    (b / "MODEL_CARD.md").write_text("rewritten by validate")
    (b / "result.json").write_text("{}")  # `python runner.py --json result.json` run inside the bundle
    verify_bundle(b)
    from sieve_edge.runtime import RunnerError

    for extra in ("task/more.jsonl", "sitecustomize.py", "reports/../evil.pth"):
        f = b / extra
        f.write_text("")
        with pytest.raises(RunnerError, match=f"{Path(extra).name} is not part of the bundle"):
            verify_bundle(b)
        f.unlink()


def test_validate_never_runs_the_bundles_own_runner(tmp_path):
    """Even a runner.py that matches bundle.json (the bundle was built with it) is not what
    validate runs: it runs the package's runner against the bundle."""
    import test_bundle

    from sieve_edge.validate import validate

    b = shutil.copytree(test_bundle.tiny_bundle("onnx"), tmp_path / "b")
    marker = tmp_path / "BUNDLE_RUNNER_RAN"
    text = (b / "runner.py").read_text()
    (b / "runner.py").write_text(text.replace("\nimport argparse\n", f"\nimport argparse\nimport pathlib\n"
                                              f"pathlib.Path({str(marker)!r}).write_text('ran')\n", 1))
    assert str(marker) in (b / "runner.py").read_text()
    B.rehash(b)
    report = validate(b, test_bundle.write_profile(tmp_path, "onnxruntime"))
    assert report.status == "pass", report.message()
    assert not marker.exists()
