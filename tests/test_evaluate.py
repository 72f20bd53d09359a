"""evaluate / Scorer on tiny random models: fast path == general path == naive per example."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sieve_edge.errors import TaskSpecError
from sieve_edge.evaluate import (EvalResult, accuracy_from_logprobs, evaluate, make_scorer, normalize_prediction)
from sieve_edge.tasks import build_prompt, load_examples, load_task
from tiny import make_model

LOGPROB_TOL = 1e-4  # float32 forward passes of different batch shapes / paddings

TEXTS = ["a charming film", "a dull , boring and tedious mess", "the movie was great", "boring",
         "what a winner , moving and charming", "tedious", "call now"]


def write_task(folder: Path, labels: dict[str, str], kind: str = "classification", rows=None, extra: str = "") -> Path:
    names = list(labels) or ["x"]
    rows = rows or [{"text": t, "label": names[i % len(names)]} for i, t in enumerate(TEXTS)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    label_lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in labels.items())
    prompt = 'prompt = "Review: {text}\\nSentiment:"\n' if kind != "perplexity" else ""
    body = (f'kind = "{kind}"\n{prompt}{extra}'
            + (f"[labels]\n{label_lines}" if labels else "")
            + '[data]\ntrain = "data.jsonl"\nvalidation = "data.jsonl"\ntest = "data.jsonl"\n')
    path = folder / f"{kind}.toml"
    path.write_text(body)
    return path


SINGLE = {"positive": " and", "negative": " an", "neutral": " bo"}  # one token each in the tiny vocabulary
MULTI = {"positive": " positive", "negative": " negative"}


def naive_label_logprobs(model, tokenizer, task, examples) -> torch.Tensor:
    """One unpadded forward per (example, label) with the full logits; normalized over labels."""
    out = []
    with torch.no_grad():
        for ex in examples:
            prompt = build_prompt(task, tokenizer, ex.text)
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            row = []
            for answer in task.answers:
                ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
                assert ids[:len(p_ids)] == p_ids
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
                row.append(sum(logp[t - 1, ids[t]] for t in range(len(p_ids), len(ids))))
            out.append(torch.stack(row))
    return torch.log_softmax(torch.stack(out), -1).float()


def test_fast_path_equals_general_and_naive(tmp_path, tokenizer, tiny_llama):
    task = load_task(write_task(tmp_path, SINGLE))
    scorer = make_scorer(tokenizer, task, "test", batch_size=4)
    assert scorer.fast and scorer.n == len(TEXTS)
    assert scorer.label_token_ids.tolist() == [tokenizer.convert_tokens_to_ids(t) for t in ("Ġand", "Ġan", "Ġbo")]
    fast = scorer.label_logprobs(tiny_llama)
    assert fast.shape == (len(TEXTS), 3) and fast.dtype == torch.float32
    assert torch.allclose(fast.exp().sum(-1), torch.ones(len(TEXTS)), atol=1e-5)
    scorer.label_token_ids = None  # force the general (multi-token) path on the same data
    general = scorer.label_logprobs(tiny_llama)
    naive = naive_label_logprobs(tiny_llama, tokenizer, task, load_examples(task, "test"))
    torch.testing.assert_close(fast, general, atol=LOGPROB_TOL, rtol=0)
    torch.testing.assert_close(fast, naive, atol=LOGPROB_TOL, rtol=0)
    assert fast.std() > 0.01  # not a degenerate uniform distribution


def test_multi_token_labels_match_naive(tmp_path, tokenizer, tiny_llama):
    task = load_task(write_task(tmp_path, MULTI))
    scorer = make_scorer(tokenizer, task, "test", batch_size=3)
    assert not scorer.fast
    naive = naive_label_logprobs(tiny_llama, tokenizer, task, load_examples(task, "test"))
    torch.testing.assert_close(scorer.label_logprobs(tiny_llama), naive, atol=LOGPROB_TOL, rtol=0)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "phi3", "gemma3_text", "gpt2"])
def test_fast_path_every_architecture(tmp_path, tokenizer, arch):
    model = make_model(arch)
    task = load_task(write_task(tmp_path, SINGLE))
    scorer = make_scorer(tokenizer, task, "test", limit=5, batch_size=2)
    assert scorer.fast
    naive = naive_label_logprobs(model, tokenizer, task, load_examples(task, "test", limit=5))
    torch.testing.assert_close(scorer.label_logprobs(model), naive, atol=LOGPROB_TOL, rtol=0)


def test_subset_and_batch_size_do_not_change_scores(tmp_path, tokenizer, tiny_llama):
    task = load_task(write_task(tmp_path, SINGLE))
    full = make_scorer(tokenizer, task, "test", batch_size=32).label_logprobs(tiny_llama)
    one = make_scorer(tokenizer, task, "test", batch_size=1)
    torch.testing.assert_close(one.label_logprobs(tiny_llama), full, atol=LOGPROB_TOL, rtol=0)
    subset = [5, 0, 3]
    torch.testing.assert_close(one.label_logprobs(tiny_llama, subset), full[subset], atol=LOGPROB_TOL, rtol=0)
    torch.testing.assert_close(one.label_logprobs(tiny_llama, torch.tensor(subset)), full[subset],
                               atol=LOGPROB_TOL, rtol=0)
    assert one.metric(tiny_llama, subset) == accuracy_from_logprobs(full[subset], one.labels[subset])
    with pytest.raises(IndexError):
        one.label_logprobs(tiny_llama, [len(TEXTS)])


def test_scorer_restores_training_mode(tmp_path, tokenizer, tiny_llama):
    task = load_task(write_task(tmp_path, SINGLE))
    scorer = make_scorer(tokenizer, task, "test")
    tiny_llama.train()
    scorer.metric(tiny_llama)
    assert tiny_llama.training


def test_accuracy_from_logprobs():
    logprobs = torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]))
    assert accuracy_from_logprobs(logprobs, torch.tensor([0, 1, 1, 1])) == 0.75


def test_evaluate_classification(tmp_path, tokenizer, tiny_llama):
    task = load_task(write_task(tmp_path, MULTI))
    result = evaluate(tiny_llama, tokenizer, task, split="validation", limit=5, batch_size=4)
    assert isinstance(result, EvalResult)
    assert result.n == 5 and 0.0 <= result.value <= 1.0
    assert result.to_dict() == {"task": "classification", "split": "validation", "metric": "accuracy",
                                "value": result.value, "n": 5, "truncated": 0, "max_prompt_tokens": 128 - 6,
                                "sample": {"mode": "head", "seed": 0, "limit": 5, "rows": 5, "of": 7}}
    # 128: the tiny context; 6: tokens of " positive". The first keys are the original contract.
    assert list(result.to_dict())[:5] == ["task", "split", "metric", "value", "n"]
    scorer = make_scorer(tokenizer, task, "validation", limit=5)
    assert result.value == accuracy_from_logprobs(scorer.label_logprobs(tiny_llama), scorer.labels)


def test_evaluate_sample_task(tokenizer, tiny_llama):
    result = evaluate(tiny_llama, tokenizer, "sst2", split="validation", limit=20)
    assert result.task == "sst2" and result.n == 20 and 0.0 <= result.value <= 1.0


def test_perplexity_matches_naive(tmp_path, tokenizer, tiny_llama):
    task = load_task(write_task(tmp_path, {}, kind="perplexity"))
    scorer = make_scorer(tokenizer, task, "test", batch_size=4)
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in TEXTS:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(tiny_llama(torch.tensor([ids])).logits[0].double(), -1)
            nll -= sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)))
            count += len(ids) - 1
    assert math.isclose(scorer.metric(tiny_llama), math.exp(nll / count), rel_tol=1e-4)
    with pytest.raises(TaskSpecError, match="needs a classification task"):
        scorer.label_logprobs(tiny_llama)


def test_generation_exact_match(tmp_path, tokenizer, tiny_llama):
    task = load_task(write_task(tmp_path, {}, kind="generation", extra="max_new_tokens = 3\n"))
    scorer = make_scorer(tokenizer, task, "test", batch_size=4)
    predictions = scorer.generate(tiny_llama)
    assert len(predictions) == len(TEXTS) and all(isinstance(p, str) for p in predictions)
    assert scorer.metric(tiny_llama) == 0.0  # the gold answers are the label "x"
    # gold = the model's own greedy answers (any case, padded with spaces): all match
    rows = [{"text": t, "label": "  " + normalize_prediction(p).upper() + " "} for t, p in zip(TEXTS, predictions)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = make_scorer(tokenizer, load_task(tmp_path / "generation.toml"), "test", batch_size=3)
    assert again.generate(tiny_llama) == predictions  # batching / left padding do not change greedy output
    assert again.metric(tiny_llama) == 1.0


def test_normalize_prediction():
    assert normalize_prediction("  Positive\nReview: more") == "positive"
    assert normalize_prediction("\n\n Spam ") == "spam"
    assert normalize_prediction("") == ""
