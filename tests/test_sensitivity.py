"""Task sensitivity from the label Fisher: it predicts the measured KL of small cuts, and the
Lagrangian seeds trade estimated cost for gain monotonically."""
from __future__ import annotations

import pytest
import torch

from sieve_edge.calibrate import decompose_all
from sieve_edge.errors import TaskSpecError
from sieve_edge.evaluate import make_scorer
from sieve_edge.factorize import attach_search_, linear_shapes, set_ranks_
from sieve_edge.sensitivity import label_fisher_kl, lagrangian_genomes
from sieve_edge.tasks import calibration_batches, load_task
from test_search import write_task
from tiny import make_model, make_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sieve_edge.tune import tune

    task = load_task(write_task(tmp_path_factory.mktemp("fisher") / "task"))
    model, tok = make_model("llama"), make_tokenizer()
    tune(model, tok, task, steps=30, lr=3e-3, progress=False)
    model.eval()
    batches = list(calibration_batches(task, tok, 32, 16))
    decs, _ = decompose_all(model, batches, "output")
    attach_search_(model, decs)
    scorer = make_scorer(tok, task, "validation", batch_size=64)
    return model, scorer, decs


def measured_kl(model, scorer, name, rank):
    set_ranks_(model, {})
    p = scorer.label_logprobs(model).double()
    set_ranks_(model, {name: rank})
    q = scorer.label_logprobs(model).double()
    set_ranks_(model, {})
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_fisher_estimate_tracks_measured_kl_of_small_cuts(setup):
    model, scorer, decs = setup
    shapes = linear_shapes(model)
    # a small and a half-rank cut of every matrix: the quadratic model of the KL should hold
    ranks = {name: [None, decs[name].max_rank - 4, decs[name].max_rank // 2] for name in shapes}
    est = label_fisher_kl(model, scorer, ranks, range(scorer.n), batch_size=8)
    assert all(est[name][0] == 0.0 for name in shapes)
    pairs = [(est[name][i], measured_kl(model, scorer, name, ranks[name][i])) for name in shapes for i in (1, 2)]
    big = [(e, m) for e, m in pairs if m > 1e-7]   # above float32 noise
    assert len(big) >= len(pairs) // 2
    for e, m in big:
        assert 0.5 < e / m < 2.0, (e, m)
    # and it orders matrices as the measurement does (rank correlation)
    order_e = torch.tensor([e for e, _ in big]).argsort().argsort().double()
    order_m = torch.tensor([m for _, m in big]).argsort().argsort().double()
    assert torch.corrcoef(torch.stack([order_e, order_m]))[0, 1] > 0.8


def test_fisher_needs_single_token_labels(setup, tmp_path):
    model, scorer, _ = setup

    class NotFast:
        fast = False

    with pytest.raises(TaskSpecError, match="single tokens"):
        label_fisher_kl(model, NotFast(), {}, [0])


def test_lagrangian_genomes_trade_cost_for_gain():
    names = ["a", "b", "c"]
    costs = {"a": [0, 1.0, 5.0], "b": [0, 0.1, 0.3], "c": [0, 2.0, 2.5]}
    gains = {"a": [0, 0.1, 0.2], "b": [0, 0.1, 0.2], "c": [0, 0.1, 0.2]}
    genomes = lagrangian_genomes(costs, gains, names, n=40)
    assert genomes[0] == (0, 0, 0)          # λ high: nothing is worth its cost
    assert genomes[-1] == (2, 2, 2)         # λ low: every matrix cut deepest
    assert genomes[1] == (0, 1, 0)          # the cheapest cut (gain per unit of cost) goes first
    total_gain = [sum(gains[n][g] for n, g in zip(names, gen)) for gen in genomes]
    total_cost = [sum(costs[n][g] for n, g in zip(names, gen)) for gen in genomes]
    assert total_gain == sorted(total_gain) and total_cost == sorted(total_cost)
