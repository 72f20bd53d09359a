"""The search benchmark's bookkeeping: which rows run, and how result files merge (no model is loaded)."""
import json

import pytest

from benchscripts import load_benchmark
from test_search import tuned  # noqa: F401  (a fixture: the tiny llama tuned on the tiny task)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("search")


def _row(task, strategy, tol, reduction, budget=6.0):
    return {"task": task, "strategy": strategy, "tolerance": tol, "reduction": reduction,
            "val_dense": 0.9, "val_final": 0.89, "test_dense": 0.9, "test_pruned": 0.88, "test_drop": 0.02,
            "evaluations": 10, "search_minutes": 5.0, "total_minutes": 9.0, "out": "x",
            "budget_minutes": budget, "method": "sieve"}


def test_only_picks_rows_and_rejects_unknown_strategies(bench, capsys):
    assert bench.parse_args(["--only", "ga-sieve@0.01,uniform-sieve@0.05"]).pairs == \
        [(0.01, "ga-sieve"), (0.05, "uniform-sieve")]
    # by default uniform-sieve and ga-sieve at both tolerances
    assert bench.parse_args([]).pairs == [(0.01, "uniform-sieve"), (0.01, "ga-sieve"), (0.05, "uniform-sieve"),
                                          (0.05, "ga-sieve")]
    assert len(bench.parse_args(["--strategies", ",".join(bench.STRATEGIES)]).pairs) == 8
    for bad in ("ga@0.01", "ga-sieve"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--only", bad])
    assert "STRATEGY@TOLERANCE" in capsys.readouterr().err


def test_combine_later_file_replaces_the_same_row_and_keeps_the_rest(bench, tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"settings": {"budget_minutes": 6.0}, "machine": {"threads": 1}, "minutes": 30,
                               "rows": [_row("snips", "ga-sieve", 0.01, 0.50), _row("sst2", "ga-sieve", 0.05, 0.47),
                                        _row("snips", "uniform-sieve", 0.01, 0.52)]}))
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"settings": {"budget_minutes": 10.0}, "machine": {"threads": 2}, "minutes": 25,
                               "rows": [_row("snips", "ga-sieve", 0.01, 0.61, budget=10.0)]}))
    out = tmp_path / "search.json"
    rows = bench.combine([old, new], out)
    assert [(r["task"], r["strategy"], r["reduction"]) for r in rows] == \
        [("sst2", "ga-sieve", 0.47), ("snips", "uniform-sieve", 0.52), ("snips", "ga-sieve", 0.61)]
    doc = json.loads(out.read_text())
    assert doc["rows"] == rows and [r["file"] for r in doc["runs"]] == ["old.json", "new.json"]
    assert doc["runs"][1]["rows"] == ["snips ga-sieve 0.01"]
    # a combined file combines again without losing its history
    again = bench.combine([out], tmp_path / "again.json")
    assert again == rows and len(json.loads((tmp_path / "again.json").read_text())["runs"]) == 2
    table = bench.table(rows)
    assert "| snips | ga-sieve | 0.01 | 61.0% |" in table and "5.0 (10) | 9.0 |" in table


def test_combine_names_a_missing_file(bench, tmp_path):
    with pytest.raises(SystemExit, match="nope.json does not exist"):
        bench.combine([tmp_path / "nope.json"], tmp_path / "out.json")


@pytest.fixture(scope="module")
def runtime_bench():
    import sys

    module = load_benchmark("runtime")
    yield module
    del sys.modules[module.__name__]


def test_runtime_goals_compare_the_named_rows(runtime_bench):
    rows = {
        "ov-int8-dense": {"model": "dense", "weights": "int8", "decode_tok_s": 60.0, "classify_ex_s": 13.0},
        "ov-int8-pruned": {"model": "pruned", "weights": "int8", "decode_tok_s": 66.0, "classify_ex_s": 20.0},
        "genai-int8-dense": {"model": "dense", "weights": "int8", "decode_tok_s": 70.0},
        "genai-int8-pruned": {"model": "pruned", "weights": "int8", "decode_tok_s": 112.0, "x_of_bound": 2.5},
        "runner-ort-int8-pruned": {"model": "pruned", "weights": "int8", "decode_tok_s": 90.0,
                                   "classify_ex_s": 27.0, "x_of_bound": 1.9},
        "llama.cpp-Q8_0-dense": {"model": "dense", "weights": "Q8_0", "decode_tok_s": 100.0},
    }
    goals = runtime_bench.goals(rows)
    # same loop: 112 / 70 in GenAI (66 / 60 in optimum-intel; the ORT row has no dense pair)
    assert goals[0]["rows"] == ("genai-int8-pruned", "genai-int8-dense")
    assert goals[0]["ratio"] == pytest.approx(1.6) and goals[0]["met"]
    assert goals[1]["ratio"] == pytest.approx(1.12) and goals[1]["met"]                 # 112 / 100
    assert goals[2]["ratio"] == pytest.approx(27 / 13) and goals[2]["met"]             # >= 2x
    assert goals[3]["rows"] == ("genai-int8-pruned",) and goals[3]["ratio"] == 2.5 and not goals[3]["met"]
    assert not any(x["met"] for x in runtime_bench.goals({}))


def test_runtime_bytes_read_skip_gather_only_tables(runtime_bench, tmp_path):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    table = np.zeros((100, 8), np.float32)            # 3200 bytes, only gathered
    head = np.zeros((8, 100), np.float32)             # 3200 bytes, a MatMul reads it all
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["x"], axis=0), helper.make_node("MatMul", ["x", "head"], ["y"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(head, "head")])
    (tmp_path / "model.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    assert runtime_bench.bytes_read_per_token(tmp_path) == head.nbytes


# ---------------------------------------------------------------- benchmarks/scale.py

@pytest.fixture(scope="module")
def scale():
    return load_benchmark("scale")


def test_scale_synthetic_model_streams_and_the_extrapolation_reproduces_its_fit(scale, tmp_path):
    folder = scale.write_synthetic(scale.SHAPES["tiny"], tmp_path / "tiny")
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "model-layer-000.safetensors", "model-layer-001.safetensors", "model-layer-002.safetensors",
        "model-outer.safetensors"]  # one shard per decoder layer: written (and read) layer by layer
    m = scale.calibrate_one(folder, examples=8, tokens=8, method="output")
    assert m["layers"] == 3 and m["peak_rss"] >= m["baseline_rss"] > 0 and m["tokens"] <= 64
    args = scale.parse_args(["--examples", "8", "--tokens", "8"])
    e = scale.extrapolate([{"shape": "tiny", **m}], args)
    tiny = next(r for r in e["rows"] if r["shape"] == "tiny")
    # fitted on the one measured row, the formula gives that row back (unless the embedding dominates)
    assert tiny["predicted_seconds_per_layer"] == pytest.approx(m["seconds_per_layer"])
    assert {r["shape"] for r in e["rows"]} == {"tiny", "8b", "70b"}
    big = {r["shape"]: r for r in e["rows"]}
    assert big["70b"]["predicted_peak_rss"] > big["8b"]["predicted_peak_rss"] > 0
    assert "8b" in scale.tables({"calibration": {"rows": [{"shape": "tiny", **scale.SHAPES["tiny"], **m,
                                                             "fp32_model_bytes": 1}], "extrapolation": e}})


def test_scale_combine_rebases_rows_measured_before_vmhwm(scale, tmp_path):
    # a row without "ru_maxrss" was read with ru_maxrss, whose baseline is the parent's peak:
    # --combine refuses it without --base-bytes and fits k on the given baseline with it
    row = {"shape": "1b-2layer", "peak_rss": 5.6e9, "baseline_rss": 3.2e9, "seconds_per_layer": 200.0}
    newer = {"shape": "tiny", "peak_rss": 0.5e9, "baseline_rss": 0.4e9, "seconds_per_layer": 0.1, "ru_maxrss": 0.5e9}
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps({"calibration": {"rows": [row]}}))
    new.write_text(json.dumps({"calibration": {"rows": [newer]}}))
    with pytest.raises(SystemExit, match="--base-bytes"):
        scale.combine_calibration([old, new], scale.parse_args(["--combine", "x"]))
    args = scale.parse_args(["--combine", "x", "--base-bytes", "4e8"])
    c = scale.combine_calibration([old, new], args)
    rows = {r["shape"]: r for r in c["rows"]}
    assert rows["1b-2layer"]["baseline_rss"] == 4e8 and rows["1b-2layer"]["baseline_rss_as_measured"] == 3.2e9
    assert rows["tiny"]["baseline_rss"] == 0.4e9     # measured with VmHWM: kept
    e = c["extrapolation"]
    assert e["fitted_on"] == "1b-2layer" and e["base_bytes"] == 4e8
    hidden = 4 * args.examples * args.tokens * scale.SHAPES["1b-2layer"]["hidden_size"]
    assert e["k"] == pytest.approx((5.6e9 - 4e8 - hidden) / scale.layer_bytes(scale.SHAPES["1b-2layer"]))


def test_healed_row_reuses_the_rows_search_and_refits_with_healing(bench, tmp_path):
    """--heal-steps: the row's plan is refit again and healed; the search stage is not redone."""
    import argparse
    import copy

    from test_search import small_config, write_task

    from sieve_edge.search import run_search
    from tiny import make_model, make_tokenizer

    task = write_task(tmp_path / "task")
    model, tok = make_model("llama"), make_tokenizer()
    cfg = small_config(tolerance=0.3, generations=1)   # a loose tolerance: the plan cuts something
    stages, out = tmp_path / "stages", tmp_path / "search-x"
    unhealed = run_search("tiny", task, out, cfg, force=True, model=copy.deepcopy(model), tokenizer=tok,
                          work=stages)   # the refit takes the model it is given, as in the benchmark
    assert unhealed["linear_param_reduction"] > 0
    args = argparse.Namespace(heal_steps=3, heal="kl", heal_lr=1e-3, heal_rank=0, budget_minutes=None, test_limit=None)
    row = bench.healed(args, "tiny", task, out, cfg, model, tok, stages, unhealed, log=None)
    status = stage_status(stages)
    assert status["search"] == status["fit"] == "skipped" and status["refit"] == "ran"
    assert row["steps"] == 3 and row["loss"] == "kl" and row["kept"] in (True, False)
    healed = json.loads((tmp_path / "search-x-heal" / "search.json").read_text())
    assert healed["heal"]["steps"] == 3 and healed["linear_param_reduction"] == unhealed["linear_param_reduction"]
    assert row["test_pruned"] == healed["test"]["pruned"]
    # the unhealed row's folder is untouched
    assert json.loads((out / "search.json").read_text())["heal"] is None
    table = bench.table([{**_row("sst2", "ga-sieve", 0.01, 0.4), "heal": row}])
    assert "| sst2 ga-sieve 0.01 | 3 (kl, 0.001) | factors, " in table
    # a plan that cut nothing has nothing to heal
    assert bench.healed(args, "tiny", task, out, cfg, model, tok, stages,
                        {"linear_param_reduction": 0.0}, log=None) is None


def test_held_out_row_resumes_the_rows_search_and_tables_the_plans_tried(bench, tmp_path):
    """--holdout: the row's finished search is confirmed on held-out rows without scoring a
    candidate again; the plan it keeps is refit and scored on test."""
    import argparse
    import copy

    from test_search import small_config, write_task

    from sieve_edge.search import run_search
    from tiny import make_model, make_tokenizer

    task = write_task(tmp_path / "task")
    model, tok = make_model("llama"), make_tokenizer()
    cfg = small_config(tolerance=0.3, generations=1, val_limit=16)
    stages, out = tmp_path / "stages", tmp_path / "search-x"
    plain = run_search("tiny", task, out, cfg, force=True, model=copy.deepcopy(model), tokenizer=tok, work=stages)
    args = argparse.Namespace(holdout=16, budget_minutes=None, test_limit=None)
    row = bench.held_out(args, "tiny", task, out, cfg, model, tok, stages, plain, log=None)
    assert row["rows"] == 16 and row["tries"] and row["reduction"] <= plain["linear_param_reduction"] + 1e-12
    held = json.loads((tmp_path / "search-x-holdout" / "search.json").read_text())
    assert held["holdout"]["tries"] == row["tries"] and row["test_pruned"] == held["test"]["pruned"]
    table = bench.table([{**_row("sst2", "ga-sieve", 0.01, plain["linear_param_reduction"]), "holdout": row}])
    assert "| sst2 ga-sieve 0.01 | 16 |" in table
    # a search that is not the row's (another count of evaluations) is refused, not tabled
    with pytest.raises(RuntimeError, match="scored candidates again"):
        bench.held_out(args, "tiny", task, out, cfg, model, tok, stages, {**plain, "evaluations": -1}, log=None)


def test_slack_row_resumes_the_row_at_tolerance_plus_slack_and_tables_the_healed_tries(bench, tmp_path):
    """--heal-slack: the GA row at tolerance + slack in --work is resumed (no candidate scored
    again), its plans beyond the tolerance healed; the kept plan is refit and scored on test."""
    import argparse
    import copy

    from test_search import small_config, write_task

    from sieve_edge.search import run_search
    from tiny import make_model, make_tokenizer

    task = write_task(tmp_path / "task")
    model, tok = make_model("llama"), make_tokenizer()
    stages = tmp_path / "stages"
    wide = run_search("tiny", task, tmp_path / "search-tiny-ga-sieve-0.3", small_config(tolerance=0.3, generations=1),
                      force=True, model=copy.deepcopy(model), tokenizer=tok, work=stages)
    cfg = small_config(tolerance=0.1, generations=1)
    out = tmp_path / "search-tiny-ga-sieve-0.1"
    run_search("tiny", task, out, cfg, force=True, model=copy.deepcopy(model), tokenizer=tok, work=stages)
    args = argparse.Namespace(heal_slack=0.2, heal_steps=2, heal="ce", heal_lr=1e-3, heal_rank=0, budget_minutes=15.0,
                              test_limit=None, work=tmp_path, quick=False)
    row = bench.slacked(args, "tiny", task, out, cfg, model, tok, stages, ("tiny", "ga-sieve"), log=lambda m: None)
    assert row["resumed"] == str(tmp_path / "search-tiny-ga-sieve-0.3")
    assert row["evaluations"] == wide["evaluations"] and row["search_gain"] == pytest.approx(wide["objective_gain"])
    assert row["reduction"] <= wide["linear_param_reduction"] + 1e-12
    slack = json.loads((tmp_path / "search-tiny-ga-sieve-0.1-slack" / "search.json").read_text())
    assert slack["healing"]["tries"] == row["tries"] and slack["tolerance"] == 0.1
    table = bench.table([{**_row("sst2", "ga-sieve", 0.01, 0.25), "slack": row}])
    assert "| sst2 ga-sieve 0.01 | 0.2 |" in table


def stage_status(stages) -> dict[str, str]:
    """Each stage's status in the last run in the stage folder ``stages`` (its run.json)."""
    return {s["name"]: s["status"] for s in json.loads((stages / "run.json").read_text())["stages"]}


def _refit_row(bench, tmp_path, monkeypatch, tuned, tries: int, budget: float | None = 15.0, heal_steps: int = 0):
    """A tiny GA row searched into tmp_path/stages, then rerun by ``bench.refitted`` with
    ``tries`` refit tries held to a huge tolerance (so one is kept), each healed ``heal_steps``
    steps: (stages, the row's folder, the plain row's summary, the refit row)."""
    import argparse
    import copy

    from test_search import climb_keeps_every_refit, load_tuned, small_config

    from sieve_edge.search import run_search

    climb_keeps_every_refit(monkeypatch)
    root, task = tuned
    model, tok = load_tuned(root)
    stages, out = tmp_path / "stages", tmp_path / "search-x"
    cfg = small_config(tolerance=0.05, generations=1)
    plain = run_search("tiny", task, out, cfg, force=True, model=copy.deepcopy(model), tokenizer=tok, work=stages)
    args = argparse.Namespace(refit_tries=tries, budget_minutes=budget, test_limit=None, heal_steps=heal_steps,
                              heal="ce", heal_lr=1e-3, heal_rank=0)
    return stages, out, plain, bench.refitted(args, "tiny", task, out, cfg, model, tok, stages, log=lambda m: None)


def test_refit_row_resumes_the_rows_search_and_tables_the_refit_tries(bench, tmp_path, monkeypatch, tuned):
    """--refit-tries: the row's own finished search is resumed (no candidate scored again) and
    larger plans it measured are refit; the plan kept is scored on test. The tries here are
    held to a huge tolerance so that one is kept for sure."""
    stages, _, plain, row = _refit_row(bench, tmp_path, monkeypatch, tuned, tries=1)
    status = stage_status(stages)
    assert status["search"] == status["fit"] == "ran"  # the row searched without a budget: resumed
    assert row["evaluations"] == plain["evaluations"] and not (stages / "search.resume").exists()
    assert row["searched_gain"] == pytest.approx(plain["objective_gain"]) and len(row["tries"]) == 1
    assert row["kept"] and row["reduction"] > plain["linear_param_reduction"]
    refit = json.loads((tmp_path / "search-x-refit" / "search.json").read_text())
    assert refit["refit_tries"]["tries"] == row["tries"] and row["test_pruned"] == refit["test"]["pruned"]
    table = bench.table([{**_row("sst2", "ga-sieve", 0.01, plain["linear_param_reduction"]), "refit_tries": row}])
    assert f"| sst2 ga-sieve 0.01 | {100 * row['start_gap']:+.1f} pt |" in table


def test_refit_row_reuses_the_rows_search_and_fit_when_the_stage_folder_holds_them(bench, tmp_path, monkeypatch,
                                                                                    tuned):
    """The row's search ran with the same budget in this stage folder: the rerun reuses it as it
    stands and the fit after it (only the climb and the refit stages run); with another budget
    (the case above) it resumes the row's state instead and the search stage runs again."""
    stages, _, plain, row = _refit_row(bench, tmp_path, monkeypatch, tuned, tries=1, budget=None)
    status = stage_status(stages)
    assert status["search"] == status["fit"] == "skipped" and status["climb"] == status["refit"] == "ran"
    assert row["evaluations"] == plain["evaluations"] and row["kept"] and len(row["tries"]) == 1


def test_a_refit_row_with_heal_steps_heals_each_try_and_reuses_the_search_and_fit(bench, tmp_path, monkeypatch,
                                                                                 tuned):
    """--refit-tries with --heal-steps: the rerun (into OUT-refit-healed) reuses the row's search
    and fit, heals each try before it is judged and ships the plan kept as healed; the table
    says the tries were healed."""
    stages, _, plain, row = _refit_row(bench, tmp_path, monkeypatch, tuned, tries=1, budget=None, heal_steps=2)
    status = stage_status(stages)
    assert status["search"] == status["fit"] == "skipped" and status["climb"] == status["refit"] == "ran"
    assert row["healing"]["steps"] == 2 and len(row["healing"]["tries"]) == len(row["tries"]) == 1
    assert row["heal"] is not None and row["heal"]["steps"] == 2
    assert row["tries"][0]["drop"] == row["healing"]["tries"][0]["drop"]
    assert json.loads((tmp_path / "search-x-refit-healed" / "search.json").read_text())["heal"] == row["heal"]
    table = bench.table([{**_row("sst2", "ga-sieve", 0.01, plain["linear_param_reduction"]), "refit_tries": row}])
    assert "tries healed 2 steps (ce)" in table


def test_the_table_of_a_refit_row_whose_climb_did_not_apply_says_why(bench):
    """The 'sieve' refit of the searched plan missed the tolerance, so the climb tried nothing:
    the row records no tries (None, as refitted() writes it) and the table says why."""
    note = "the 'sieve' refit scored 0.9733 on validation, beyond the tolerance; kept the 'output' factors"
    row = {"tries_allowed": 4, "searched_gain": None, "start_gap": None, "tries": None, "kept": None,
           "healing": None, "heal": None, "reduction": 0.5, "evaluations": 112, "val_final": 0.987,
           "test_pruned": 0.993, "test_drop": 0.007, "method": "output", "notes": [note]}
    table = bench.table([{**_row("reviews_long", "ga-sieve", 0.01, 0.5), "refit_tries": row}])
    assert f"| reviews_long ga-sieve 0.01 | - | none: {note} | 50.0% → 50.0% |" in table


def test_reruns_only_takes_the_rows_earlier_numbers_and_needs_a_rerun(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--slack-only"])
    assert "--reruns-only needs --heal-slack or --refit-tries" in capsys.readouterr().err
    assert bench.parse_args(["--reruns-only", "--refit-tries", "2"]).reruns_only
    with pytest.raises(SystemExit):
        bench.parse_args(["--heal-slack", "0.04"])
    assert "--heal-slack needs --heal-steps" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="search.json is missing; run the row first"):
        bench._earlier(tmp_path / "search-sst2-ga-sieve-0.01")
    (tmp_path / "row").mkdir()
    (tmp_path / "row" / "search.json").write_text(json.dumps({"linear_param_reduction": 0.25}))
    assert bench._earlier(tmp_path / "row")["linear_param_reduction"] == 0.25


def test_rebase_scores_the_refit_tries_on_both_banks(tmp_path, monkeypatch, tuned):
    """benchmarks/rebase.py on a tiny --refit-tries row: the rebased bank at the searched plan is
    that plan's `sieve` refit exactly (the fit stage's score of it), each try's refit drop is the
    climb's, and the table and mean errors cover them."""
    from benchscripts import load_benchmark

    rebase = load_benchmark("rebase")
    stages, _, _, row = _refit_row(load_benchmark("search"), tmp_path, monkeypatch, tuned, tries=2)
    root, task = tuned
    assert row["tries"]
    report = rebase.rebase(stages, str(task), str(root / "model"), extra=2, log=lambda m: None)
    rows = report["rows"]
    searched, tries = rows[0], [r for r in rows if r["kind"] == "try"]
    result = json.loads((stages / "search" / "result.json").read_text())
    assert searched["kind"] == "searched" and searched["gain"] == result["gain"]
    # the fit's refit of the searched plan: its searched drop less the climb's start gap
    assert searched["refit_drop"] == pytest.approx(searched["search_drop"] - row["start_gap"], abs=1e-9)
    assert searched["rebased_drop"] == pytest.approx(searched["refit_drop"], abs=1e-9)
    assert [(t["gain"], t["refit_drop"]) for t in tries] == [(t["gain"], t["drop"]) for t in row["tries"]]
    assert all(r["kind"] == "measured" and r["refit_drop"] is None for r in rows if r not in tries and r is not searched)
    assert set(report["mean_abs_error"]) == {"output", "rebased"}
    text = rebase.table(report)
    assert "| searched |" in text and text.count("| try |") == len(tries) and "mean |bank drop - refit drop|" in text
    # --refits 1: the smallest extra plan refit here (a ground truth of its own)
    again = rebase.rebase(stages, str(task), str(root / "model"), extra=2, refits=1, log=lambda m: None)["rows"]
    here = [r for r in again if r["kind"] == "refit here"]
    extras = [r for r in again if r["kind"] in ("measured", "refit here")]
    assert len(here) == 1 and here[0]["refit_drop"] is not None and here[0]["gain"] == min(r["gain"] for r in extras)


def test_reuse_search_resumes_the_rows_own_search_when_the_stage_folder_holds_another(bench, tmp_path, tuned):
    """--reuse-search after another tolerance ran in the stage folder: the row's own finished
    state is put back and resumed on the minutes it spent (no candidate scored again); when the
    stage folder holds the row's search, it is reused as it stands."""
    import argparse
    import copy

    from test_search import load_tuned, small_config

    from sieve_edge.search import run_search

    root, task = tuned
    model, tok = load_tuned(root)
    stages, out = tmp_path / "stages", tmp_path / "search-x"
    cfg = small_config(tolerance=0.05, generations=1)
    args = argparse.Namespace(budget_minutes=15.0, test_limit=None)
    plain = run_search("tiny", task, out, cfg, force=True, budget_minutes=15.0, model=copy.deepcopy(model),
                       tokenizer=tok, work=stages)
    assert bench._reused_budget(args, "tiny", task, cfg, model, tok, stages, out, print) == (15.0, None)
    run_search("tiny", task, tmp_path / "search-y", small_config(tolerance=0.3, generations=1), force=True,
               budget_minutes=15.0, model=copy.deepcopy(model), tokenizer=tok, work=stages)
    budget, scored = bench._reused_budget(args, "tiny", task, cfg, model, tok, stages, out, print)
    assert scored == plain["evaluations"] and budget < 15.0 and (stages / "search.resume").is_dir()
    again = run_search("tiny", task, tmp_path / "search-x2", cfg, budget_minutes=budget, model=copy.deepcopy(model),
                       tokenizer=tok, work=stages)
    assert stage_status(stages)["search"] == "ran"
    bench._drop_resume_point(again, scored, stages, tmp_path / "search-x2")
    assert not (stages / "search.resume").exists()
    assert again["linear_param_reduction"] == plain["linear_param_reduction"]
    with pytest.raises(RuntimeError, match="scored candidates again"):
        bench._drop_resume_point({"evaluations": scored + 1}, scored, stages, tmp_path / "search-x2")
