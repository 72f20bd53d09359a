"""Search candidates scored on a local Ray cluster: the same plan as one process, also when a
worker dies mid-generation. Skipped when ray (the optional extra ``.[ray]``) is not installed."""
from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray", reason="ray is an optional extra: pip install 'sieve-edge[ray]'")

from sieve_edge.search import run_search, search_plan  # noqa: E402
from sieve_edge.search.distributed import KILL_WORKER_ENV, RayWorkers  # noqa: E402
from sieve_edge.tasks import load_task  # noqa: E402
from test_search import load_tuned, small_config, tuned  # noqa: E402,F401 - tuned is a fixture

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module (starting Ray takes ~10 s)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _same_search(a, b) -> None:
    assert b.plan.ranks == a.plan.ranks
    assert (b.metric, b.gain, b.evaluations, b.full_evaluations) == (a.metric, a.gain, a.evaluations,
                                                                    a.full_evaluations)
    # per generation, whole-split evaluations are counted where a race ended: one process continues a
    # candidate's race from its own row cache, a worker from its own, so the count may land one
    # generation apart (the totals above are equal); everything else must match
    untimed = lambda history: [{k: v for k, v in r.items() if k not in ("seconds", "full_evaluations")}  # noqa: E731
                               for r in history]
    assert untimed(b.history) == untimed(a.history)
    assert b.frontier == a.frontier  # every candidate scored, in the same order, none twice


@pytest.fixture(scope="module")
def single(tuned):  # noqa: F811
    root, task_path = tuned
    model, tok = load_tuned(root)
    return search_plan(model, tok, load_task(task_path), small_config(generations=2))


def test_two_ray_workers_give_the_single_process_plan(tuned, cluster, single):  # noqa: F811
    root, task_path = tuned
    model, tok = load_tuned(root)
    lines = []
    res = search_plan(model, tok, load_task(task_path), small_config(generations=2),
                      workers=RayWorkers(workers=2), log=lines.append)
    _same_search(single, res)
    assert any("2 Ray workers ready" in m for m in lines)
    assert any("candidates/s" in m for m in lines)      # the throughput across workers is shown
    assert ray.is_initialized()  # a cluster the caller started is left running


def test_a_worker_killed_mid_generation_gives_the_same_plan(tuned, cluster, single, monkeypatch):  # noqa: F811
    root, task_path = tuned
    model, tok = load_tuned(root)
    monkeypatch.setenv(KILL_WORKER_ENV, "1:2")  # the 2nd candidate of generation 0: its worker exits holding it
    lines = []
    res = search_plan(model, tok, load_task(task_path), small_config(generations=2),
                      workers=RayWorkers(workers=2), log=lines.append)
    died = [i for i, m in enumerate(lines) if "died scoring candidate 2 of" in m]
    assert len(died) == 1
    seeded = next(i for i, m in enumerate(lines) if m.startswith("search: seeds:"))
    assert died[0] > seeded  # during a generation, not the one-at-a-time seeding
    _same_search(single, res)


def test_run_search_with_workers_loads_model_and_factors_from_disk(tuned, cluster, tmp_path):  # noqa: F811
    root, task_path = tuned
    out = tmp_path / "out"
    cfg = small_config(generations=1)
    run_search(str(root / "model"), task_path, out, cfg)
    plan = json.loads((out / "plan.json").read_text())
    lines = []
    run_search(str(root / "model"), task_path, out, cfg, force=True, workers=RayWorkers(workers=2),
               log=lines.append)
    assert any(m.startswith("[calibrate] skipped") for m in lines)  # the actors read its folder
    assert any("2 Ray workers ready" in m for m in lines)
    assert json.loads((out / "plan.json").read_text())["ranks"] == plan["ranks"]
