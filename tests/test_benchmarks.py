"""The search benchmark's bookkeeping: which rows run, and how result files merge (no model is loaded)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_search", ROOT / "benchmarks" / "search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(task, strategy, tol, reduction, budget=6.0):
    return {"task": task, "strategy": strategy, "tolerance": tol, "reduction": reduction,
            "val_dense": 0.9, "val_final": 0.89, "test_dense": 0.9, "test_pruned": 0.88, "test_drop": 0.02,
            "evaluations": 10, "search_minutes": 5.0, "total_minutes": 9.0, "out": "x",
            "budget_minutes": budget, "method": "sieve"}


def test_only_picks_rows_and_rejects_unknown_strategies(bench, capsys):
    assert bench.parse_args(["--only", "ga-sieve@0.01,uniform-sieve@0.05"]).pairs == \
        [(0.01, "ga-sieve"), (0.05, "uniform-sieve")]
    assert len(bench.parse_args([]).pairs) == 6   # every strategy at both tolerances
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
