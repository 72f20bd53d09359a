"""The search stage on a tiny tuned model and a tiny task: tolerance, determinism, resume, outputs, errors."""
from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sieve_edge.errors import ArtifactError, BudgetError, InputError, TaskSpecError
from sieve_edge.search import (Ladder, MatmulTable, ParamObjective, SearchConfig, TimeObjective, bisect_largest,
                               run_search, search_plan)
from sieve_edge.tasks import load_task
from tiny import make_model, make_tokenizer

TESTS = Path(__file__).resolve().parent
WORDS = {"positive": ["great", "charming", "moving", "film"], "negative": ["dull", "boring", "tedious", "mess"]}
# Single-character answers are single tokens for the tiny tokenizer: the scorer's fast path.
TASK_TOML = '''name = "tiny"
kind = "classification"
prompt = "Review: {text} Sentiment:"
[labels]
negative = "0"
positive = "1"
[data]
train = "train.jsonl"
test = "test.jsonl"
'''


def write_task(folder: Path, validation: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split, n in (("train", 96), ("validation", 32), ("test", 32)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                # mixed reviews: the majority decides, so a cut model has something to lose
                k = rng.randint(1, 3)
                label = rng.choice(sorted(WORDS))
                other = "negative" if label == "positive" else "positive"
                words = [rng.choice(WORDS[label]) for _ in range(k + 1)] + [rng.choice(WORDS[other]) for _ in range(k)]
                rng.shuffle(words)
                text = " ".join(words)
                f.write(json.dumps({"text": text, "label": label}) + "\n")
    toml = TASK_TOML + ('validation = "validation.jsonl"\n' if validation else "")
    (folder / "tiny.toml").write_text(toml)
    return folder / "tiny.toml"


def small_config(**kw) -> SearchConfig:
    base = dict(tolerance=0.05, population=6, generations=2, n_calibration=32, calibration_batch=16, multiple=2,
                race_size=12, val_limit=None, batch_size=64, seed=0)
    base.update(kw)
    return SearchConfig(**base)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny llama tuned on the tiny task (so that cutting it costs accuracy), saved as a folder."""
    from sieve_edge.tune import tune

    root = tmp_path_factory.mktemp("search")
    task_path = write_task(root / "task")
    task = load_task(task_path)
    model, tok = make_model("llama"), make_tokenizer()
    tune(model, tok, task, steps=30, lr=3e-3, progress=False)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root, task_path


def load_tuned(root: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(root / "model").eval(), make_tokenizer()


# ---------------------------------------------------------------- pure helpers

def test_bisect_largest():
    for n in range(1, 12):
        for answer in range(n):
            calls = []
            got = bisect_largest(n, lambda i: calls.append(i) or i <= answer)
            assert got == answer
            assert len(calls) <= n.bit_length() + 1


class OverheadTable(MatmulTable):
    """A fixed fake table: per MatMul a fixed overhead plus work; ``slow`` (out, in) pairs cost 100 ms."""

    def __init__(self, overhead=0.05, slow=lambda out, inp: False):
        super().__init__()
        self.overhead, self.slow = overhead, slow

    def ms(self, out, inp, tokens):
        return 100.0 if self.slow(out, inp) else self.overhead + 1e-4 * out * inp * tokens


def test_time_objective_prices_fused_groups_prompt_and_decode():
    shapes = {"l.0.q": (32, 32), "l.0.k": (16, 32), "l.0.v": (16, 32), "l.0.o": (32, 32)}
    table = OverheadTable()
    obj = TimeObjective(shapes, table, prompt_tokens=10, new_tokens=5, groups=[["l.0.q", "l.0.k", "l.0.v"]])
    ms = table.ms
    # dense: ONE MatMul over the concatenated q/k/v rows, one for o
    assert obj.breakdown({})["prompt_ms"] == pytest.approx(ms(64, 32, 10) + ms(32, 32, 10))
    # q at rank 8: the fused first MatMul narrows to 8 + 16 + 16 rows, plus q's second factor
    got = obj.breakdown({"l.0.q": 8})
    assert got["token_ms"] == pytest.approx(ms(40, 32, 1) + ms(32, 8, 1) + ms(32, 32, 1))
    assert got["example_ms"] == pytest.approx(got["prompt_ms"] + 4 * got["token_ms"])  # 5 new: 4 decode steps
    # an unfused matrix: two MatMuls for its pair
    assert obj.breakdown({"l.0.o": 8})["prompt_ms"] == pytest.approx(
        ms(64, 32, 10) + ms(8, 32, 10) + ms(32, 8, 10))
    # a classification example (1 new token) is its prompt pass alone
    one = TimeObjective(shapes, table, 10, 1, groups=[["l.0.q", "l.0.k", "l.0.v"]])
    assert one.breakdown({})["example_ms"] == pytest.approx(obj.breakdown({})["prompt_ms"])
    assert 0 < obj.gain({"l.0.q": 8, "l.0.o": 8}) < 1


def test_time_ladder_never_offers_a_rank_slower_than_dense():
    # overhead-bound (decode-like): a pair's two MatMuls cost more than the dense one unless its rank is small
    shapes = {"model.layers.0.mlp.up_proj": (64, 32), "model.layers.0.mlp.down_proj": (32, 64)}
    obj = TimeObjective(shapes, OverheadTable(overhead=0.1), prompt_tokens=1, new_tokens=1)
    ladder = Ladder(shapes, (1.0, 0.9, 0.7, 0.5, 0.3), 4, obj)
    for name, ranks in ladder.ranks.items():
        for r in ranks:
            assert r is None or obj.breakdown({name: r})["example_ms"] < obj.dense_ms
        # keep 0.9: the pair's second MatMul costs more overhead than its rows save; keep 0.3 pays
        assert ranks[1] is None and ranks[-1] is not None
    cheap = TimeObjective(shapes, OverheadTable(overhead=0.0), prompt_tokens=8, new_tokens=1)
    assert Ladder(shapes, (1.0, 0.9, 0.5), 4, cheap).ranks["model.layers.0.mlp.up_proj"][2] is not None
    # parameters: every level below break-even is usable
    assert all(r is not None for r in Ladder(shapes, (1.0, 0.9, 0.5), 4, ParamObjective(shapes)).ranks[
        "model.layers.0.mlp.up_proj"][1:])


def test_matmul_table_interpolates_fused_widths():
    table = MatmulTable({(64, 32, 4): 1.0, (128, 32, 4): 2.0, (256, 32, 4): 6.0})
    assert table.ms(96, 32, 4) == pytest.approx(1.5)
    assert table.ms(192, 32, 4) == pytest.approx(4.0)
    assert table.ms(320, 32, 4) == pytest.approx(8.0)       # beyond: the last two points' slope
    assert table.ms(128, 32, 4) == 2.0                     # measured: exact
    across = MatmulTable({(64, 8, 4): 1.0, (64, 24, 4): 3.0})
    assert across.ms(64, 16, 4) == pytest.approx(2.0)       # a second factor off the ladder: along in
    with pytest.raises(KeyError, match="64x16"):
        table.ms(64, 16, 4)


def test_torch_matmul_table_measures_once_and_caches(tmp_path, monkeypatch):
    monkeypatch.delenv("SIEVE_EDGE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from sieve_edge.search import make_time_objective

    cfg = SearchConfig(objective="time", latency_tokens=4)
    shapes = {"a": (32, 16)}
    obj = make_time_objective(cfg, shapes, candidate_ranks={"a": {8}})
    cache = tmp_path / "sieve-edge" / "cost-tables" / "torch.json"
    keys = json.loads(cache.read_text()).keys()
    # dense, and the rank-8 pair's two factors, at the prompt length and at one token (decode)
    assert {k.split("|", 2)[2] for k in keys} == {f"{s}|tok{t}" for s in ("32x16", "8x16", "32x8") for t in (1, 4)}
    assert obj.dense_ms > 0 and isinstance(obj.usable("a", 8), bool) and obj.prompt_tokens == 4
    monkeypatch.setattr("sieve_edge.search.objectives._time_matmul", lambda *a: pytest.fail("measured again"))
    again = make_time_objective(cfg, shapes, candidate_ranks={"a": {8}})
    assert again.table.entries == obj.table.entries  # a second run reads, does not re-measure


def test_runtime_matmul_times_are_cached_per_runtime_version(tmp_path, monkeypatch):
    import onnxruntime

    from sieve_edge.export import microbench as mb

    cache = tmp_path / "mb.json"
    got = mb.matmul_times([(16, 32), (32, 8)], [1, 4], "onnxruntime", "fp32", threads=1, cache=cache, repeats=2)
    assert set(got) == {(16, 32, 1), (16, 32, 4), (32, 8, 1), (32, 8, 4)} and all(v > 0 for v in got.values())
    assert all(f"onnxruntime {onnxruntime.__version__}" in k for k in json.loads(cache.read_text()))
    monkeypatch.setattr(mb, "_ort_runner", lambda *a, **k: pytest.fail("measured although cached"))
    assert mb.matmul_times([(16, 32)], [4], "onnxruntime", "fp32", threads=1, cache=cache)[(16, 32, 4)] == \
        got[(16, 32, 4)]
    monkeypatch.setattr(mb, "runtime_version", lambda runtime: "another version")
    with pytest.raises(pytest.fail.Exception, match="measured although cached"):
        mb.matmul_times([(16, 32)], [4], "onnxruntime", "fp32", threads=1, cache=cache)


@pytest.mark.parametrize("tolerance", [0.0, 1.0, -0.1, 1.5])
def test_tolerance_outside_open_unit_interval(tolerance):
    with pytest.raises(BudgetError, match=r"tolerance must be in \(0, 1\)"):
        SearchConfig(tolerance=tolerance)


@pytest.mark.parametrize("kw", [dict(strategy="random"), dict(objective="energy"), dict(ladder=(0.9, 0.5)),
                                dict(ladder=(1.0, 0.5, 0.7)), dict(method="magic")])
def test_bad_settings(kw):
    with pytest.raises(InputError):
        SearchConfig(**kw)


def test_task_without_validation_split_fails_before_loading(tmp_path):
    task = write_task(tmp_path / "task", validation=False)
    with pytest.raises(TaskSpecError, match="no 'validation' split"):
        run_search("no-such-model-is-loaded", task, tmp_path / "out", small_config())


def test_cli_reports_bad_tolerance(tmp_path):
    from click.testing import CliRunner

    from sieve_edge.cli import main

    res = CliRunner().invoke(main, ["search", "--model", "x", "--task", "x", "--tolerance", "1.5",
                                    "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "tolerance must be in (0, 1)" in res.output


# ---------------------------------------------------------------- on the tiny tuned model

def fake_clock(monkeypatch, seconds_per_candidate: float) -> dict:
    """The search's clock moves only when a candidate is scored: a box where each costs ``seconds``."""
    import sieve_edge.search.budget as B
    from sieve_edge.search import CandidateEvaluator

    clock = {"t": 0.0, "calls": 0}
    monkeypatch.setattr(B, "now", lambda: clock["t"])
    original = CandidateEvaluator.__call__

    def timed(self, ranks, **kw):
        clock["t"] += seconds_per_candidate
        clock["calls"] += 1
        return original(self, ranks, **kw)

    monkeypatch.setattr(CandidateEvaluator, "__call__", timed)
    return clock


def test_budget_is_positive(tmp_path):
    with pytest.raises(BudgetError, match="budget must be > 0 minutes"):
        run_search("no-such-model-is-loaded", write_task(tmp_path / "task"), tmp_path / "out", small_config(),
                   budget_minutes=0)


def test_a_budget_too_small_for_one_candidate_keeps_the_dense_plan(tuned, monkeypatch):
    # Calibration, decomposition and the dense scores do not count: a budget that cannot fit
    # one candidate is no error, the plan is the dense model's (what was measured).
    from sieve_edge.search.config import BEFORE_FIRST_GENERATION

    clock = fake_clock(monkeypatch, 60.0)
    root, task_path = tuned
    model, tok = load_tuned(root)
    res = search_plan(model, tok, load_task(task_path), small_config(), budget_minutes=1e-6)
    assert clock["calls"] == 0 and res.plan.factorized == {} and res.evaluations == 1
    assert res.stopped == BEFORE_FIRST_GENERATION and res.seconds == 0.0


def test_budget_running_out_mid_search_stops_without_made_up_results(tuned, monkeypatch):
    # A clock that moves only when a candidate is scored (10 s each): the 2-minute budget runs
    # out inside the search. What it returns must be what was measured: no candidate scored
    # as "infeasible" for lack of time, a count of real evaluations, a feasible plan.
    clock = fake_clock(monkeypatch, 10.0)
    root, task_path = tuned
    model, tok = load_tuned(root)
    res = search_plan(model, tok, load_task(task_path), small_config(generations=20), budget_minutes=2.0)
    assert 0 < clock["calls"] <= 2 * 60 / 10 + 1              # the last one starts before the 2-minute mark
    assert res.evaluations == clock["calls"] + 1          # the dense reference is scored outside __call__
    assert len(res.frontier) == res.evaluations
    assert all(f["metric"] > 0 for f in res.frontier)     # nothing made up (a skipped one scored 0)
    assert res.dense_metric - res.metric <= res.tolerance_abs + 1e-12
    assert len(res.history) < 20 and res.stopped != "done"
    assert res.seconds == clock["t"] <= 120.0             # the budget counts the search, and only it


def test_the_budget_is_searched_to_its_end_not_stopped_a_generation_early(tuned, monkeypatch):
    # 10 s per candidate, 6 per generation: a rule that waits for a whole generation to fit
    # leaves up to a minute of the budget unused. A partial generation is scored instead
    # (best-predicted candidates first), until one more candidate and the reserve to confirm
    # the plan would not fit.
    from sieve_edge.search import CandidateEvaluator

    clock = fake_clock(monkeypatch, 10.0)
    confirmations = []
    original = CandidateEvaluator.confirm
    monkeypatch.setattr(CandidateEvaluator, "confirm", lambda self, ranks: (confirmations.append(1),
                                                                             original(self, ranks))[1])
    root, task_path = tuned
    model, tok = load_tuned(root)
    res = search_plan(model, tok, load_task(task_path), small_config(generations=50), budget_minutes=5.0)
    assert res.stopped == "budget" and 1 <= len(res.history) < 50
    searching = 10.0 * (clock["calls"] - len(confirmations))   # seeds and generations, not the confirmations
    assert 300.0 - searching <= 2 * 10.0, (searching, len(confirmations))


def test_budget_ending_before_the_first_generation_still_writes_a_plan(tuned, tmp_path, monkeypatch):
    # A slow box: every candidate costs 60 s, the 3-minute budget ends while the GA is still
    # seeding. The command must finish (best measured plan, state file for a resume) and exit 0.
    from click.testing import CliRunner

    from sieve_edge.cli import main

    fake_clock(monkeypatch, 60.0)
    root, task_path = tuned
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["search", "--model", str(root / "model"), "--task", str(task_path),
                                    "--tolerance", "0.05", "--population", "6", "--generations", "2",
                                    "--calibration", "32", "--race", "12", "--budget-minutes", "3",
                                    "--out", str(out), "--json"])
    assert res.exit_code == 0, (res.output[-3000:], repr(res.exception))
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["generations"] == 0 and summary["stopped"] == "the budget ended before generation 1"
    assert (out / "plan.json").is_file() and (out / "search_state.json").is_file()
    state = json.loads((out / "search_state.json").read_text())
    assert state["ga"]["generation"] == -1 and len(state["ga"]["cache"]) == summary["evaluations"] == 4
    assert summary["validation"]["dense"] - summary["validation"]["search"] <= summary["tolerance_abs"] + 1e-12
    report = (out / "search_report.md").read_text()
    assert "the budget ended before generation 1" in report
    assert "| task KL |" in report            # the sensitivity stage's costs, though no seeding finished


def test_ga_is_deterministic_and_within_tolerance(tuned):
    root, task_path = tuned
    task = load_task(task_path)
    plans = []
    for _ in range(2):
        model, tok = load_tuned(root)
        res = search_plan(model, tok, task, small_config(generations=1))
        plans.append(res.plan.ranks)
        assert res.dense_metric - res.metric <= res.tolerance_abs + 1e-12
        assert res.plan.linear_param_reduction > 0.2
        assert all(type(m).__name__ != "SearchLinear" for m in model.modules())  # restored
    assert plans[0] == plans[1]


def test_int8_search_scores_candidates_as_int8(tuned):
    root, task_path = tuned
    task = load_task(task_path)
    model, tok = load_tuned(root)
    before = model.get_input_embeddings().weight.detach().clone()
    res = search_plan(model, tok, task, small_config(generations=1, weights="int8"))
    assert res.dense_int8_metric is not None
    assert res.dense_metric - res.metric <= res.tolerance_abs + 1e-12   # the plan holds in int8
    assert torch.equal(model.get_input_embeddings().weight, before)    # simulation undone
    assert all(type(m).__name__ != "SearchLinear" for m in model.modules())
    with pytest.raises(InputError, match="weights"):
        small_config(weights="int4")


def test_uniform_bisection(tuned):
    root, task_path = tuned
    model, tok = load_tuned(root)
    res = search_plan(model, tok, load_task(task_path), small_config(strategy="uniform"))
    keeps = set(res.levels.values()) - {1.0}
    assert len(keeps) == 1  # one keep fraction for every matrix
    assert res.dense_metric - res.metric <= res.tolerance_abs + 1e-12
    assert res.evaluations <= 8

    # decompositions made once by the caller (a benchmark) give the same search
    from sieve_edge.calibrate import decompose_all
    from sieve_edge.tasks import calibration_batches

    model, tok = load_tuned(root)
    cfg = small_config(strategy="uniform")
    task = load_task(task_path)
    decs = decompose_all(model, list(calibration_batches(task, tok, cfg.n_calibration, cfg.calibration_batch)),
                         "output")
    again = search_plan(model, tok, task, cfg, decompositions=decs)
    assert again.plan.ranks == res.plan.ranks and again.metric == res.metric
    with pytest.raises(InputError, match="cover every matrix"):
        search_plan(model, tok, task, cfg, decompositions=({}, 0))


def test_uniform_bisection_stays_within_the_decomposed_ranks(tuned):
    """The bisection's grid (0.025 steps) stops at the ladder's first level below 1.0: the
    calibration decomposed no deeper, and a keep above it is not a rank anything can score."""
    from sieve_edge.search.drivers import ladder_max_ranks

    root, task_path = tuned
    model, tok = load_tuned(root)
    cfg = small_config(strategy="uniform", ladder=(1.0, 0.5, 0.2), tolerance=1e-6)
    res = search_plan(model, tok, load_task(task_path), cfg)
    assert set(res.levels.values()) - {1.0} <= {k / 40 for k in range(1, 21)}   # 0.5 at most
    deepest = ladder_max_ranks({n: tuple(s) for n, s in res.plan.shapes.items()}, cfg)
    assert all(r is None or r <= deepest[n] for n, r in res.plan.ranks.items())
    scored = [h["keep"] for h in res.history]
    assert scored and max(scored) <= 0.5


_CHILD = r'''
import sys, time
sys.path.insert(0, {tests!r})
from transformers import AutoModelForCausalLM
from tiny import make_tokenizer
from sieve_edge.search import SearchConfig, search_plan
from sieve_edge.tasks import load_task
cfg = SearchConfig(**{cfg!r})
model = AutoModelForCausalLM.from_pretrained({model!r}).eval()
def slow_log(line):
    print(line, flush=True)
    if line.startswith("generation"):
        time.sleep(1.0)  # leaves the parent time to kill us between checkpoints
search_plan(model, make_tokenizer(), load_task({task!r}), cfg, state_path={state!r}, log=slow_log)
'''


def test_sigkill_then_rerun_resumes_to_the_same_plan(tuned, tmp_path):
    root, task_path = tuned
    task = load_task(task_path)
    cfg = small_config(generations=3)
    model, tok = load_tuned(root)
    uninterrupted = search_plan(model, tok, task, cfg)

    state = tmp_path / "search_state.json"
    fields = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    script = _CHILD.format(tests=str(TESTS), cfg=fields, model=str(root / "model"), task=str(task_path),
                           state=str(state))
    env = dict(os.environ, SIEVE_EDGE_NO_PROGRESS="1")
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and child.poll() is None:
            if state.is_file() and json.loads(state.read_text())["ga"]["generation"] >= 1:
                break
            time.sleep(0.1)
        assert child.poll() is None, child.stdout.read().decode()[-2000:]
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    stopped_at = json.loads(state.read_text())["ga"]["generation"]
    assert 1 <= stopped_at < 3

    model, tok = load_tuned(root)
    resumed = search_plan(model, tok, task, cfg, state_path=state)
    assert resumed.resumed_from == stopped_at
    assert resumed.plan.ranks == uninterrupted.plan.ranks
    assert [h["best_fitness"] for h in resumed.history] == [h["best_fitness"] for h in uninterrupted.history]

    # the state belongs to these settings: other settings refuse to resume from it
    with pytest.raises(ArtifactError, match="other settings"):
        search_plan(model, tok, task, small_config(generations=3, seed=1), state_path=state)


def test_run_search_writes_the_output_folder(tuned, tmp_path):
    from sieve_edge.checkpoint import load_checkpoint, read_manifest
    from sieve_edge.plan import RankPlan

    root, task_path = tuned
    model, tok = load_tuned(root)
    out = tmp_path / "out"
    summary = run_search("tiny", task_path, out, small_config(heal_steps=3), model=model, tokenizer=tok)
    for name in ("plan.json", "history.json", "search.json", "search_report.md", "frontier.png", "heatmap.png",
                 "sieve_edge.json", "model.safetensors", "search_state.json"):
        assert (out / name).is_file(), name
    manifest = read_manifest(out)
    plan = RankPlan.from_json(out / "plan.json")
    assert manifest["ranks"] == plan.factorized
    assert abs(manifest["linear_param_reduction"] - summary["linear_param_reduction"]) < 1e-5
    history = json.loads((out / "history.json").read_text())
    assert len(history["generations"]) == 3 and all("median_fitness" in g for g in history["generations"])
    report = (out / "search_report.md").read_text()
    assert "Bottlenecks" in report and "kept densest" in report and "Healing" in report
    assert "| task KL |" in report   # the GA measured the label-Fisher sensitivity (single-token labels)
    assert summary["heal"]["steps"] == 3
    assert summary["validation"]["dense"] - summary["validation"]["search"] <= summary["tolerance_abs"] + 1e-12
    reloaded = load_checkpoint(out)
    from sieve_edge.evaluate import evaluate
    assert abs(evaluate(reloaded, tok, load_task(task_path), "test").value - summary["test"]["pruned"]) < 1e-9

    # a finished search is not silently redone
    with pytest.raises(ArtifactError, match="finished search"):
        run_search("tiny", task_path, out, small_config(), model=model, tokenizer=tok)
    assert not list(tmp_path.glob("out.*"))  # no staging folders left behind


def test_healing_another_way_reuses_the_fit_and_the_search(tuned, tmp_path):
    """Healing is the refit stage's alone: a rerun with other --heal settings neither searches
    nor refits the plan again, and heals the very factors the unhealed run scored."""
    root, task_path = tuned
    model, tok = load_tuned(root)
    work = tmp_path / "work"
    # each run gets its own copy: the fit refits the model it is handed in place
    plain = run_search("tiny", task_path, tmp_path / "plain", small_config(), model=copy.deepcopy(model),
                       tokenizer=tok, work=work)
    healed = run_search("tiny", task_path, tmp_path / "healed", small_config(heal_steps=3, heal="kl"),
                        model=copy.deepcopy(model), tokenizer=tok, work=work)
    stages = {s["slot"]: s["status"] for s in json.loads((work / "run.json").read_text())["stages"]}
    assert stages["search"] == stages["fit"] == "skipped" and stages["refit"] == "ran"
    assert healed["linear_param_reduction"] == plain["linear_param_reduction"]
    assert healed["validation"]["refit"] == plain["validation"]["refit"]   # the same fit, before healing
    assert healed["heal"]["steps"] == 3 and healed["heal"]["metric_before"] == plain["validation"]["final"]
    assert plain["heal"] is None
    # adapters instead of the factors: the refit stage's key changes, the fit is reused again
    adapted = run_search("tiny", task_path, tmp_path / "adapted", small_config(heal_steps=3, heal_rank=2),
                         model=copy.deepcopy(model), tokenizer=tok, work=work)
    stages = {s["slot"]: s["status"] for s in json.loads((work / "run.json").read_text())["stages"]}
    assert stages["search"] == stages["fit"] == "skipped" and stages["refit"] == "ran"
    assert adapted["heal"]["rank"] == 2 and adapted["heal"]["metric_before"] == plain["validation"]["final"]
    assert 0 < adapted["heal"]["trainable_params"] < healed["heal"]["trainable_params"]
    assert "rank-2 adapters" in (tmp_path / "adapted" / "search_report.md").read_text()


def test_cli_search_uniform(tuned, tmp_path):
    from click.testing import CliRunner

    from sieve_edge.cli import main

    root, task_path = tuned
    out = tmp_path / "cli"
    res = CliRunner().invoke(main, ["search", "--model", str(root / "model"), "--task", str(task_path),
                                    "--tolerance", "0.05", "--strategy", "uniform", "--method", "output",
                                    "--calibration", "16", "--race", "0", "--out", str(out), "--json"])
    assert res.exit_code == 0, (res.output[-3000:], repr(res.exception))
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["strategy"] == "uniform" and summary["method"] == "output"
    # an `output` refit reuses the search's factors: it scores what the search scored
    assert abs(summary["validation"]["refit"] - summary["validation"]["search"]) <= 1 / summary["validation"]["n"]
    assert (out / "plan.json").is_file() and (out / "heatmap.png").is_file()


def _interrupt_after_generation_0(monkeypatch):
    """Ctrl-C right after generation 0 was saved (the search's test hook, in process)."""
    import sieve_edge.search.drivers as D

    def hook(slot, point):
        if point == "generation-0":
            raise KeyboardInterrupt

    monkeypatch.setattr(D, "kill_point", hook)
    return lambda: monkeypatch.setattr(D, "kill_point", lambda slot, point: None)


def test_search_resumed_into_a_folder_of_another_task_or_model_refuses(tuned, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from sieve_edge.cli import main

    root, task_path = tuned
    other_task = write_task(tmp_path / "other-task")
    lines = (other_task.parent / "validation.jsonl").read_text().splitlines()
    (other_task.parent / "validation.jsonl").write_text("\n".join(lines[1:]) + "\n")   # one row fewer
    other_model = tmp_path / "other-model"
    make_model("llama", seed=1).save_pretrained(other_model)
    make_tokenizer().save_pretrained(other_model)
    cfg = small_config(generations=2)
    out = tmp_path / "out"
    resume = _interrupt_after_generation_0(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_search(str(root / "model"), task_path, out, cfg)
    resume()
    state = out / ".stages" / "search.resume" / "search_state.json"
    assert json.loads(state.read_text())["ga"]["generation"] == 0
    before = state.read_bytes()

    for model, task in ((root / "model", other_task), (other_model, task_path)):
        with pytest.raises(ArtifactError, match=r"another model or task \(.*\) left this state.*--force"):
            run_search(str(model), task, out, cfg)
    res = CliRunner().invoke(main, ["search", "--model", str(other_model), "--task", str(task_path),
                                    "--tolerance", "0.05", "--out", str(out)])
    assert res.exit_code == 1 and "another model or task" in res.output and "Traceback" not in res.output
    assert state.read_bytes() == before                      # refused before anything ran
    calibration = json.loads((out / ".stages" / "calibrate.stage.json").read_text())
    assert Path(calibration["inputs"]["model"]["path"]) == (root / "model").resolve()   # not recalibrated

    # --force starts over: what it finds is exactly what a fresh search finds, no foreign score reused
    forced = run_search(str(other_model), task_path, out, cfg, force=True)
    fresh = run_search(str(other_model), task_path, tmp_path / "fresh", cfg)
    assert forced["resumed_from"] is None
    for key in ("evaluations", "linear_param_reduction", "validation", "test"):
        assert forced[key] == fresh[key], key
    assert json.loads((out / "plan.json").read_text())["ranks"] == \
        json.loads((tmp_path / "fresh" / "plan.json").read_text())["ranks"]


def test_an_interrupted_search_resumes_without_recalibrating(tuned, tmp_path, monkeypatch):
    root, task_path = tuned
    cfg = small_config(generations=2)
    out = tmp_path / "out"
    resume = _interrupt_after_generation_0(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_search(str(root / "model"), task_path, out, cfg)
    resume()
    summary = run_search(str(root / "model"), task_path, out, cfg)
    log = {s["slot"]: s for s in json.loads((out / ".stages" / "run.json").read_text())["stages"]}
    assert log["calibrate"]["status"] == "skipped" and log["sensitivity"]["status"] == "skipped"
    assert log["search"]["status"] == "ran" and summary["resumed_from"] == 0 and summary["generations"] == 3
    assert not (out / ".stages" / "search.resume").exists()    # the finished output holds the state
    # (that a resumed search ends with the uninterrupted run's plan: test_sigkill_then_rerun_resumes_to_the_same_plan)


def test_search_stages_of_run_start_a_foreign_state_over(tuned, tmp_path, monkeypatch):
    # `sieve-edge run` builds its search stages with on_state_mismatch="restart": an interrupted
    # search of another task is not resumed (its scores are foreign); it starts over and ends
    # where a fresh search ends
    from sieve_edge.search import search_stages
    from sieve_edge.stages import Workflow, model_ref

    root, task_path = tuned
    other = write_task(tmp_path / "other-task")
    rows = (other.parent / "validation.jsonl").read_text().splitlines()
    (other.parent / "validation.jsonl").write_text("\n".join(rows[2:]) + "\n")
    cfg = small_config(generations=2)

    def flow(task, work, log=None):
        stages = search_stages(model_ref(str(root / "model")), load_task(task), cfg, budget_minutes=None,
                               test_limit=None, on_state_mismatch="restart", score_test=False)
        return Workflow(work, stages, log=log)

    resume = _interrupt_after_generation_0(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        flow(task_path, tmp_path / "work").run()
    resume()
    assert json.loads((tmp_path / "work" / "run.json").read_text())["stages"][2]["status"] == "interrupted"
    lines = []
    records = {r.slot: r for r in flow(other, tmp_path / "work", lines.append).run()}
    assert any("a search of another model or task" in line and "starting over" in line for line in lines)
    assert records["calibrate"].status == "skipped"          # the calibration data did not change
    assert records["search"].status == "ran" and records["sensitivity"].why.startswith("key changed: input task data validation")
    flow(other, tmp_path / "fresh").run()
    for name in ("plan.json", "history.json"):
        a = json.loads((tmp_path / "work" / "search" / name).read_text())
        b = json.loads((tmp_path / "fresh" / "search" / name).read_text())
        if name == "history.json":  # wall times differ; what was scored may not
            a, b = ([{k: v for k, v in g.items() if k != "seconds"} for g in d["generations"]] for d in (a, b))
        assert a == b, name


def test_time_objective_picks_the_plan_the_table_says_is_cheaper(tuned, monkeypatch):
    # A fixed fake cost table in which every MatMul writing 32 rows from fewer than 32 inputs
    # (the second factor of q_proj, o_proj and down_proj, whose out size is 32) costs 100 ms:
    # those pairs are slower than their dense matrices, every other pair is faster. With a
    # tolerance every plan meets, the parameter objective cuts everything; the time objective
    # must keep exactly those three kinds dense and cut the rest, and be cheaper by the table.
    import sieve_edge.search.objectives as O

    table = OverheadTable(overhead=0.01, slow=lambda out, inp: out == 32 and inp < 32)
    monkeypatch.setattr(O, "make_matmul_table", lambda config, profile=None: table)
    root, task_path = tuned
    task = load_task(task_path)
    runs = {}
    for objective in ("params", "time"):
        model, tok = load_tuned(root)
        runs[objective] = search_plan(model, tok, task, small_config(objective=objective, tolerance=0.99))
    slow_kinds = ("q_proj", "o_proj", "down_proj")
    timed = runs["time"].plan.ranks
    assert all(r is None for name, r in timed.items() if name.endswith(slow_kinds)), timed
    assert all(r is not None for name, r in timed.items() if not name.endswith(slow_kinds)), timed
    params = runs["params"].plan.ranks
    assert any(r is not None for name, r in params.items() if name.endswith(slow_kinds)), params
    # the table's verdict: the time plan costs fewer ms per example than the parameter plan
    model, _ = load_tuned(root)
    from sieve_edge import architectures as arch
    from sieve_edge.factorize import linear_shapes

    priced = TimeObjective(linear_shapes(model), table, 20, 1, arch.linear_groups(model))
    assert priced.breakdown({k: r for k, r in timed.items() if r is not None})["example_ms"] < \
        priced.breakdown({k: r for k, r in params.items() if r is not None})["example_ms"]
    times = runs["time"].times
    assert times["prompt_tokens"] == 20 and times["new_tokens"] == 1 and times["fused_groups"] == 4
    assert times["plan"]["example_ms"] < times["dense"]["example_ms"] and runs["params"].times is None
    assert runs["time"].objective == "time" and 0 < runs["time"].gain < 1


def test_latency_is_the_time_objective():
    assert SearchConfig(objective="latency").objective == "time"


def test_time_objective_for_a_target_of_another_cpu_fails_before_loading(tmp_path):
    import platform

    other = "x86_64" if platform.machine().lower() in ("aarch64", "arm64") else "aarch64"
    profile = tmp_path / "panel.toml"
    profile.write_text(f'schema_version = 4\nname = "panel"\nruntime = "onnxruntime"\nthreads = 4\narch = "{other}"\n')
    with pytest.raises(InputError, match="--objective params"):
        run_search("no-such-model-is-loaded", write_task(tmp_path / "task"), tmp_path / "out",
                   small_config(objective="time", target=str(profile)))


# ---------------------------------------------------------------- holdout

def _holdout_outcome(gains):
    from sieve_edge.ga import Evaluation
    from sieve_edge.search.drivers import Outcome

    feasible = [({"m": int(100 * g) or None}, {"m": 1.0 - g}, Evaluation(g, 0.9, 0.01, True, 0.0, True))
                for g in sorted(gains, reverse=True)]
    best = feasible[0]
    return Outcome(best[0], best[2], [], [], best[1], feasible=feasible)


def _holdout_fakes(monkeypatch, passes_up_to: float):
    """A model whose holdout accuracy is 0.9 for plans removing <= passes_up_to, 0.8 beyond."""
    import sieve_edge.factorize as factorize

    class Model:
        ranks = {}

    class Scorer:
        calls = 0

        def metric(self, model, rows):
            Scorer.calls += 1
            r = model.ranks.get("m")
            return 0.9 if r is None or r / 100 <= passes_up_to + 1e-9 else 0.8

    monkeypatch.setattr(factorize, "set_ranks_", lambda model, ranks: setattr(model, "ranks", dict(ranks)))
    return Model(), Scorer()


@pytest.mark.parametrize("passes_up_to", [0.6, 0.35, 0.11, 0.05])
def test_holdout_keeps_the_largest_plan_within_the_tolerance_on_the_held_out_rows(monkeypatch, passes_up_to):
    from sieve_edge.ga import Evaluation
    from sieve_edge.search.drivers import HOLDOUT_MAX_TRIES, holdout_choice

    gains = [0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.0]
    outcome = _holdout_outcome(gains)
    model, scorer = _holdout_fakes(monkeypatch, passes_up_to)
    dense_ev = Evaluation(0.0, 0.91, 0.0, True)
    got, record = holdout_choice(outcome, model, scorer, list(range(50)), 0.9, 0.02, True, dense_ev, lambda m: None)
    want = max((g for g in gains if 0 < g <= passes_up_to + 1e-9), default=0.0)
    assert got.evaluation.gain == pytest.approx(want)
    assert record["tries"][0]["gain"] == 0.6                      # the search's own plan first
    assert len(record["tries"]) == scorer.calls <= HOLDOUT_MAX_TRIES
    assert record["passed"] == (want > 0)
    if want == 0:   # nothing held: the dense model, with the search's dense validation score
        assert got.evaluation is dense_ev and set(got.ranks.values()) == {None} and got.levels == {"m": 1.0}
    else:
        assert got.ranks == {"m": int(100 * want)} and got.levels == {"m": pytest.approx(1.0 - want)}
    assert model.ranks == {}                                      # left dense


def test_search_with_a_holdout_confirms_its_plan_on_rows_it_never_scored(tuned):
    from sieve_edge.evaluate import make_scorer
    from sieve_edge.search.drivers import holdout_scorer

    root, task_path = tuned
    task = load_task(task_path)
    model, tok = load_tuned(root)
    cfg = small_config(generations=1, val_limit=16, holdout=16)
    search_rows = make_scorer(tok, task, "validation", limit=16)
    big, rows = holdout_scorer(tok, task, cfg, search_rows)
    assert len(rows) == 16
    assert not {big.examples[i].line for i in rows} & {ex.line for ex in search_rows.examples}
    res = search_plan(model, tok, task, cfg)
    h = res.holdout
    assert h is not None and h["rows"] == 16 and h["tries"]
    assert h["tries"][0]["gain"] == pytest.approx(h["search_gain"])
    if h["passed"]:   # the plan kept is the last one that passed the holdout
        assert res.gain == pytest.approx([t["gain"] for t in h["tries"] if t["passed"]][-1])
        assert [t for t in h["tries"] if t["gain"] == pytest.approx(res.gain)][0]["drop"] <= res.tolerance_abs + 1e-12
    else:
        assert res.plan.linear_param_reduction == 0
    assert all(type(m).__name__ != "SearchLinear" for m in model.modules())
    # too few rows beyond --val-limit, or none held out at all: said before anything is scored
    with pytest.raises(InputError, match="has 32 rows.*leaves 8 to hold out"):
        search_plan(model, tok, task, small_config(val_limit=24, holdout=16))
    with pytest.raises(InputError, match="needs --val-limit"):
        search_plan(model, tok, task, small_config(holdout=8))
    with pytest.raises(InputError, match="holdout must be >= 0"):
        small_config(holdout=-1)
    # the holdout is not part of the resumable state's fingerprint: a rerun with another reuses the GA
    assert cfg.fingerprint() == small_config(generations=1, val_limit=16).fingerprint()


def test_a_holdout_rerun_reuses_the_finished_search_and_reports_its_scores(tuned, tmp_path):
    """--holdout keys the search stage (its plan may change) but not the GA's state: a rerun
    with a holdout confirms the finished search's plans without searching again."""
    root, task_path = tuned
    model, tok = load_tuned(root)
    work = tmp_path / "work"
    plain = run_search("tiny", task_path, tmp_path / "plain", small_config(val_limit=16),
                       model=copy.deepcopy(model), tokenizer=tok, work=work)
    held = run_search("tiny", task_path, tmp_path / "held", small_config(val_limit=16, holdout=16),
                      model=copy.deepcopy(model), tokenizer=tok, work=work)
    stages = {s["slot"]: s["status"] for s in json.loads((work / "run.json").read_text())["stages"]}
    assert stages["calibrate"] == "skipped" and stages["search"] == "ran"
    assert held["evaluations"] == plain["evaluations"]           # resumed: no candidate scored again
    assert plain["holdout"] is None and held["holdout"]["rows"] == 16
    assert held["holdout"]["search_gain"] == pytest.approx(plain["objective_gain"])
    assert held["objective_gain"] <= plain["objective_gain"] + 1e-12
    assert "Holdout: 16 validation rows" in (tmp_path / "held" / "search_report.md").read_text()


# ---------------------------------------------------------------- healed choice (--heal-slack)

def _slack_outcome(drops: dict[float, float], accepted: dict[float, float] = {}):
    """Plans by gain with their unhealed validation drops (dense metric 0.9), largest first;
    ``accepted``: plans racing accepted on a subset (their drop an estimate)."""
    from sieve_edge.ga import Evaluation
    from sieve_edge.search.drivers import Outcome

    def plans(d, full):
        return [({"m": int(round(100 * g))}, {"m": 1.0 - g}, Evaluation(g, 0.9 - e, e, True, 0.0, full))
                for g, e in sorted(d.items(), reverse=True)]

    feasible = plans(drops, True)
    best = feasible[0]
    return Outcome(best[0], best[2], [], [], best[1], feasible=feasible, accepted=plans(accepted, False))


def _slack_fakes(monkeypatch, drops: dict[float, float], heal_gain: float):
    """Healing that takes ``heal_gain`` off a plan's full drop (``drops``, by gain)."""
    import sieve_edge.heal as heal
    import sieve_edge.search.drivers as drivers
    from sieve_edge.ga import Evaluation
    from sieve_edge.heal import HealResult

    class Model:
        ranks = {}

    class Scorer:
        calls = 0

        def metric(self, model, rows=None):
            Scorer.calls += 1
            return 0.9 - max(0.0, drops[model.ranks["m"] / 100] - heal_gain)

    def confirm(ranks):
        g = ranks["m"] / 100
        return Evaluation(g, 0.9 - drops[g], drops[g], drops[g] <= 0.05, 0.0, True)

    monkeypatch.setattr(drivers, "_swap_low_rank", lambda model, ranks: model.ranks.update(ranks) or {"m": 1})
    monkeypatch.setattr(drivers, "_swap_back", lambda model, swapped: model.ranks.clear())
    monkeypatch.setattr(heal, "heal_", lambda *a, **k: HealResult(3, 1e-4, 10, float("nan"), float("nan"), True,
                                                                  0.5, 1.0, 0.5))
    return Model(), Scorer(), confirm


DROPS = {0.6: 0.045, 0.55: 0.04, 0.5: 0.035, 0.45: 0.03, 0.4: 0.025, 0.35: 0.02, 0.3: 0.01}


@pytest.mark.parametrize("heal_gain,want,tried", [(0.03, 0.6, [0.6]), (0.022, 0.55, [0.6, 0.55]),
                                                  (0.015, 0.5, [0.6, 0.5]), (0.0, 0.35, [0.6])])
def test_heal_slack_keeps_the_largest_plan_that_heals_within_the_tolerance(monkeypatch, heal_gain, want, tried):
    """Plans 0.6..0.4 are beyond the 0.02 tolerance unhealed (within 0.05 = tolerance + slack),
    0.35 and 0.3 within it. The search's plan is healed first; the next try is the largest
    plan below a failed one whose drop, less the heal gain measured, is within the tolerance;
    none such (no gain at all) keeps the fallback, the largest plan within it unhealed."""
    from sieve_edge.ga import Evaluation
    from sieve_edge.search.drivers import HEAL_MAX_TRIES, heal_choice

    model, scorer, confirm = _slack_fakes(monkeypatch, DROPS, heal_gain)
    cfg = small_config(tolerance=0.02, heal_slack=0.03, heal_steps=3)
    got, record = heal_choice(_slack_outcome(DROPS), model, None, None, scorer, cfg, 0.02, 0.9, True,
                              Evaluation(0.0, 0.9, 0.0, True), lambda m: None, confirm)
    assert got.evaluation.gain == pytest.approx(want) and got.ranks == {"m": int(round(100 * want))}
    assert [t["gain"] for t in record["tries"]] == tried and scorer.calls == len(tried) <= HEAL_MAX_TRIES
    assert all(t["search_drop"] > 0.02 for t in record["tries"])   # a plan within the tolerance needs no try
    assert record["tries"][0]["predicted_drop"] is None
    assert all(t["predicted_drop"] == pytest.approx(t["search_drop"] - heal_gain) for t in record["tries"][1:])
    assert record["fallback_gain"] == 0.35 and record["healed"] == (want > 0.35)
    assert record["refit_tolerance_abs"] == (DROPS[want] if want > 0.35 else None)
    assert model.ranks == {}


def test_heal_slack_scores_racing_estimates_in_full_before_relying_on_them(monkeypatch):
    """A racing-accepted plan estimated within the tolerance is scored in full: kept as the
    fallback if it holds; a plan only racing estimated is scored in full before it is healed."""
    from sieve_edge.ga import Evaluation
    from sieve_edge.search.drivers import heal_choice

    drops = {**DROPS, 0.38: 0.019, 0.42: 0.05, 0.39: 0.03}
    model, scorer, confirm = _slack_fakes(monkeypatch, drops, 0.0)
    outcome = _slack_outcome({g: DROPS[g] for g in (0.6, 0.35)}, accepted={0.42: 0.015, 0.38: 0.01, 0.39: 0.022})
    got, record = heal_choice(outcome, model, None, None, scorer,
                              small_config(tolerance=0.02, heal_slack=0.03, heal_steps=3), 0.02, 0.9, True,
                              Evaluation(0.0, 0.9, 0.0, True), lambda m: None, confirm)
    # 0.42 (estimate 0.015) is beyond in full, 0.38 (estimate 0.01) holds: the fallback, above 0.35
    assert [c["gain"] for c in record["confirmed"]] == [0.42, 0.38] and record["fallback_gain"] == 0.38
    assert got.evaluation.gain == 0.38 and got.evaluation.full and not record["healed"]
    # no heal gain: 0.6 fails and nothing else is expected to heal within the tolerance
    assert [t["gain"] for t in record["tries"]] == [0.6]


def test_heal_slack_scores_an_estimate_in_full_before_healing_it_and_skips_it_if_it_no_longer_predicts_a_pass(
        monkeypatch):
    from sieve_edge.ga import Evaluation
    from sieve_edge.search.drivers import heal_choice

    # heal gain 0.015 (measured on 0.6): 0.5 and 0.45 are estimated to pass, but 0.5 drops 0.04 in full
    drops = {**DROPS, 0.5: 0.04}
    model, scorer, confirm = _slack_fakes(monkeypatch, drops, 0.015)
    outcome = _slack_outcome({g: DROPS[g] for g in (0.6, 0.35)}, accepted={0.5: 0.03, 0.45: 0.03})
    got, record = heal_choice(outcome, model, None, None, scorer,
                              small_config(tolerance=0.02, heal_slack=0.03, heal_steps=3), 0.02, 0.9, True,
                              Evaluation(0.0, 0.9, 0.0, True), lambda m: None, confirm)
    assert [c["gain"] for c in record["confirmed"]] == [0.5, 0.45]     # each scored in full once
    assert [t["gain"] for t in record["tries"]] == [0.6, 0.45]          # 0.5 skipped, not healed
    assert got.evaluation.gain == 0.45 and record["healed"]


def test_heal_slack_does_not_heal_a_plan_barely_larger_than_the_fallback(monkeypatch):
    """0.355 is expected to heal within the tolerance after 0.6's heal gain, but it removes
    less than HEAL_MIN_GAIN more than the fallback 0.35: a heal of minutes is not spent on it."""
    from sieve_edge.ga import Evaluation
    from sieve_edge.search.drivers import HEAL_MIN_GAIN, heal_choice

    drops = {0.6: 0.045, 0.355: 0.021, 0.35: 0.02}
    model, scorer, confirm = _slack_fakes(monkeypatch, drops, 0.015)
    got, record = heal_choice(_slack_outcome(drops), model, None, None, scorer,
                              small_config(tolerance=0.02, heal_slack=0.03, heal_steps=3), 0.02, 0.9, True,
                              Evaluation(0.0, 0.9, 0.0, True), lambda m: None, confirm)
    assert 0.355 - 0.35 < HEAL_MIN_GAIN
    assert [t["gain"] for t in record["tries"]] == [0.6] and got.evaluation.gain == 0.35


def test_heal_slack_without_a_plan_within_the_tolerance_falls_back_to_dense(monkeypatch):
    from sieve_edge.ga import Evaluation
    from sieve_edge.search.drivers import heal_choice

    drops = {0.5: 0.04, 0.3: 0.03}
    model, scorer, confirm = _slack_fakes(monkeypatch, drops, 0.0)
    dense_ev = Evaluation(0.0, 0.9, 0.0, True)
    got, record = heal_choice(_slack_outcome(drops), model, None, None, scorer,
                              small_config(tolerance=0.02, heal_slack=0.03, heal_steps=3), 0.02, 0.9, True,
                              dense_ev, lambda m: None, confirm)
    assert got.evaluation is dense_ev and got.ranks == {"m": None} and not record["healed"]
    assert [t["gain"] for t in record["tries"]] == [0.5]


def test_search_with_a_heal_slack_heals_the_plans_beyond_the_tolerance(tuned):
    from sieve_edge.factorize import LowRankLinear, SearchLinear

    root, task_path = tuned
    task = load_task(task_path)
    model, tok = load_tuned(root)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = small_config(tolerance=0.02, heal_slack=0.2, heal_steps=4, heal_lr=1e-3, generations=1)
    res = search_plan(model, tok, task, cfg)
    h = res.healing
    assert h is not None and h["slack"] == 0.2 and res.tolerance_abs == pytest.approx(0.02)
    assert all(t["search_drop"] > 0.02 for t in h["tries"]) and len(h["tries"]) <= 3
    assert all(c["drop"] is not None for c in h["confirmed"])
    if h["healed"]:   # kept: a try that healed within the tolerance
        assert [t for t in h["tries"] if t["gain"] == pytest.approx(res.gain)][0]["drop"] <= 0.02 + 1e-12
    else:             # the largest plan within the tolerance unhealed, or dense
        assert res.gain == pytest.approx(h["fallback_gain"])
    # healing trained copies of the factors: the model is dense and unchanged
    assert not any(isinstance(m, (SearchLinear, LowRankLinear)) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the GA is the search at tolerance + slack: its state is that search's
    assert cfg.fingerprint() == small_config(tolerance=0.22, generations=1).fingerprint()
    with pytest.raises(InputError, match="needs --heal-steps"):
        small_config(heal_slack=0.02)
    with pytest.raises(InputError, match="--holdout do not combine"):
        small_config(heal_slack=0.02, heal_steps=2, holdout=8, val_limit=8)
    with pytest.raises(BudgetError, match="heal slack"):
        small_config(tolerance=0.5, heal_slack=0.5, heal_steps=2)


def test_a_heal_slack_rerun_resumes_the_search_at_tolerance_plus_slack(tuned, tmp_path):
    """A finished search at 0.22 is the GA of a search at 0.02 with slack 0.2: the rerun scores
    no candidate again, heals, refits and reports the healed choice."""
    root, task_path = tuned
    model, tok = load_tuned(root)
    work = tmp_path / "work"
    wide = run_search("tiny", task_path, tmp_path / "wide", small_config(tolerance=0.22, generations=1),
                      model=copy.deepcopy(model), tokenizer=tok, work=work)
    slack = run_search("tiny", task_path, tmp_path / "slack",
                       small_config(tolerance=0.02, heal_slack=0.2, heal_steps=4, heal_lr=1e-3, generations=1),
                       model=copy.deepcopy(model), tokenizer=tok, work=work)
    assert slack["evaluations"] == wide["evaluations"]
    assert slack["healing"]["search_gain"] == pytest.approx(wide["objective_gain"])
    assert slack["tolerance"] == 0.02 and slack["heal_slack"] == 0.2
    assert (slack["heal"] is not None) == (slack["linear_param_reduction"] > 0)   # the refit heals what it keeps
    tried = [tuple(sorted(t.items())) for t in slack["healing"]["tries"]]
    assert len(tried) == len(set(tried))
    assert slack["objective_gain"] <= wide["objective_gain"] + 1e-12
    assert "Healed choice:" in (tmp_path / "slack" / "search_report.md").read_text()


@pytest.mark.parametrize("searched_score, kept", [(0.86, True), (0.84, False)])
def test_a_healed_refit_beyond_the_tolerance_heals_the_searched_factors_and_keeps_the_better(
        tiny_llama, searched_score, kept):
    """The refit stage's fallback for a healed choice: the searched factors swap in, heal, and
    stay only if they score better than the healed refit (0.85); else the refit's own pairs,
    the very modules, go back."""
    from sieve_edge import architectures as arch
    from sieve_edge.factorize import LowRankLinear, factorize_, module_shape
    from sieve_edge.heal import HealResult
    from sieve_edge.search.stage import heal_searched_instead_

    names = arch.linear_names(tiny_llama)[:3]

    def pair(seed, r=2):
        g = torch.Generator().manual_seed(seed)
        out = {}
        for n in names:
            m, k = module_shape(arch.get_module(tiny_llama, n))
            out[n] = (torch.randn(m, r, generator=g), torch.randn(r, k, generator=g))
        return out

    factorize_(tiny_llama, pair(1))
    own = {n: arch.get_module(tiny_llama, n) for n in names}
    searched = pair(2)
    seen = {}

    def heal(model):  # what it is handed: the searched factors, as LowRankLinear pairs
        seen.update({n: arch.get_module(model, n) for n in names})
        return HealResult(4, 1e-4, 0, 0.80, searched_score, True, 0.0, 1.0, 0.5)

    h, swapped, got = heal_searched_instead_(tiny_llama, searched, heal, 0.85, True)
    assert swapped is kept and got == searched_score and h.metric_after == searched_score
    for n in names:
        assert isinstance(seen[n], LowRankLinear) and seen[n] is not own[n]
        assert torch.equal(seen[n].first.weight, searched[n][1]) and torch.equal(seen[n].second.weight, searched[n][0])
        assert (arch.get_module(tiny_llama, n) is seen[n]) is kept
        assert (arch.get_module(tiny_llama, n) is own[n]) is not kept


@pytest.mark.parametrize("searched_wins", [False, True])
def test_a_healed_choice_whose_healed_refit_misses_ships_the_better_of_it_and_the_healed_searched_factors(
        tuned, tmp_path, monkeypatch, searched_wins):
    """The search's plan is recorded as healed within a tolerance of ~0 (which its sieve refit,
    healed, misses): the refit stage heals the searched factors too and ships the better one,
    and the checkpoint, its manifest and the summary agree on which. (On this tiny model the
    refit scores better; ``searched_wins`` makes the searched factors win whatever they score.)"""
    from sieve_edge.checkpoint import load_checkpoint, read_manifest
    from sieve_edge.evaluate import evaluate
    from sieve_edge.plan import RankPlan
    from sieve_edge.search import drivers
    from sieve_edge.search import stage as search_stage

    def healed_as_searched(outcome, *args, **kwargs):
        ev = outcome.evaluation
        try_ = {"gain": ev.gain, "search_metric": ev.metric, "search_drop": ev.drop, "predicted_drop": None,
                "metric": ev.metric, "drop": 0.0, "passed": True, "seconds": 0.0, "loss_first": 1.0, "loss_last": 0.5}
        return outcome, {"slack": 0.2, "tolerance_abs": 0.0, "steps": 4, "loss": "ce", "lr": 1e-3,
                         "search_gain": ev.gain, "fallback_gain": 0.0, "confirmed": [], "tries": [try_],
                         "healed": True, "gain": ev.gain, "refit_tolerance_abs": ev.drop}

    monkeypatch.setattr(drivers, "heal_choice", healed_as_searched)
    if searched_wins:
        real = search_stage.heal_searched_instead_
        monkeypatch.setattr(search_stage, "heal_searched_instead_",
                            lambda refit, factors, heal, current, higher: real(refit, factors, heal, -1.0, higher))
    root, task_path = tuned
    model, tok = load_tuned(root)
    out = tmp_path / "out"
    s = run_search("tiny", task_path, out, small_config(tolerance=1e-6, heal_slack=0.2, heal_steps=4, heal_lr=1e-8,
                                                         generations=1), model=model, tokenizer=tok)
    assert s["linear_param_reduction"] > 0 and s["heal"] is not None
    assert s["validation"]["dense"] - s["heal"]["metric_after"] > 0   # the healed refit missed
    h = s["heal_searched"]
    assert h is not None and h["steps"] == 4
    searched = h["metric_after"] if h["kept"] else h["metric_before"]
    refit = s["heal"]["metric_after"] if s["heal"]["kept"] else s["heal"]["metric_before"]
    assert s["validation"]["final"] == (searched if searched_wins else max(searched, refit))
    assert s["method"] == ("output" if searched_wins or searched > refit else "sieve") == read_manifest(out)["method"]
    assert RankPlan.from_json(out / "plan.json").method == s["method"]
    assert any("healed again" in n for n in s["notes"])
    assert "Healing the searched factors instead" in (out / "search_report.md").read_text()
    assert evaluate(load_checkpoint(out), tok, load_task(task_path), "validation").value == pytest.approx(
        s["validation"]["final"], abs=1e-9)


def climb_keeps_every_refit(monkeypatch) -> None:
    """Hold every refit try to a huge tolerance, so that a larger plan is kept for sure."""
    from sieve_edge.search import climb as climb_module

    real = climb_module.climb
    monkeypatch.setattr(climb_module, "climb", lambda cands, **kw: real(cands, **{**kw, "tolerance": 10.0}))


@pytest.mark.parametrize("everything_passes", [False, True])
def test_refit_tries_keep_the_largest_plan_whose_refit_passes_and_ship_it_consistently(
        tuned, tmp_path, monkeypatch, everything_passes):
    """--refit-tries on a tiny model: every try is recorded with its refit drop, the plan kept
    is the searched one or a larger one that passed, and the checkpoint, its manifest,
    plan.json, the summary and the report all describe that one plan. With
    ``everything_passes`` the climb holds every refit to a huge tolerance, so a larger plan
    is kept for sure."""
    from sieve_edge.checkpoint import load_checkpoint, read_manifest
    from sieve_edge.evaluate import evaluate
    from sieve_edge.plan import RankPlan
    if everything_passes:
        climb_keeps_every_refit(monkeypatch)
    root, task_path = tuned
    model, tok = load_tuned(root)
    out = tmp_path / "out"
    s = run_search("tiny", task_path, out, small_config(refit_tries=2), model=model, tokenizer=tok)
    c = s["refit_tries"]
    assert c is not None and c["searched_gain"] > 0 and len(c["tries"]) <= 2
    searched = json.loads((out / "search.json").read_text())
    assert searched["refit_tries"] == c
    plan = RankPlan.from_json(out / "plan.json")
    assert read_manifest(out)["ranks"] == plan.factorized
    assert s["linear_param_reduction"] == pytest.approx(plan.linear_param_reduction, abs=1e-12)
    assert abs(read_manifest(out)["linear_param_reduction"] - plan.linear_param_reduction) < 1e-5
    passed = [t["gain"] for t in c["tries"] if t["passed"]]
    assert c["kept"] == bool(passed) and c["gain"] == (max(passed) if passed else c["searched_gain"])
    for t in c["tries"]:
        assert t["gain"] > c["searched_gain"]
        if not everything_passes:
            assert t["passed"] == (t["drop"] <= s["tolerance_abs"] + 1e-12)
    if everything_passes:
        assert c["kept"] and c["gain"] > c["searched_gain"]
        assert any("refit tries: kept" in n for n in s["notes"])
    assert plan.meta["objective_gain"] == pytest.approx(c["gain"])
    assert "Refit tries" in (out / "search_report.md").read_text()
    assert evaluate(load_checkpoint(out), tok, load_task(task_path), "validation").value == pytest.approx(
        s["validation"]["final"], abs=1e-9)
    if not everything_passes:
        assert s["validation"]["dense"] - s["validation"]["final"] <= s["tolerance_abs"] + 1e-12


def test_refit_tries_of_a_model_folder_load_it_per_try_and_reuse_the_fit(tuned, tmp_path, monkeypatch):
    """A model given as a folder: each try refits a model loaded from it (the first the one
    loaded to build the scorers), and the kept checkpoint scores what the summary says.
    Another number of tries reruns the climb stage alone: the fit is reused."""
    from sieve_edge.checkpoint import load_checkpoint
    from sieve_edge.evaluate import evaluate
    from sieve_edge.stages import RECORD

    climb_keeps_every_refit(monkeypatch)
    root, task_path = tuned
    out, work = tmp_path / "out", tmp_path / "work"
    s = run_search(str(root / "model"), task_path, out, small_config(refit_tries=1), work=work)
    c = s["refit_tries"]
    assert c["kept"] and len(c["tries"]) == 1 and c["gain"] > c["searched_gain"]
    _, tok = load_tuned(root)
    assert evaluate(load_checkpoint(out), tok, load_task(task_path), "validation").value == pytest.approx(
        s["validation"]["final"], abs=1e-9)
    fit_record, climb_record = (json.loads((work / f"{slot}.{RECORD}").read_text()) for slot in ("fit", "climb"))
    s2 = run_search(str(root / "model"), task_path, tmp_path / "out2", small_config(refit_tries=2), work=work)
    assert json.loads((work / f"fit.{RECORD}").read_text()) == fit_record  # the fit was not run again
    assert json.loads((work / f"climb.{RECORD}").read_text())["key"] != climb_record["key"]
    assert s2["refit_tries"]["tries"] == c["tries"] and s2["refit_tries"]["tries_allowed"] == 2


def test_refit_tries_with_holdout_hold_each_try_to_the_tolerance_on_the_held_out_rows_too(tuned, tmp_path,
                                                                                         monkeypatch):
    """--refit-tries with --holdout: every try is scored on the search's rows and on the held-out
    rows, against the dense model on the same rows (the search's own holdout score of it), and
    its drop is the larger of the two; the report says so."""
    climb_keeps_every_refit(monkeypatch)
    root, task_path = tuned
    model, tok = load_tuned(root)
    out = tmp_path / "out"
    s = run_search("tiny", task_path, out, small_config(refit_tries=2, val_limit=16, holdout=16), model=model,
                   tokenizer=tok)
    c = s["refit_tries"]
    assert c["tries"] and c["holdout"]["rows"] == 16 and c["holdout"]["dense"] == s["holdout"]["dense"]
    assert [t["gain"] for t in c["holdout"]["tries"]] == [t["gain"] for t in c["tries"]]
    for t, h in zip(c["tries"], c["holdout"]["tries"]):
        assert t["drop"] == max(h["validation_drop"], h["holdout_drop"])
        assert h["holdout_drop"] == pytest.approx(c["holdout"]["dense"] - h["holdout"], abs=1e-12)
    assert "held-out rows" in (out / "search_report.md").read_text()


def test_refit_tries_keep_a_plan_made_between_a_failed_and_a_passed_try(tuned, tmp_path, monkeypatch):
    """The largest measured plan's try is held to fail (its refit still runs), the others to
    pass: the climb makes the plan halfway between the searched plan and that one, refits it
    and keeps it; the checkpoint, plan.json, summary, report and plots describe that plan,
    which the search never scored."""
    from sieve_edge.checkpoint import load_checkpoint, read_manifest
    from sieve_edge.evaluate import evaluate
    from sieve_edge.plan import RankPlan
    from sieve_edge.search import climb as climb_module

    real = climb_module.climb

    def first_fails(cands, **kw):
        refit_drop = kw["refit_drop"]

        def drop(c):
            d = refit_drop(c)
            return 100.0 if not c.made else d
        return real(cands[:1], **{**kw, "tolerance": 10.0, "refit_drop": drop})

    monkeypatch.setattr(climb_module, "climb", first_fails)
    monkeypatch.setattr(climb_module, "RESOLUTION", 1e-3)  # the tiny model's plans lie close together
    root, task_path = tuned
    model, tok = load_tuned(root)
    out = tmp_path / "out"
    s = run_search("tiny", task_path, out, small_config(refit_tries=2), model=model, tokenizer=tok)
    c = s["refit_tries"]
    assert [t["made"] for t in c["tries"]] == [False, True] and [t["passed"] for t in c["tries"]] == [False, True]
    largest = c["tries"][0]["gain"]
    assert c["kept"] and c["searched_gain"] < c["gain"] == c["tries"][1]["gain"] < largest
    assert c["tries"][1]["search_drop"] is None and s["validation"]["search"] is None
    plan = RankPlan.from_json(out / "plan.json")
    assert plan.meta["refit_tries"]["made"] and read_manifest(out)["ranks"] == plan.factorized
    assert plan.meta["objective_gain"] == pytest.approx(c["gain"]) == pytest.approx(plan.linear_param_reduction)
    report = (out / "search_report.md").read_text()
    assert "never searched" in report and (out / "frontier.png").is_file() and (out / "heatmap.png").is_file()
    assert evaluate(load_checkpoint(out), tok, load_task(task_path), "validation").value == pytest.approx(
        s["validation"]["final"], abs=1e-9)


def test_healed_refit_tries_start_from_the_searched_factors_when_the_fits_refit_missed(tuned, tmp_path, monkeypatch):
    """The fit's `sieve` refit misses the tolerance (here: the stages read a tolerance no refit
    meets; the climb's tries are held to a huge one), so the fit keeps the searched `output`
    factors. Without healing no larger plan is tried; with --heal-steps the tries are judged
    healed, so the climb starts from those factors (gap 0) and a `sieve` plan it keeps ships
    as `sieve` (manifest, plan, summary)."""
    from sieve_edge.checkpoint import read_manifest
    from sieve_edge.plan import RankPlan
    from sieve_edge.search import stage

    real = stage._read_json

    def unmeetable(path):
        data = real(path)
        return {**data, "tolerance_abs": -1.0} if Path(path).name == "result.json" else data

    climb_keeps_every_refit(monkeypatch)
    monkeypatch.setattr(stage, "_read_json", unmeetable)
    root, task_path = tuned
    model, tok = load_tuned(root)
    for heal_steps in (0, 2):
        out = tmp_path / f"out{heal_steps}"
        s = run_search("tiny", task_path, out, small_config(refit_tries=1, heal_steps=heal_steps),
                       model=copy.deepcopy(model), tokenizer=tok)
        assert any("kept the 'output' factors" in n for n in s["notes"])
        c = s.get("refit_tries")
        if not heal_steps:
            assert c is None and s["method"] == "output"
            continue
        assert c["start"] == "output" and c["method"] == "sieve" and c["start_gap"] == pytest.approx(0.0, abs=1e-9)
        assert c["kept"] and s["method"] == "sieve" == read_manifest(out)["method"]
        assert RankPlan.from_json(out / "plan.json").method == "sieve"
        assert "started as the fit kept it" in (out / "search_report.md").read_text()


def test_refit_tries_refuse_settings_they_cannot_serve():
    with pytest.raises(InputError, match="method 'output' is the one the search scores with"):
        small_config(refit_tries=2, method="output")
    with pytest.raises(InputError, match="--objective params"):
        small_config(refit_tries=2, objective="time")
    with pytest.raises(InputError, match="refit_tries must be an integer >= 0"):
        small_config(refit_tries=-1)


def test_a_new_climb_rule_or_number_of_tries_redoes_the_climb_and_only_that(tuned, monkeypatch):
    # finished tries an older rule chose must not be reused as if the new rule had chosen them;
    # the fit (the searched plan's refit) depends on neither the rule nor the number of tries
    from sieve_edge.search import search_stages, stage
    from sieve_edge.stages import Workflow, model_ref

    root, task_path = tuned

    def keys(cfg):
        stages = search_stages(model_ref(str(root / "model")), load_task(task_path), cfg, budget_minutes=None,
                               test_limit=None, on_state_mismatch="restart", score_test=False)
        return Workflow(root / "keys", stages).keys()

    tries, plain, three = keys(small_config(refit_tries=2)), keys(small_config()), keys(small_config(refit_tries=3))
    assert "climb" not in plain and tries["fit"] == plain["fit"] == three["fit"]
    assert three["climb"] != tries["climb"] and three["refit"] != tries["refit"] != plain["refit"]
    monkeypatch.setattr(stage, "CLIMB_RULE", stage.CLIMB_RULE + 1)
    tries2, plain2 = keys(small_config(refit_tries=2)), keys(small_config())
    assert plain2 == plain
    assert tries2["climb"] != tries["climb"] and tries2["refit"] != tries["refit"]
    assert tries2["fit"] == tries["fit"] and tries2["search"] == tries["search"]
    # healed tries: the heal settings are the climb's key too (not the fit's)
    healed, healed_more = keys(small_config(refit_tries=2, heal_steps=2)), keys(small_config(refit_tries=2, heal_steps=3))
    assert healed["fit"] == tries2["fit"] and healed["climb"] != tries2["climb"] != healed_more["climb"]


def test_refit_tries_with_healing_judge_each_try_healed_and_ship_the_kept_one_without_healing_it_again(
        tuned, tmp_path, monkeypatch):
    """--refit-tries with --heal-steps: each try is healed before it is judged, its drop is the
    healed one, and the plan kept ships with that heal: the refit stage does not heal it again
    (one heal per try, none after), and the checkpoint scores what the summary says."""
    from sieve_edge import heal as heal_module
    from sieve_edge.checkpoint import load_checkpoint
    from sieve_edge.evaluate import evaluate

    climb_keeps_every_refit(monkeypatch)
    calls = []
    real_heal = heal_module.heal_
    monkeypatch.setattr(heal_module, "heal_", lambda *a, **kw: calls.append(1) or real_heal(*a, **kw))
    root, task_path = tuned
    model, tok = load_tuned(root)
    out = tmp_path / "out"
    s = run_search("tiny", task_path, out, small_config(refit_tries=2, heal_steps=2), model=model, tokenizer=tok)
    c = s["refit_tries"]
    assert c["kept"] and c["tries"] and len(calls) == len(c["tries"])
    h = c["healing"]
    assert h["steps"] == 2 and [t["gain"] for t in h["tries"]] == [t["gain"] for t in c["tries"]]
    dense = s["validation"]["dense"]
    for t, ht in zip(c["tries"], h["tries"]):
        assert t["drop"] == ht["drop"] == pytest.approx(dense - (ht["healed"] if ht["kept"] else ht["refit"]))
        assert ht["refit_drop"] == pytest.approx(dense - ht["refit"])
    kept = next(ht for ht in reversed(h["tries"]) if ht["gain"] == c["gain"])
    assert s["heal"] == c["heal"] and c["heal"]["metric_before"] == kept["refit"]
    assert s["validation"]["refit"] == kept["refit"] and s["validation"]["final"] == c["validation"]
    assert "before it was judged" in (out / "search_report.md").read_text()
    assert evaluate(load_checkpoint(out), tok, load_task(task_path), "validation").value == pytest.approx(
        s["validation"]["final"], abs=1e-9)
