"""Healing by distillation of the dense label distribution (--heal kl) on a tiny model."""
from __future__ import annotations

import pytest

from sieve_edge.errors import InputError
from sieve_edge.evaluate import make_scorer
from sieve_edge.heal import heal_
from sieve_edge.prune import prune_with_batches
from sieve_edge.tasks import load_task
from test_search import write_task
from tiny import make_model, make_tokenizer


def test_kl_healing_moves_the_cut_model_back_toward_the_dense_label_distribution(tmp_path):
    tok = make_tokenizer()
    task = load_task(write_task(tmp_path / "task"))
    model = make_model("llama")
    train = make_scorer(tok, task, "train", batch_size=64, model=model)
    teacher = train.label_logprobs(model).float()                      # (N, L), dense
    prune_with_batches(model, None, 0.3, "svd", multiple=2)
    val = make_scorer(tok, task, "validation", batch_size=64, model=model)

    def kl_to_dense():
        q = train.label_logprobs(model).float()
        return float((teacher.exp() * (teacher - q)).sum(-1).mean())

    before = kl_to_dense()
    res = heal_(model, tok, task, 30, lr=3e-3, batch_size=16, val_scorer=val, loss="kl", teacher=teacher,
                train_scorer=train)
    assert res.loss == "kl" and res.steps == 30
    assert res.kept == (res.metric_after >= res.metric_before)
    if res.kept:
        assert kl_to_dense() < before
    assert res.loss_last < res.loss_first


def test_kl_healing_needs_single_token_labels(tmp_path):
    tok = make_tokenizer()
    task = load_task(write_task(tmp_path / "task"))
    model = make_model("llama")
    prune_with_batches(model, None, 0.5, "svd", multiple=2)
    with pytest.raises(InputError, match="--heal ce"):
        heal_(model, tok, task, 2, loss="kl")
