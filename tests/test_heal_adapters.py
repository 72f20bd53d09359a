"""Healing through rank-R adapters on the factors (--heal-rank): the adapters train, the
factors take them in afterwards, and nothing of them outlives the heal."""
from __future__ import annotations

import copy

import pytest
import torch

from sieve_edge.errors import InputError
from sieve_edge.evaluate import make_scorer
from sieve_edge.factorize import factorized_ranks
from sieve_edge.heal import _Adapters, factor_parameters, heal_
from sieve_edge.prune import prune_with_batches
from sieve_edge.tasks import load_task
from test_search import write_task
from tiny import make_model, make_tokenizer


@pytest.fixture
def cut(tmp_path):
    tok = make_tokenizer()
    task = load_task(write_task(tmp_path / "task"))
    model = make_model("llama")
    dense = copy.deepcopy(model)
    prune_with_batches(model, None, 0.3, "svd", multiple=2)
    return model, dense, tok, task


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def _factors(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in factor_parameters(model)]


def test_merged_adapters_compute_what_the_hooked_ones_did(cut):
    model, _, _, _ = cut
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.random.fork_rng():
        torch.manual_seed(3)
        adapters = _Adapters(model, 2)
        for _, _, up in adapters.pairs:   # the up halves start at zero: give them a value
            torch.nn.init.normal_(up, std=0.05)
    with torch.no_grad():
        hooked = model(input_ids=ids).logits
        adapters.remove()
        unchanged = model(input_ids=ids).logits
        adapters.merge_()
        merged = model(input_ids=ids).logits
    assert _hooks(model) == 0
    assert not torch.allclose(hooked, unchanged, atol=1e-4)    # the adapters did something
    torch.testing.assert_close(merged, hooked, atol=1e-5, rtol=1e-4)


def test_adapter_healing_trains_few_parameters_and_merges_them_into_the_factors(cut):
    model, dense, tok, task = cut
    train = make_scorer(tok, task, "train", batch_size=64, model=model)
    teacher = train.label_logprobs(dense).float()
    ranks, shapes = factorized_ranks(model), [p.shape for p in factor_parameters(model)]
    others = {n: p.detach().clone() for n, p in model.named_parameters()
              if ".first." not in n and ".second." not in n}
    factors = _factors(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def kl_to_dense():
        q = train.label_logprobs(model).float()
        return float((teacher.exp() * (teacher - q)).sum(-1).mean())

    before = kl_to_dense()
    res = heal_(model, tok, task, 30, lr=3e-3, batch_size=16, loss="kl", teacher=teacher, train_scorer=train,
                rank=2)
    assert res.rank == 2 and res.kept                     # no validation scorer: kept as trained
    expected = sum(min(2, *w.shape) * sum(w.shape) for w in factors if w.dim() == 2)
    assert res.trainable_params == expected < sum(w.numel() for w in factors)
    assert _hooks(model) == 0                              # the adapters are gone ...
    assert factorized_ranks(model) == ranks and [p.shape for p in factor_parameters(model)] == shapes
    assert any(not torch.equal(a, b) for a, b in zip(factors, _factors(model)))   # ... merged in
    for n, p in model.named_parameters():
        if n in others:
            assert torch.equal(p, others[n]), n           # nothing else trained
    assert kl_to_dense() < before                          # the merged model is the healed one
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_an_adapter_heal_that_scores_worse_leaves_the_factors_as_they_were(cut):
    model, _, tok, task = cut

    class Worse:   # scores 1.0 before healing, 0.0 after
        def __init__(self):
            self.scores = iter([1.0, 0.0])

        def metric(self, _model):
            return next(self.scores)

    factors = _factors(model)
    res = heal_(model, tok, task, 3, lr=1e-2, batch_size=8, val_scorer=Worse(), rank=2)
    assert not res.kept and res.metric == 1.0
    assert all(torch.equal(a, b) for a, b in zip(factors, _factors(model)))
    assert _hooks(model) == 0


def test_adapters_on_a_half_precision_model_train_in_float32(cut):
    model, _, tok, task = cut
    model.to(torch.bfloat16)
    adapters = _Adapters(model, 2)
    try:
        assert all(p.dtype == torch.float32 for p in adapters.parameters())
        with torch.no_grad():
            out = model(input_ids=torch.randint(0, model.config.vocab_size, (1, 5))).logits
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    finally:
        adapters.remove()
    adapters.merge_()  # up starts at zero: merging adds nothing, in the factors' own dtype
    assert all(p.dtype == torch.bfloat16 for p in factor_parameters(model))


def test_a_negative_adapter_rank_is_an_input_error(cut):
    from sieve_edge.search import SearchConfig

    model, _, tok, task = cut
    with pytest.raises(InputError, match="--heal-rank"):
        heal_(model, tok, task, 2, rank=-1)
    with pytest.raises(InputError, match="heal_rank"):
        SearchConfig(tolerance=0.05, heal_rank=-1)
