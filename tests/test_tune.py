"""tune: answer-only loss goes down, deterministic per seed, LoRA merged back; saving."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sieve_edge.errors import ArtifactError
from sieve_edge.tasks import load_task
from sieve_edge.tune import answer_loss, check_output, lora_targets, save_tuned, training_sequences, tune
from tiny import make_model

ROWS = [{"text": t, "label": lab} for t, lab in [
    ("a charming film", "positive"), ("a dull , boring mess", "negative"), ("great and moving", "positive"),
    ("tedious", "negative"), ("the movie was great", "positive"), ("boring , dull", "negative"),
    ("a winner", "positive"), ("a tedious mess", "negative")]]


@pytest.fixture
def task(tmp_path):
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    path = tmp_path / "t.toml"
    path.write_text('kind = "classification"\nprompt = "Review: {text}\\nSentiment:"\n'
                    '[labels]\nnegative = " negative"\npositive = " positive"\n'
                    '[data]\ntrain = "data.jsonl"\ntest = "data.jsonl"\n')
    return load_task(path)


def test_training_sequences_mask_the_prompt(task, tokenizer):
    for ids, labels in training_sequences(task, tokenizer):
        assert len(ids) == len(labels)
        answer = [t for t in labels if t != -100]
        n_prompt = len(ids) - len(answer)
        assert labels[:n_prompt] == [-100] * n_prompt and ids[n_prompt:] == answer
        assert tokenizer.decode(answer) in (" positive", " negative")
    short = training_sequences(task, tokenizer, max_length=8)
    assert all(len(ids) <= 8 and tokenizer.decode([t for t in lab if t != -100]) in (" positive", " negative")
               for ids, lab in short)


def test_tune_lowers_answer_loss_deterministically(task, tokenizer):
    model = make_model("llama")
    before = answer_loss(model, tokenizer, task)
    rng = torch.get_rng_state()
    tuned = tune(model, tokenizer, task, steps=8, batch_size=4, lr=3e-3, seed=0, progress=False)
    assert tuned is model and not tuned.training
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not consumed
    after = answer_loss(tuned, tokenizer, task)
    assert after < before - 0.5, (before, after)
    twin = tune(make_model("llama"), tokenizer, task, steps=8, batch_size=4, lr=3e-3, seed=0, progress=False)
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), name


def test_tune_progress_on_stderr(task, tokenizer, capsys):
    tune(make_model("llama"), tokenizer, task, steps=2, batch_size=4, seed=0, progress=True)
    err = capsys.readouterr().err
    assert "tune step 2/2" in err and "loss" in err and "elapsed" in err


def test_lora_merged_back(task, tokenizer):
    model = make_model("llama")
    names = [n for n, _ in model.named_parameters()]
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    before = answer_loss(model, tokenizer, task)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = tune(model, tokenizer, task, steps=8, batch_size=4, lr=2e-2, lora=True, seed=0, progress=False)
    assert [n for n, _ in tuned.named_parameters()] == names
    assert {n: p.requires_grad for n, p in tuned.named_parameters()} == grads
    assert not any("lora" in n.lower() for n, _ in tuned.named_modules())
    assert not any(type(m).__module__.startswith("peft") for m in tuned.modules())
    assert type(tuned).__name__ == "LlamaForCausalLM"
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, original[n])}
    assert changed and changed <= {n + ".weight" for n in lora_targets(tuned)}  # only the adapted matrices
    assert answer_loss(tuned, tokenizer, task) < before - 0.3


def test_lora_targets_cover_the_registry(tiny_llama):
    targets = lora_targets(tiny_llama)
    assert len(targets) == 2 * 7 and "model.layers.0.self_attn.q_proj" in targets and "model.layers.1.mlp.down_proj" in targets


def test_save_tuned_and_reload(task, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tune(make_model("llama"), tokenizer, task, steps=1, batch_size=4, seed=0, progress=False)
    out = tmp_path / "tuned"
    save_tuned(model, tokenizer, out, base_model="tiny", task=task.name, steps=1, lora=False, lr=5e-5)
    manifest = json.loads((out / "sieve_edge.json").read_text())
    assert {k: manifest[k] for k in ("format", "format_version", "kind", "architecture", "base_model", "method", "task")} \
        == {"format": "sieve-edge/checkpoint", "format_version": 1, "kind": "dense", "architecture": "llama",
            "base_model": "tiny", "method": None, "task": "t"}
    assert manifest["tuned"]["steps"] == 1 and manifest["tuned"]["lora"] is False and manifest["tuned"]["lr"] == 5e-5
    assert (out / "model.safetensors").is_file() and not list(tmp_path.glob("tuned.partial-*"))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    # an existing checkpoint is replaced only with force; other contents never
    with pytest.raises(ArtifactError, match="already holds checkpoint; pass --force"):
        check_output(out)
    check_output(out, force=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="already holds other files; choose another --out"):
        check_output(other, force=True)
    check_output(tmp_path / "new")
