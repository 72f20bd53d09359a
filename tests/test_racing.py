"""Racing on synthetic per-row scores: early decisions hold to the stated confidence."""
from __future__ import annotations

import math
import random

import pytest

from sieve_edge.search.evaluator import race_decision, race_stages

N, FIRST, Z = 240, 30, 2.0


def population(drop: float, flips_back: float, rng: random.Random) -> list[int]:
    """N per-row paired drops (dense correct - candidate correct) whose mean is ``drop``
    exactly: some rows lost (1), ``flips_back`` of them won back (-1), the rest equal (0)."""
    won = round(flips_back * N)
    lost = round(drop * N) + won
    rows = [1] * lost + [-1] * won + [0] * (N - lost - won)
    rng.shuffle(rows)
    return rows


def race(rows: list[int], tol: float, rng: random.Random) -> tuple[str, int]:
    """The evaluator's loop: one random order, growing prefixes, stop at the first verdict."""
    order = list(range(N))
    rng.shuffle(order)
    for upto in race_stages(N, FIRST):
        verdict = race_decision([rows[i] for i in order[:upto]], N, tol, Z)
        if verdict.verdict != "more":
            return verdict.verdict, upto
    raise AssertionError("the last look is on the whole split and always decides")


def test_stages_double_up_to_the_whole_split():
    assert race_stages(240, 30) == [30, 60, 120, 240]
    assert race_stages(100, 0) == [100] and race_stages(50, 64) == [50]


def test_on_the_whole_split_the_verdict_is_exact():
    rows = [1] * 3 + [0] * 97
    assert race_decision(rows, 100, 0.03, Z).verdict == "accept"
    assert race_decision(rows, 100, 0.02, Z).verdict == "reject"


def test_no_disagreement_on_a_small_subset_is_not_proof():
    # 30 rows without a single flip: the floor on the variance keeps the race going
    assert race_decision([0] * 30, 240, 0.01, Z).verdict == "more"


@pytest.mark.parametrize("tol", [3 / N, 12 / N])      # 1.25 and 5 points
@pytest.mark.parametrize("excess", [1, 3, 8])          # full-split drop beyond the tolerance, in rows
@pytest.mark.parametrize("flips_back", [0.0, 0.05])
def test_racing_never_accepts_beyond_the_tolerance_more_often_than_stated(tol, excess, flips_back):
    # The stated confidence: each early look errs with probability about Φ(-z); a candidate
    # takes at most len(stages) - 1 early looks, so an infeasible one is accepted with
    # probability at most (looks) x Φ(-z). Checked over 400 random orders, with 3-sigma room
    # for the Monte Carlo error; the last look (whole split) never errs.
    rng = random.Random(7)
    drop = tol + excess / N
    looks = len(race_stages(N, FIRST)) - 1
    bound = looks * 0.5 * math.erfc(Z / math.sqrt(2))
    trials, accepted = 400, 0
    for _ in range(trials):
        rows = population(drop, flips_back, rng)
        assert sum(rows) / N == pytest.approx(drop)
        verdict, upto = race(rows, tol, rng)
        if verdict == "accept":
            assert upto < N, "accepted on the whole split while beyond the tolerance"
            accepted += 1
    slack = 3 * math.sqrt(bound * (1 - bound) / trials)
    assert accepted / trials <= bound + slack, (accepted, trials, bound)


def test_racing_saves_rows_on_clear_candidates_and_decides_them_right():
    rng = random.Random(3)
    tol = 0.05
    for drop, want in ((0.0, "accept"), (0.30, "reject")):
        used, right = [], 0
        for _ in range(100):
            verdict, upto = race(population(drop, 0.0, rng), tol, rng)
            used.append(upto)
            right += verdict == want
        assert right >= 97
        assert sum(used) / len(used) < 0.6 * N   # clear candidates stop early


def test_a_raced_accuracy_estimate_stays_within_0_and_1(monkeypatch):
    """On a subset the candidate can beat the dense model; the estimate (the full split's dense
    accuracy less the subset's paired drop) must still read as an accuracy."""
    import torch

    import sieve_edge.factorize
    from sieve_edge.search.evaluator import CandidateEvaluator

    monkeypatch.setattr(sieve_edge.factorize, "set_ranks_", lambda model, ranks: model)
    n = 240
    labels = torch.zeros(n, dtype=torch.long)
    dense = torch.tensor([[0.0, -5.0]]).repeat(n, 1)      # right on every row ...
    first = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:4]   # the evaluator's order, seed 0
    dense[first] = torch.tensor([-5.0, 0.0])              # ... but 4 rows the race scores first: 236/240
    state = {"lp": dense}

    class Scorer:                                         # the label scorer's interface, canned answers
        def __init__(self):
            self.n, self.labels = n, labels

        def label_logprobs(self, model, subset):
            return state["lp"][subset]

    class Objective:
        def gain(self, ranks):
            return 0.5

    ev = CandidateEvaluator(torch.nn.Linear(1, 1), Scorer(), Objective(), 0.01, race_size=30, race_z=2.0, seed=0)
    state["lp"] = torch.tensor([[0.0, -5.0]]).repeat(n, 1)   # the candidate is right everywhere
    got = ev({"m": 1})
    assert got.feasible and not got.full and got.rows < n      # racing accepted it on a subset
    assert got.drop <= -4 / got.rows                           # it beat the dense model there
    assert 0.0 <= got.metric <= 1.0
    full = ev.confirm({"m": 1})
    assert full.full and full.metric == 1.0 and abs(full.drop + 4 / n) < 1e-12
