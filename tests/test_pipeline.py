"""`sieve-edge run` end to end on a tiny model: stage order, skipping, redoing half-written output."""
import json

import pytest
from click.testing import CliRunner

from sieve_edge.cli import main
from sieve_edge.errors import ArtifactError
from sieve_edge.pipeline import run
from test_bundle import write_profile
from test_search import write_task
from tiny import make_model, make_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    model_dir = root / "model"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    task = write_task(root / "task")
    # generous budgets: this test is about the stages, not about a tiny random model's speed
    profile = write_profile(root / "targets", "onnxruntime", name="tiny-target", max_metric_drop=1.0)
    return root, model_dir, task, profile


def _run(setup, out, **kw):
    root, model_dir, task, profile = setup
    return run(str(model_dir), str(task), str(profile), out, strategy="uniform", n_calibration=32,
               val_limit=None, **kw)


def test_run_then_rerun_skips_done_stages_and_redoes_broken_ones(setup):
    root = setup[0]
    out = root / "bundle"
    first = _run(setup, out)
    assert [s.name for s in first.stages] == ["search", "export", "reference", "bundle", "validate"]
    assert all(s.status == "done" for s in first.stages[:-1])
    assert first.report["status"] == "pass", first.stages[-1].detail
    assert (out / "bundle.json").is_file() and (out / "runner.py").is_file()

    second = _run(setup, out)
    assert [s.status for s in second.stages[:-1]] == ["skipped (done)"] * 4

    # a half-written export (a listed file missing) is redone, and what depends on it is not skipped wrongly
    export = root / "bundle.work" / "export-onnx-fp32"
    listed = json.loads((export / "export.json").read_text())["files"]
    (export / sorted(listed)[0]).unlink()
    third = _run(setup, out)
    status = {s.name: s.status for s in third.stages}
    assert status["search"] == "skipped (done)" and status["export"] == "done"

    # changed inputs (another tolerance) rerun the search
    fourth = _run(setup, out, tolerance=0.2)
    assert {s.name: s.status for s in fourth.stages}["search"] == "done"


def test_run_refuses_an_output_holding_something_else(setup, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="choose another --out"):
        _run(setup, out)


def test_cli_run_exit_code_3_when_a_gate_fails(setup, tmp_path):
    root, model_dir, task, _ = setup
    strict = write_profile(tmp_path, "onnxruntime", name="strict", max_metric_drop=1.0, max_size_mb=0.0001)
    result = CliRunner().invoke(main, ["run", "--model", str(model_dir), "--task", str(task), "--target", str(strict),
                                       "--out", str(tmp_path / "b"), "--strategy", "uniform", "--calibration", "32"])
    assert result.exit_code == 3, result.output
    assert "max_size_mb" in result.output or "size" in result.output


def test_two_targets_share_one_work_folder(setup, tmp_path):
    root, model_dir, task, _ = setup
    work = tmp_path / "shared.work"
    ov = write_profile(tmp_path / "t", "openvino", name="ov-target", max_metric_drop=1.0)
    first = _run(setup, tmp_path / "ort-bundle", work=work)
    assert first.report["status"] == "pass", first.stages[-1].detail
    second = run(str(model_dir), str(task), str(ov), tmp_path / "ov-bundle", strategy="uniform", n_calibration=32,
                 val_limit=None, work=work)
    status = {s.name: s.status for s in second.stages}
    assert status["search"] == "skipped (done)" and status["reference"] == "skipped (done)"
    assert status["export"] == "done" and status["bundle"] == "done"
    manifest = json.loads((tmp_path / "ov-bundle" / "bundle.json").read_text())
    assert manifest["model_format"] == "openvino" and manifest["target_name"] == "ov-target"
    assert (tmp_path / "ort-bundle" / "bundle.json").is_file()   # the first target's bundle is untouched
    # each format keeps its export: going back to the first target redoes nothing but validation
    again = _run(setup, tmp_path / "ort-bundle", work=work)
    assert [s.status for s in again.stages[:-1]] == ["skipped (done)"] * 4
    with pytest.raises(Exception, match="must not be the bundle folder"):
        _run(setup, tmp_path / "x", work=tmp_path / "x" / "inside")


def test_run_for_another_architecture_builds_the_bundle_and_leaves_validation_not_run(setup, tmp_path):
    import platform

    root, model_dir, task, _ = setup
    other = "x86_64" if platform.machine().lower() in ("aarch64", "arm64") else "aarch64"
    panel = write_profile(tmp_path, "onnxruntime", name="panel", extra=f'arch = "{other}"', max_metric_drop=1.0)
    summary = run(str(model_dir), str(task), str(panel), tmp_path / "panel-bundle", strategy="uniform",
                  n_calibration=32, val_limit=None, work=root / "bundle.work")   # the first test's stages, reused
    assert (tmp_path / "panel-bundle" / "bundle.json").is_file() and summary.report is None
    last = summary.stages[-1]
    assert (last.name, last.status) == ("validate", "not run")
    assert f"is for {other}" in last.detail and "python runner.py" in last.detail
    if other == "aarch64":
        assert "--emulate" in last.detail
