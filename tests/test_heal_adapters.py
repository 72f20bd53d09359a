"""Healing through rank-R LoRA adapters on the factors (--heal-rank), and healing in
micro-batches: the adapters train, the factors take them in afterwards, nothing of them
outlives the heal, and a batch split by tokens heals as the whole batch does."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sieve_edge.errors import InputError, TrainingError
from sieve_edge.evaluate import make_scorer
from sieve_edge.factorize import LowRankLinear, factorized_ranks
from sieve_edge.heal import factor_parameters, heal_
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


def _plain(model) -> bool:
    """Every factor is a plain nn.Linear again (no adapter layer left in its place)."""
    pairs = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    return bool(pairs) and all(type(m.first) is nn.Linear and type(m.second) is nn.Linear for m in pairs)


def _factors(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in factor_parameters(model)]


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
    expected = sum(2 * sum(w.shape) for w in factors if w.dim() == 2)
    assert res.trainable_params == expected < sum(w.numel() for w in factors)
    assert _plain(model)                                   # the adapters are gone ...
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
    assert _plain(model) and all(torch.equal(a, b) for a, b in zip(factors, _factors(model)))


def test_a_diverging_adapter_heal_names_the_fix_and_leaves_no_adapter_behind(cut):
    model, _, tok, task = cut
    factors = _factors(model)
    with pytest.raises(TrainingError, match=r"healing diverged at step \d+ .*lower --heal-lr"):
        heal_(model, tok, task, 6, lr=1e30, batch_size=8, rank=2)
    assert _plain(model) and all(torch.equal(a, b) for a, b in zip(factors, _factors(model)))


def test_adapters_heal_a_half_precision_model_and_keep_its_dtype(cut):
    model, _, tok, task = cut
    model.to(torch.bfloat16)
    res = heal_(model, tok, task, 2, lr=1e-3, batch_size=8, rank=2)
    assert res.kept and _plain(model)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p.float()).all() for p in factor_parameters(model))


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_micro_batches_heal_as_the_whole_batch_does(cut, loss):
    """``max_batch_tokens`` bounds a forward pass, not the batch: one row per pass takes the
    same steps (up to float rounding) as the whole batch in one."""
    model, dense, tok, task = cut
    kw = {}
    if loss == "kl":
        train = make_scorer(tok, task, "train", batch_size=64, model=model)
        kw = dict(teacher=train.label_logprobs(dense).float(), train_scorer=train)
    whole, split = copy.deepcopy(model), copy.deepcopy(model)
    a = heal_(whole, tok, task, 3, lr=1e-3, batch_size=8, loss=loss, **kw)
    b = heal_(split, tok, task, 3, lr=1e-3, batch_size=8, loss=loss, max_batch_tokens=1, **kw)
    assert a.loss_first == pytest.approx(b.loss_first, rel=1e-4)
    for x, y in zip(_factors(whole), _factors(split)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(x, y) for x, y in zip(_factors(model), _factors(whole)))   # it did train


def test_a_negative_adapter_rank_is_an_input_error(cut):
    from sieve_edge.search import SearchConfig

    model, _, tok, task = cut
    with pytest.raises(InputError, match="--heal-rank"):
        heal_(model, tok, task, 2, rank=-1)
    with pytest.raises(InputError, match="heal_rank"):
        SearchConfig(tolerance=0.05, heal_rank=-1)


def test_a_model_healed_through_adapters_saves_and_loads_as_itself(cut, tmp_path):
    """Nothing of peft stays in the healed model: the checkpoint holds the plan's factors
    alone and loads back to the same logits."""
    from safetensors import safe_open

    from sieve_edge.checkpoint import build_manifest, load_checkpoint, save_checkpoint

    model, _, tok, task = cut
    heal_(model, tok, task, 3, lr=1e-2, batch_size=8, rank=2)
    out = save_checkpoint(model, tok, tmp_path / "ck", build_manifest(model, base_model="tiny", method="svd",
                                                                       task=None))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(out)(input_ids=ids).logits, model(input_ids=ids).logits)
