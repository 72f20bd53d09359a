"""Issue 16: every bad or hostile input a user can give ends in one clear error line.

The cases and their fixtures live in ``tests/bad_inputs.py`` (``benchmarks/robustness.py``
runs the same cases as subprocesses). Each one is a real file or folder; each must exit 1
(3 for a failed gate) with exactly one stderr line starting ``error:`` that names the file,
key or row, no traceback, and no output left that a later command would take as complete.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import bad_inputs as B
from sieve_edge import outputs
from sieve_edge import runtime as rt
from sieve_edge.cli import main

REPO = Path(__file__).resolve().parents[1]
# Every case build_cases makes (checked below, so that a case cannot silently drop out).
CASE_IDS = [
    "task-missing", "task-malformed-toml", "task-typo-key", "task-wrong-type", "task-not-utf8", "task-empty",
    "data-truncated-last-line", "data-row-not-object", "data-missing-field", "data-wrong-type", "data-empty-file",
    "data-undeclared-label", "data-not-utf8",
    "profile-missing", "profile-malformed", "profile-typo-key", "profile-wrong-type", "profile-not-utf8",
    "profile-empty", "profile-not-utf8-run",
    "model-missing", "model-not-a-model", "model-unsupported-architecture", "model-truncated-safetensors",
    "model-garbage-safetensors-header", "checkpoint-truncated-safetensors", "gguf-empty", "gguf-cut-30-bytes",
    "gguf-cut-1-mb", "auto-map-plain-folder", "auto-map-checkpoint", "auto-map-export-tokenizer",
    "export-corrupt-model-onnx",
    "plan-list", "plan-shapes-as-strings", "plan-rank-too-large", "plan-keep-above-one", "plan-keep-zero",
    "plan-unknown-matrix", "plan-malformed-json", "plan-not-utf8",
    "bundle-file-deleted", "bundle-model-bit-flipped", "bundle-runner-edited-same-size", "bundle-extra-model-file",
    "bundle-not-a-bundle", "bundle-corrupt-bundle-json", "bundle-corrupt-model-onnx", "bundle-corrupt-openvino-ir",
    "bundle-test-data-not-utf8", "bundle-auto-map-validate-task", "runner-test-data-not-utf8", "runner-model-bit-flipped", "runner-module-dropped-in",
    "bundle-runner-module-dropped-in",
    "out-existing-file", "out-under-a-file", "out-folder-of-other-things", "out-validate-reports-under-a-file",
    "out-read-only-filesystem", "out-disk-full",
    "leftover-partial-as-model", "leftover-final-as-export-source", "leftover-partial-as-bundle-source",
    "gate-impossible-size-budget",
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return {c.id: c for c in B.build_cases(tmp_path_factory.mktemp("bad-inputs"))}


def test_the_case_list_is_complete(cases):
    optional = {"out-read-only-filesystem"}  # only where a folder exists that root cannot write
    assert set(cases) - set(CASE_IDS) == set()
    assert set(CASE_IDS) - set(cases) <= optional
    assert len(cases) >= 40


def run(case: B.Case, monkeypatch, capsys) -> tuple[int, str]:
    """Run one case in this process (subprocess for `python BUNDLE/runner.py`); return (exit code, stderr)."""
    if case.tool == "cli":
        if case.patch == "full_disk":
            monkeypatch.setattr(outputs, "free_bytes", lambda path: 0)
        result = CliRunner().invoke(main, case.argv)
        # anything but SystemExit would mean an exception escaped handle_errors
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        return result.exit_code, result.stderr
    if case.tool == "runner":
        code = rt.main(case.argv)
        return code, capsys.readouterr().err
    proc = subprocess.run([sys.executable, str(Path(case.argv[0]) / "runner.py")], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300, cwd=case.argv[0])
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_input_gets_one_clear_error(cases, case_id, monkeypatch, capsys):
    if case_id not in cases:
        pytest.skip("no folder here that root cannot write")
    case = cases[case_id]
    before = B.snapshot(case)
    code, stderr = run(case, monkeypatch, capsys)
    assert B.problems(case, code, stderr, before) == [], stderr


# ---------------------------------------------------------------- custom code and stdin


def _eval_subprocess(tmp_path, model, task, stdin_data: bytes | None, *extra):
    """`sieve-edge eval` in a child whose stdin is closed (None) or a pipe holding ``stdin_data``.

    Returns (exit code, stderr, the bytes still unread in the pipe)."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), SIEVE_EDGE_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    argv = [sys.executable, "-m", "sieve_edge", "eval", "--model", str(model), "--task", str(task), "--limit", "2",
            *extra]
    if stdin_data is None:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300,
                              preexec_fn=lambda: os.close(0))
        return proc.returncode, proc.stderr, None
    read_end, write_end = os.pipe()
    os.write(write_end, stdin_data)
    os.close(write_end)  # the child sees "y\n" then end of file
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, stdin=read_end)
        os.set_blocking(read_end, False)
        try:
            left = os.read(read_end, 100)
        except BlockingIOError:
            left = b""
    finally:
        os.close(read_end)
    return proc.returncode, proc.stderr, left


def test_custom_code_never_runs_and_stdin_is_never_read(tmp_path):
    """The issue's case: a checkpoint whose config.json names custom code (the plain-folder and
    export cases run in process in the table above, with the same marker check)."""
    model = B.write_checkpoint(tmp_path / "m")
    marker = B.add_auto_map(model, marker=tmp_path / "MARKER")
    task = B.write_task(tmp_path / "task")
    code, stderr, _ = _eval_subprocess(tmp_path, model, task, None)  # stdin closed
    assert code == 1 and stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in stderr
    assert "config.json" in stderr and "auto_map" in stderr and "custom_code.CustomThing" in stderr
    assert not marker.exists()
    code, stderr, left = _eval_subprocess(tmp_path, model, task, b"y\n")  # "y" piped: nobody may read it
    assert code == 1 and "auto_map" in stderr and "Traceback" not in stderr
    assert not marker.exists()
    assert left == b"y\n"  # still in the pipe: the process never read its stdin


def test_trust_remote_code_is_what_lets_custom_code_run(tmp_path):
    model = B.write_model(tmp_path / "m")
    marker = B.add_auto_map(model, marker=tmp_path / "MARKER")
    task = B.write_task(tmp_path / "task")
    code, stderr, _ = _eval_subprocess(tmp_path, model, task, None, "--trust-remote-code")
    assert marker.exists(), stderr  # the flag reached transformers, which ran the folder's module
    assert "Traceback" not in stderr


def test_every_transformers_load_passes_trust_remote_code():
    """No from_pretrained / from_config in the package may leave trust_remote_code out (transformers would
    ask on stdin whether to run a folder's code)."""
    import re

    missing = []
    for path in (REPO / "sieve_edge").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"\.from_(pretrained|config)\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            call = text[m.start():i]
            if "trust_remote_code" not in call and "**kwargs" not in call:
                missing.append(f"{path.relative_to(REPO)}:{text.count(chr(10), 0, m.start()) + 1}")
    assert missing == []


# ---------------------------------------------------------------- internal errors


def test_an_unexpected_exception_is_one_line_and_a_log(tmp_path, monkeypatch):
    import sieve_edge.evaluate

    def boom(*args, **kwargs):
        raise ZeroDivisionError("something nobody checked")

    monkeypatch.setenv("SIEVE_EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sieve_edge.evaluate, "evaluate", boom)
    model, task = B.write_model(tmp_path / "m"), B.write_task(tmp_path / "t")
    result = CliRunner().invoke(main, ["eval", "--model", str(model), "--task", str(task)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("internal error: ZeroDivisionError: something nobody checked")
    assert "Traceback" not in result.output
    log = Path(lines[0].rsplit("details in ", 1)[1].rstrip(")"))
    assert log.parent == tmp_path / "cache" / "logs"
    text = log.read_text()
    assert "Traceback" in text and "ZeroDivisionError" in text and "boom" in text


def test_click_usage_errors_are_left_to_click(tmp_path):
    result = CliRunner().invoke(main, ["eval", "--model"])
    assert result.exit_code == 2 and "internal error" not in result.output


# ---------------------------------------------------------------- plans fail before calibration


@pytest.mark.parametrize("case_id", ["plan-unknown-matrix", "plan-rank-too-large", "plan-keep-above-one"])
def test_bad_plans_fail_before_calibration(cases, case_id, monkeypatch):
    import sieve_edge.tasks

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration started with a bad plan")

    monkeypatch.setattr(sieve_edge.tasks, "calibration_batches", no_calibration)
    result = CliRunner().invoke(main, cases[case_id].argv)
    assert result.exit_code == 1 and result.stderr.startswith("error: "), result.output


def test_a_good_plan_file_prunes(cases, tmp_path):
    from sieve_edge.factorize import linear_shapes
    from sieve_edge.plan import RankPlan
    from tiny import make_model

    plan = tmp_path / "plan.json"
    RankPlan.from_keep(linear_shapes(make_model("llama")), 0.5).to_json(plan)
    argv = cases["plan-list"].argv
    model, task = argv[argv.index("--model") + 1], argv[argv.index("--task") + 1]
    result = CliRunner().invoke(main, ["prune", "--model", model, "--task", task, "--plan", str(plan),
                                       "--calibration", "4", "--out", str(tmp_path / "pruned")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "pruned" / "sieve_edge.json").read_text())["ranks"]


# ---------------------------------------------------------------- the benchmark's bookkeeping


def test_robustness_benchmark_digest_ignores_timestamps_only(tmp_path):
    import shutil

    import test_bundle
    from benchscripts import load_benchmark

    bench = load_benchmark("robustness")
    b = shutil.copytree(test_bundle.tiny_bundle("onnx"), tmp_path / "b")
    digest = bench.bundle_digest(b)
    ref = json.loads((b / "reference.json").read_text())
    ref["measured_at"] = "2000-01-01T00:00:00Z"
    (b / "reference.json").write_text(json.dumps(ref))
    manifest = json.loads((b / "bundle.json").read_text())
    manifest["created_at"] = "2000-01-01T00:00:00Z"
    (b / "bundle.json").write_text(json.dumps(manifest))
    assert bench.bundle_digest(b) == digest
    B.flip_bit(b / "model" / "model.onnx")
    B.rehash(b)
    assert bench.bundle_digest(b) != digest
    (tmp_path / f"x.partial-{B.dead_pid()}").mkdir()
    (tmp_path / "report.json.tmp-12").write_text("")
    assert sorted(Path(p).name for p in bench.leftovers_under(tmp_path)) == ["report.json.tmp-12",
                                                                            next(tmp_path.glob("x.partial-*")).name]
