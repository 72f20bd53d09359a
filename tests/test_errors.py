"""Error types: bad training settings are InputError, divergence a TrainingError, both named."""
from __future__ import annotations

import json

import pytest

from sieve_edge.errors import InputError, TrainingError
from sieve_edge.tasks import load_task
from sieve_edge.tune import tune
from tiny import make_model


@pytest.fixture
def task(tmp_path):
    rows = [{"text": "a charming film", "label": "positive"}, {"text": "a dull mess", "label": "negative"}] * 4
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "t.toml"
    path.write_text('kind = "classification"\nprompt = "Review: {text}\\nSentiment:"\n'
                    '[labels]\nnegative = " negative"\npositive = " positive"\n[data]\ntrain = "data.jsonl"\n')
    return load_task(path)


@pytest.mark.parametrize("kw, match", [(dict(steps=0), "steps"), (dict(lr=-1.0), "learning rate"),
                                       (dict(lr=float("nan")), "learning rate"), (dict(batch_size=0), "batch")])
def test_bad_tuning_settings_are_input_errors(task, tokenizer, kw, match):
    with pytest.raises(InputError, match=match):
        tune(make_model("llama"), tokenizer, task, progress=False, **{"steps": 1, **kw})


def test_divergence_is_a_training_error_naming_the_fix(task, tokenizer):
    with pytest.raises(TrainingError, match=r"diverged at step \d+ .*lower --lr"):
        tune(make_model("llama"), tokenizer, task, steps=6, batch_size=4, lr=1e30, progress=False)


def test_heal_settings_are_input_errors(tokenizer, task):
    from sieve_edge.heal import heal_

    with pytest.raises(InputError, match="--heal-steps"):
        heal_(make_model("llama"), tokenizer, task, 0)
    with pytest.raises(InputError, match="no LowRankLinear"):
        heal_(make_model("llama"), tokenizer, task, 2)
