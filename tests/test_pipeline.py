"""`sieve-edge run` end to end on a tiny model: stage order, skipping, redoing half-written output."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sieve_edge.cli import main
from sieve_edge.errors import ArtifactError
from sieve_edge.pipeline import run
from test_bundle import write_profile
from test_search import write_task
from tiny import make_model, make_tokenizer


@pytest.fixture(scope="module", autouse=True)
def cost_table_cache(tmp_path_factory):
    """The time objective's cost tables (run's default) in a folder of this module, not the user's cache."""
    import os

    old = os.environ.get("SIEVE_EDGE_CACHE")
    os.environ["SIEVE_EDGE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("SIEVE_EDGE_CACHE", None)
    else:
        os.environ["SIEVE_EDGE_CACHE"] = old


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


SLOTS = ["calibrate", "sensitivity", "search", "fit", "refit", "export-onnx-fp32", "reference", "bundle", "validate"]


def status(summary) -> dict:
    return {s.slot: s.status for s in summary.stages}


def test_run_then_rerun_skips_done_stages_and_redoes_broken_ones(setup):
    root = setup[0]
    out = root / "bundle"
    first = _run(setup, out)
    assert [s.slot for s in first.stages] == SLOTS
    assert status(first) == {**{s: "ran" for s in SLOTS}, "sensitivity": "skipped"}
    assert "does not apply" in first.stages[1].why   # the uniform strategy needs no seeds
    assert first.report["status"] == "pass", first.stages[-1].detail
    assert (out / "bundle.json").is_file() and (out / "runner.py").is_file()

    second = _run(setup, out)
    assert [s.status for s in second.stages[:-1]] == ["skipped"] * 8
    assert second.stages[0].why == "done (key matches, output verified)"
    assert second.stages[-1].status == "ran" and "always" in second.stages[-1].why

    # a half-written export (a listed file missing) is redone, and what depends on it is not skipped wrongly
    export = root / "bundle.work" / "export-onnx-fp32"
    listed = json.loads((export / "export.json").read_text())["files"]
    (export / sorted(listed)[0]).unlink()
    third = _run(setup, out)
    assert status(third)["refit"] == "skipped" and status(third)["export-onnx-fp32"] == "ran"
    assert "output incomplete" in {s.slot: s.why for s in third.stages}["export-onnx-fp32"]
    assert status(third)["bundle"] == "ran" and "upstream export-onnx-fp32 ran" in third.stages[7].why

    # changed inputs (another tolerance) rerun the search, not the calibration
    fourth = _run(setup, out, tolerance=0.2)
    assert status(fourth)["calibrate"] == "skipped" and status(fourth)["search"] == "ran"
    assert "config settings" in {s.slot: s.why for s in fourth.stages}["search"]
    log = json.loads((root / "bundle.work" / "run.json").read_text())
    assert [s["status"] for s in log["stages"]] == [s.status for s in fourth.stages]


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


def test_cli_run_heals_the_refit_with_the_loss_and_adapters_asked(setup, tmp_path):
    root, model_dir, task, profile = setup
    args = ["run", "--model", str(model_dir), "--task", str(task), "--target", str(profile), "--out",
            str(tmp_path / "b"), "--strategy", "uniform", "--calibration", "32", "--objective", "params",
            "--heal-steps", "2", "--heal-lr", "1e-3", "--heal", "kl", "--heal-rank", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    searched = json.loads((tmp_path / "b.work" / "refit" / "search.json").read_text())
    heal = searched["heal"]
    assert heal is not None, "the plan factorized nothing: nothing to heal"
    assert (heal["loss"], heal["steps"], heal["lr"], heal["rank"]) == ("kl", 2, 1e-3, 2)


def test_two_targets_share_one_work_folder(setup, tmp_path):
    # with the parameter objective the plan is the same for every target: searched once
    root, model_dir, task, _ = setup
    work = tmp_path / "shared.work"
    ov = write_profile(tmp_path / "t", "openvino", name="ov-target", max_metric_drop=1.0)
    first = _run(setup, tmp_path / "ort-bundle", work=work, objective="params")
    assert first.report["status"] == "pass", first.stages[-1].detail
    second = run(str(model_dir), str(task), str(ov), tmp_path / "ov-bundle", strategy="uniform", n_calibration=32,
                 val_limit=None, work=work, objective="params")
    st = status(second)
    assert st["calibrate"] == st["search"] == st["refit"] == st["reference"] == "skipped"
    assert st["export-openvino-fp32"] == "ran" and st["bundle"] == "ran"
    manifest = json.loads((tmp_path / "ov-bundle" / "bundle.json").read_text())
    assert manifest["model_format"] == "openvino" and manifest["target_name"] == "ov-target"
    assert (tmp_path / "ort-bundle" / "bundle.json").is_file()   # the first target's bundle is untouched
    # each format keeps its export: going back to the first target redoes nothing but validation
    again = _run(setup, tmp_path / "ort-bundle", work=work, objective="params")
    assert [s.status for s in again.stages[:-1]] == ["skipped"] * 8
    # the time objective (run's default) prices plans on each target's runtime: searched per target
    timed = _run(setup, tmp_path / "ort-time", work=work)
    assert status(timed)["calibrate"] == "skipped" and status(timed)["search"] == "ran"
    with pytest.raises(Exception, match="must not be the bundle folder"):
        _run(setup, tmp_path / "x", work=tmp_path / "x" / "inside")


def test_run_minimises_time_per_example_by_default(setup):
    # the first test's bundle: run's default objective is the target's measured time per example
    root = setup[0]
    summary = _run(setup, root / "bundle")
    search = next(s for s in summary.stages if s.slot == "search")
    assert "ms per example" in search.detail, search.detail
    data = json.loads((root / "bundle.work" / "refit" / "search.json").read_text())
    assert data["objective"] == "time"
    t = data["time"]
    assert t["prompt_tokens"] == 32 and t["new_tokens"] == 1 and "onnxruntime fp32 MatMuls, 1 thread" in t["cost_table"]
    assert 0 < t["plan"]["example_ms"] <= t["dense"]["example_ms"]
    report = (root / "bundle.work" / "refit" / "search_report.md").read_text()
    assert "## Time per example" in report and "ms per example" in report
    # the table was measured once, on the target's runtime, and cached
    import os

    cached = json.loads((Path(os.environ["SIEVE_EDGE_CACHE"]) / "microbench.json").read_text())
    assert any(k.startswith("mm|") and "|onnxruntime " in k and "|tok32" in k for k in cached)


def test_run_objective_for_a_target_this_host_cannot_time(setup, tmp_path):
    import platform

    from sieve_edge.errors import InputError

    root, model_dir, task, _ = setup
    other = "x86_64" if platform.machine().lower() in ("aarch64", "arm64") else "aarch64"
    panel = write_profile(tmp_path, "onnxruntime", name="panel", extra=f'arch = "{other}"', max_metric_drop=1.0)
    with pytest.raises(InputError, match="--objective params"):
        run(str(model_dir), str(task), str(panel), tmp_path / "b", strategy="uniform", objective="time")
    res = CliRunner().invoke(main, ["run", "--model", str(model_dir), "--task", str(task), "--target", str(panel),
                                    "--out", str(tmp_path / "c"), "--objective", "latency"])
    assert res.exit_code == 1 and f"is for {other} CPUs" in res.output and "--objective params" in res.output
    assert not (tmp_path / "c").exists()


def test_run_for_another_architecture_builds_the_bundle_and_leaves_validation_not_run(setup, tmp_path):
    import platform

    root, model_dir, task, _ = setup
    other = "x86_64" if platform.machine().lower() in ("aarch64", "arm64") else "aarch64"
    panel = write_profile(tmp_path, "onnxruntime", name="panel", extra=f'arch = "{other}"', max_metric_drop=1.0)
    summary = run(str(model_dir), str(task), str(panel), tmp_path / "panel-bundle", strategy="uniform",
                  n_calibration=32, val_limit=None, work=root / "bundle.work")   # the first test's stages, reused
    assert (tmp_path / "panel-bundle" / "bundle.json").is_file() and summary.report is None
    last = summary.stages[-1]
    assert (last.name, last.summary.get("status")) == ("validate", "not run")
    assert f"is for {other}" in last.detail and "python runner.py" in last.detail
    if other == "aarch64":
        assert "--emulate" in last.detail


def _edit_line(path, index=0):
    """Change one line of a JSON Lines file (its text), keeping it valid."""
    lines = path.read_text().splitlines()
    row = json.loads(lines[index])
    row["text"] = row["text"] + " film"
    lines[index] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")


def test_a_change_reruns_exactly_the_stages_downstream_of_it(setup, tmp_path):
    import shutil

    root, model_dir, task, _ = setup
    task = write_task(tmp_path / "task")                    # a private copy: its data gets edited
    profile = write_profile(tmp_path / "targets", "onnxruntime", name="tiny-target", max_metric_drop=1.0)
    other_model = tmp_path / "other-model"
    make_model("llama", seed=1).save_pretrained(other_model)
    make_tokenizer().save_pretrained(other_model)
    out = tmp_path / "bundle"
    log_file = tmp_path / "bundle.work" / "run.json"

    def go(model=model_dir, steps=2):
        run(str(model), str(task), str(profile), out, tune_steps=steps, strategy="uniform", n_calibration=16,
            val_limit=None)
        stages = json.loads(log_file.read_text())["stages"]        # the stage log is what users read
        return [s["slot"] for s in stages if s["status"] == "ran"], {s["slot"]: s["why"] for s in stages}

    everything = ["tune", "calibrate", "search", "fit", "refit", "export-onnx-fp32", "reference", "bundle", "validate"]
    assert go()[0] == everything                              # sensitivity does not apply (uniform)
    assert go()[0] == ["validate"]

    ran, why = go(steps=3)
    assert ran == everything and why["tune"] == "key changed: config steps 2 -> 3"
    assert why["calibrate"] == "key changed: upstream tune changed"

    _edit_line(task.parent / "validation.jsonl")
    ran, why = go(steps=3)
    assert ran == ["search", "fit", "refit", "export-onnx-fp32", "bundle", "validate"]
    assert why["search"] == f"key changed: input task data validation {task.parent / 'validation.jsonl'} changed"

    _edit_line(task.parent / "test.jsonl", 5)
    ran, _ = go(steps=3)
    assert ran == ["reference", "bundle", "validate"]

    text = profile.read_text().replace("max_size_mb = 100.0", "max_size_mb = 90.0")
    assert text != profile.read_text()
    profile.write_text(text)
    ran, why = go(steps=3)
    assert ran == ["bundle", "validate"] and "input target profile" in why["bundle"]

    ran, why = go(model=other_model, steps=3)
    assert ran == everything and "input model" in why["tune"]
    shutil.rmtree(other_model)


# Every killed run is a child forked from one process that imported the heavy modules once
# (a fresh interpreter per run would spend most of this test importing torch and optimum).
_ZYGOTE = r'''
import json, os, sys
import torch, transformers, onnxruntime                       # imported once, before any fork
import optimum.exporters.onnx
from sieve_edge import calibrate, evaluate, models, pipeline, tune
from sieve_edge.export import onnx as _onnx_backend
from sieve_edge.search import stage
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:                                                 # the run, killed by its hook
        os.dup2(2, 1)                                            # stdout is the parent's channel
        os.environ["SIEVE_EDGE_KILL_AT"] = job["kill"]
        try:
            pipeline.run(**job["kw"])
            os._exit(0)
        except BaseException as e:
            print(repr(e), file=sys.stderr, flush=True)
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}), flush=True)
'''

# One kill per stage: when its output is written but not yet committed (the worst moment), inside
# the search (after its generation 1 was saved), and as validation starts.
KILLS = ["tune:commit", "calibrate:commit", "sensitivity:commit", "search:generation-1", "fit:commit", "refit:commit",
         "export-onnx-fp32:commit", "reference:commit", "bundle:commit", "validate:start"]


def _model_files(bundle):
    return {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted((bundle / "model").rglob("*"))
            if p.is_file() and p.name != "export.json"}


def test_sigkill_in_each_stage_then_rerun_gives_the_same_bundle(setup, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    root, model_dir, task, profile = setup
    kw = dict(model=str(model_dir), task=str(task), target=str(profile), tune_steps=2, strategy="ga",
              n_calibration=16, val_limit=None, seed=0)
    clean = run(out=tmp_path / "clean", **kw)
    assert clean.report["status"] == "pass", clean.stages[-1].detail

    out = tmp_path / "killed"
    log_file = tmp_path / "killed.work" / "run.json"
    errors = open(tmp_path / "runs.log", "w")
    zygote = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=errors, text=True, env=dict(os.environ, SIEVE_EDGE_NO_PROGRESS="1"))
    calibrated = False
    try:
        for point in KILLS:
            zygote.stdin.write(json.dumps({"kill": point, "kw": {**kw, "out": str(out)}}) + "\n")
            zygote.stdin.flush()
            line = zygote.stdout.readline()
            assert line and json.loads(line)["signal"] == signal.SIGKILL, \
                (point, line, (tmp_path / "runs.log").read_text()[-3000:])
            stages = {s["slot"]: s for s in json.loads(log_file.read_text())["stages"]}
            assert stages[point.split(":")[0]]["status"] == "running", point
            if calibrated:  # a finished calibration is never redone
                assert stages["calibrate"]["status"] == "skipped", (point, stages["calibrate"])
            calibrated = calibrated or (tmp_path / "killed.work" / "calibrate.stage.json").is_file()
            if point == "search:generation-1":
                state = json.loads((tmp_path / "killed.work" / "search.resume" / "search_state.json").read_text())
                assert state["ga"]["generation"] == 1
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=60)
        errors.close()
    final = run(out=out, **kw)
    assert final.report["status"] == "pass"
    assert {s.slot: s.status for s in final.stages} == {**{s.slot: "skipped" for s in final.stages},
                                                        "validate": "ran"}
    assert not list((tmp_path / "killed.work").glob("*.partial-*")) and not list(tmp_path.glob("killed.partial-*"))
    assert _model_files(out) == _model_files(tmp_path / "clean")
    for stage in ("search", "refit"):
        a = json.loads((tmp_path / "killed.work" / stage / "plan.json").read_text())
        b = json.loads((tmp_path / "clean.work" / stage / "plan.json").read_text())
        assert a == b, stage


def test_sigterm_unwinds_like_ctrl_c_no_partial_output_and_a_clear_line(setup, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    root, model_dir, task, profile = setup
    out, work = tmp_path / "termed", tmp_path / "termed.work"
    cmd = [sys.executable, "-m", "sieve_edge", "run", "--model", str(model_dir), "--task", str(task), "--target",
           str(profile), "--out", str(out), "--tune-steps", "400", "--strategy", "uniform", "--calibration", "16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, SIEVE_EDGE_NO_PROGRESS="1"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # wait until tuning is under way
        if list(work.glob("tune.partial-*")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated (SIGTERM): rerun the same command to resume"
    assert "Traceback" not in err
    stages = {s["slot"]: s for s in json.loads((work / "run.json").read_text())["stages"]}
    assert stages["tune"]["status"] == "interrupted"
    assert not list(work.glob("*.partial-*")) and not out.exists()
