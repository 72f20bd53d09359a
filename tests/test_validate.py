"""validate: a child process per profile, every gate applied, reports written, exit codes."""
import json
import os
import shutil

import pytest
from click.testing import CliRunner

from sieve_edge.cli import main
from sieve_edge.errors import GateFailure
from sieve_edge.targets import load_profile
from sieve_edge.validate import ValidationReport, apply_gates, validate
from test_bundle import tiny_bundle, write_profile


def _copy(bundle, tmp_path):
    """A private copy: validate writes reports/ and refreshes MODEL_CARD.md inside the bundle."""
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


@pytest.mark.parametrize("fmt, runtime", [("onnx", "onnxruntime"), ("openvino", "openvino")])
def test_validate_end_to_end_in_child(tmp_path, fmt, runtime):
    bundle = _copy(tiny_bundle(fmt), tmp_path)
    extra = "cpu_affinity = [0]" if hasattr(os, "sched_setaffinity") else ""
    report = validate(bundle, write_profile(tmp_path, runtime, extra=extra))
    assert report.status == "pass", report.message()
    report.check()
    m = report.measurement
    assert m["pid"] != os.getpid()                       # measured in a child process
    assert m["runtime"] == runtime and m["threads"] == 1 and m["inference_precision"] == "f32"
    if extra:
        assert m["host"]["cpu_affinity"] == [0]
    assert {g["budget_key"] for g in report.gates} == {
        "max_metric_drop", "max_first_token_ms", "max_token_ms", "max_example_ms", "max_peak_memory_mb", "max_size_mb"}
    out = bundle / "reports" / f"test-{runtime}"
    data = json.loads((out / "report.json").read_text())
    assert data["status"] == "pass" and data["measurement"]["metric"] == "accuracy"
    md = (out / "report.md").read_text()
    assert "| status | **PASS** |" in md and "precision hint f32" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2
    assert f"| test-{runtime} | pass |" in (bundle / "MODEL_CARD.md").read_text()


def test_missed_budget_exits_3_and_says_by_how_much(tmp_path):
    bundle = _copy(tiny_bundle("onnx"), tmp_path)
    prof = write_profile(tmp_path, "onnxruntime", name="too-small", max_size_mb=0.001)
    result = CliRunner().invoke(main, ["validate", "--bundle", str(bundle), "--target", str(prof),
                                       "--out", str(tmp_path / "r")])
    assert result.exit_code == 3, result.output
    assert "size on disk FAIL: model size" in result.output and "exceeds 0.001 MB by" in result.output
    assert json.loads((tmp_path / "r" / "report.json").read_text())["status"] == "fail"


def test_gate_logic_one_missed_budget():
    profile = load_profile("kiosk")
    m = {"metric": "accuracy", "value": 0.90, "n_examples": 100, "peak_rss_mb": 200.0, "size_mb": 90.0,
         "latency": {"first_token_ms": {"p50": 50.0, "p90": 60.0}, "token_ms": {"p50": 20.0, "p90": 25.0},
                     "example_ms": {"p50": 100.0, "p90": 200.0}}}  # kiosk allows 180 ms per example
    gates, status = apply_gates(m, profile, {"metric": "accuracy", "value": 0.91, "n": 100})
    assert status == "fail"
    failed = [g for g in gates if g["status"] == "fail"]
    assert [g["budget_key"] for g in failed] == ["max_example_ms"]
    report = ValidationReport(target="kiosk", bundle="b", status=status, gates=gates, profile=profile.to_dict())
    with pytest.raises(GateFailure) as e:
        report.check()
    assert e.value.exit_code == 3
    assert "per example FAIL: p90 per example 200.0 ms exceeds 180 ms by 20.0 ms (+11%)" in str(e.value)


def test_device_absent_is_not_run_never_pass(tmp_path):
    bundle = _copy(tiny_bundle("openvino"), tmp_path)
    prof = write_profile(tmp_path, "openvino", name="npu-box", extra='device = "npu"')
    report = validate(bundle, prof)
    assert report.status == "not run" and report.measurement is None
    assert all(g["status"] == "not run" and "device absent" in g["detail"] for g in report.gates)
    with pytest.raises(GateFailure, match="NOT RUN"):
        report.check()
    assert "not run: device absent" in (bundle / "reports" / "npu-box" / "report.md").read_text()


def test_other_architecture_is_an_error(tmp_path):
    # another CPU's kernels do not run here: no report from the host's kernels (see test_emulate.py)
    from sieve_edge.errors import InputError

    bundle = _copy(tiny_bundle("onnx"), tmp_path)
    other = "x86_64" if os.uname().machine in ("aarch64", "arm64") else "aarch64"
    with pytest.raises(InputError, match=f"is for {other} CPUs"):
        validate(bundle, write_profile(tmp_path, "onnxruntime", name="panel", extra=f'arch = "{other}"'))
    assert not (bundle / "reports").exists()


def test_cli_errors_exit_1(tmp_path):
    result = CliRunner().invoke(main, ["validate", "--bundle", str(tmp_path), "--target", "kiosk"])
    assert result.exit_code == 1 and "not a bundle" in result.output
    result = CliRunner().invoke(main, ["validate", "--bundle", str(tiny_bundle("onnx")), "--target", "factory-pc"])
    assert result.exit_code == 1 and "runs openvino" in result.output


def test_other_task_has_no_reference(tmp_path):
    from test_bundle import write_task

    bundle = _copy(tiny_bundle("onnx"), tmp_path)
    task = write_task(tmp_path / "other", chat=False, name="plain")
    report = validate(bundle, write_profile(tmp_path, "onnxruntime"), task=task, out=tmp_path / "r")
    assert report.measurement["task"] == "plain"
    by = {g["budget_key"]: g["status"] for g in report.gates}
    assert by["max_metric_drop"] == "not run" and by["max_size_mb"] == "pass"
