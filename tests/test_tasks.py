"""Task specs, JSON Lines, prompts and calibration batches (offline, tiny tokenizer)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sieve_edge.errors import DataError, TaskSpecError
from sieve_edge.tasks import (build_prompt, calibration_batches, encode_prompts, example_sequences, load_examples,
                              load_task, read_jsonl, special_prefix)

ROWS = [
    {"text": "a charming film", "label": "positive"},
    {"text": "a dull , boring mess", "label": "negative"},
    {"text": "great and moving", "label": "positive"},
    {"text": "tedious", "label": "negative"},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_task(folder: Path, body: str | None = None, rows=ROWS, name: str = "t.toml") -> Path:
    write_jsonl(folder / "data.jsonl", rows)
    if body is None:
        body = '''
kind = "classification"
prompt = "Review: {text}\\nSentiment:"
[labels]
negative = " negative"
positive = " positive"
[data]
train = "data.jsonl"
validation = "data.jsonl"
test = "data.jsonl"
'''
    path = folder / name
    path.write_text(body, encoding="utf-8")
    return path


# ---------------------------------------------------------------- spec loading

def test_load_task_defaults(tmp_path):
    task = load_task(write_task(tmp_path))
    assert task.name == "t" and task.kind == "classification" and task.metric == "accuracy"
    assert task.data["calibration"] == task.data["train"]  # calibration defaults to train
    assert task.label_names == ["negative", "positive"] and task.answers == [" negative", " positive"]
    assert task.text_field == "text" and task.label_field == "label" and task.chat_template is False


@pytest.mark.parametrize("name", ["sst2", "sms_spam", "snips"])
def test_sample_tasks_load_by_name(name):
    task = load_task(name)
    assert task.name == name and task.kind == "classification"
    for split in ("train", "calibration", "validation", "test"):
        examples = load_examples(task, split)
        assert len(examples) > 100
        assert {ex.label for ex in examples} <= set(task.labels)


def test_unknown_name_lists_samples():
    with pytest.raises(TaskSpecError, match=r"unknown task 'nope'.*sst2"):
        load_task("nope")


def test_unknown_top_level_key(tmp_path):
    path = write_task(tmp_path)
    path.write_text(path.read_text().replace('kind = "classification"', 'kind = "classification"\ntemperature = 1'))
    with pytest.raises(TaskSpecError, match=r"t\.toml: unknown key\(s\) 'temperature'; allowed keys: .*chat_template"):
        load_task(path)


def test_unknown_data_key(tmp_path):
    path = write_task(tmp_path)
    path.write_text(path.read_text().replace('train = "data.jsonl"', 'train = "data.jsonl"\ndev = "data.jsonl"'))
    with pytest.raises(TaskSpecError, match=r"t\.toml: unknown key\(s\) 'data\.dev'; allowed keys in \[data\]: .*validation"):
        load_task(path)


def test_bad_kind(tmp_path):
    path = write_task(tmp_path)
    path.write_text(path.read_text().replace('"classification"', '"regression"'))
    with pytest.raises(TaskSpecError, match=r"t\.toml: key 'kind' = 'regression' is not allowed; "
                                            r"allowed values: classification, generation, perplexity"):
        load_task(path)


def test_metric_must_match_kind(tmp_path):
    path = write_task(tmp_path)
    path.write_text('metric = "exact_match"\n' + path.read_text())
    with pytest.raises(TaskSpecError, match=r"key 'metric' = 'exact_match' is not allowed for kind 'classification'; "
                                            r"use 'accuracy'"):
        load_task(path)


def test_wrong_type(tmp_path):
    path = write_task(tmp_path)
    path.write_text("chat_template = \"yes\"\n" + path.read_text())
    with pytest.raises(TaskSpecError, match=r"t\.toml: key 'chat_template' must be true or false, got str"):
        load_task(path)


def test_missing_data_file(tmp_path):
    path = write_task(tmp_path)
    path.write_text(path.read_text().replace('test = "data.jsonl"', 'test = "missing.jsonl"'))
    with pytest.raises(TaskSpecError, match=r"t\.toml: key 'data\.test': data file not found: .*missing\.jsonl"):
        load_task(path)


def test_prompt_needs_placeholder(tmp_path):
    path = write_task(tmp_path)
    path.write_text(path.read_text().replace("{text}", "{ text }"))  # braces, but no placeholder
    with pytest.raises(TaskSpecError, match=r"key 'prompt' must contain a placeholder for a field of the row, "
                                            r"such as \{text\}"):
        load_task(path)


def test_placeholder_the_data_lacks_names_the_row(tmp_path):
    path = write_task(tmp_path)
    path.write_text(path.read_text().replace("{text}", "{txt}"))
    task = load_task(path)  # the spec is fine: only the data can say which fields exist
    with pytest.raises(DataError, match=r"data\.jsonl:1: no field 'txt' for the placeholder \{txt\} in the prompt "
                                        r"of .*t\.toml \(fields of this row: text, label\)"):
        load_examples(task, "test")


def test_invalid_toml(tmp_path):
    path = write_task(tmp_path)
    path.write_text("kind = \n")
    with pytest.raises(TaskSpecError, match=r"t\.toml: not valid TOML"):
        load_task(path)


def test_undeclared_split(tmp_path):
    path = write_task(tmp_path)
    path.write_text(path.read_text().replace('test = "data.jsonl"\n', ""))
    task = load_task(path)
    with pytest.raises(TaskSpecError, match=r"declares no 'test' split in \[data\]; declared: train, calibration, validation"):
        load_examples(task, "test")


# ---------------------------------------------------------------- data

def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok", "label": "positive"}\n\n{"text": "broken", "label": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON: Expecting value"):
        read_jsonl(path)


def test_read_jsonl_skips_blank_lines_and_rejects_non_objects(tmp_path):
    path = write_jsonl(tmp_path / "ok.jsonl", ROWS)
    path.write_text(path.read_text() + "\n\n")
    assert read_jsonl(path) == ROWS
    path.write_text('{"text": "x"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"ok\.jsonl:2: expected a JSON object, got list"):
        read_jsonl(path)


def test_label_missing_from_labels(tmp_path):
    rows = ROWS + [{"text": "meh", "label": "neutral"}]
    task = load_task(write_task(tmp_path, rows=rows))
    with pytest.raises(TaskSpecError, match=r"data\.jsonl:5: label 'neutral' is not declared in \[labels\] of .*t\.toml; "
                                            r"declared labels: negative, positive"):
        load_examples(task, "test")


def test_missing_text_field(tmp_path):
    task = load_task(write_task(tmp_path, rows=[{"sentence": "x", "label": "positive"}]))
    with pytest.raises(DataError, match=r"data\.jsonl:1: no field 'text'"):
        load_examples(task, "test")


def test_custom_fields_and_integer_labels(tmp_path):
    rows = [{"sentence": "good", "y": 1}, {"sentence": "bad", "y": 0}]
    body = '''
kind = "classification"
prompt = "{text} ->"
[labels]
0 = " negative"
1 = " positive"
[data]
test = "data.jsonl"
text_field = "sentence"
label_field = "y"
'''
    task = load_task(write_task(tmp_path, body, rows))
    examples = load_examples(task, "test")
    assert [(e.text, e.label, e.label_index, e.answer) for e in examples] == [
        ("good", "1", 1, " positive"), ("bad", "0", 0, " negative")]


def test_limit_keeps_file_order(tmp_path):
    task = load_task(write_task(tmp_path))
    assert [e.text for e in load_examples(task, "test", limit=2)] == [r["text"] for r in ROWS[:2]]


# ---------------------------------------------------------------- prompts

def test_build_prompt_plain_and_system(tmp_path, tokenizer):
    task = load_task(write_task(tmp_path))
    assert build_prompt(task, tokenizer, "fine {braces}") == "Review: fine {braces}\nSentiment:"
    path = tmp_path / "t.toml"
    path.write_text('system = "Be brief."\n' + path.read_text())
    assert build_prompt(load_task(path), tokenizer, "x") == "Be brief.\n\nReview: x\nSentiment:"


def test_build_prompt_chat_template(tmp_path, tokenizer):
    path = write_task(tmp_path)
    path.write_text('chat_template = true\nsystem = "S"\n' + path.read_text())
    task = load_task(path)
    prompt = build_prompt(task, tokenizer, "x")
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nReview: x\nSentiment:<|im_end|>\n<|im_start|>assistant\n"
    tokenizer.chat_template = None
    with pytest.raises(TaskSpecError, match=r"chat_template = true, but the tokenizer .* has no chat template"):
        build_prompt(task, tokenizer, "x")


def test_bos_added_once(tmp_path, tokenizer):
    """A tokenizer that adds BOS gets it once, also when a chat template already starts with it."""
    from tokenizers import processors

    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.convert_tokens_to_ids("<s>"))])
    bos = tokenizer.convert_tokens_to_ids("<s>")
    assert special_prefix(tokenizer) == [bos]
    ids = encode_prompts(tokenizer, ["hello", "<s>hello"])
    assert ids[0] == ids[1] and ids[0][0] == bos and ids[0][1] != bos


def test_example_sequences_answer_follows_prompt(tmp_path, tokenizer):
    task = load_task(write_task(tmp_path))
    examples = load_examples(task, "test")
    for ex, (prompt, answer) in zip(examples, example_sequences(task, tokenizer, examples)):
        text = build_prompt(task, tokenizer, ex.text)
        assert prompt == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(answer) == ex.answer
        assert prompt + answer == tokenizer(text + ex.answer, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- calibration

def test_calibration_batches(tmp_path, tokenizer):
    rows = [{"text": f"review number {i}", "label": "positive" if i % 2 else "negative"} for i in range(40)]
    task = load_task(write_task(tmp_path, rows=rows))
    batches = calibration_batches(task, tokenizer, n_examples=10, batch_size=4, max_length=64, seed=1)
    listed = list(batches)
    assert len(batches) == len(listed) == 3
    assert [b["input_ids"].shape[0] for b in listed] == [4, 4, 2]
    for b in listed:
        assert b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.long
        assert b["input_ids"].shape == b["attention_mask"].shape
        mask = b["attention_mask"]
        assert torch.all(mask[:, :-1] >= mask[:, 1:])  # right padded
    assert batches.n_tokens == sum(int(b["attention_mask"].sum()) for b in listed)
    assert batches.n_examples == 10
    # re-iterable and deterministic by seed; another seed picks other rows
    again = calibration_batches(task, tokenizer, n_examples=10, batch_size=4, max_length=64, seed=1)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(listed, again))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(listed, batches))
    other = calibration_batches(task, tokenizer, n_examples=10, batch_size=4, max_length=64, seed=2)
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(listed, other))
    # the gold answer is appended
    first = listed[0]["input_ids"][0][: int(listed[0]["attention_mask"][0].sum())].tolist()
    assert tokenizer.decode(first).endswith((" positive", " negative"))


def test_calibration_truncates_from_the_prompt_start(tmp_path, tokenizer):
    rows = [{"text": "the movie was great and moving " * 20, "label": "positive"},
            {"text": "dull", "label": "negative"}]
    task = load_task(write_task(tmp_path, rows=rows))
    batches = list(calibration_batches(task, tokenizer, n_examples=5, batch_size=8, max_length=32))
    ids = batches[0]["input_ids"]
    assert ids.shape[1] == 32
    assert tokenizer.decode(ids[0].tolist()).endswith(" positive")
