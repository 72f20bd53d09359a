"""Task files for the tasks users have (issue 17): several fields, drawn rows, long inputs,
many multi-token labels, extra test sets, and `task show`. Tiny random models throughout."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sieve_edge import runtime as rt
from sieve_edge.errors import DataError, ModelLoadError, TaskSpecError
from sieve_edge.evaluate import evaluate, make_scorer, score_extra_tests
from sieve_edge.tasks import (build_prompt, calibration_batches, encode_examples, encode_prompts, load_examples,
                              load_task, token_batches)
from test_evaluate import naive_label_logprobs
from tiny import make_model, make_tokenizer

LOGPROB_TOL = 1e-4  # float32 forward passes of different shapes / a KV cache against one full pass
REPO = Path(__file__).resolve().parents[1]

# Labels of several tokens in the tiny vocabulary; " positive" is a prefix of " positive and",
# and " pos", " positive" and " positive and" share their first token.
MANY = {"pos": " positive", "pos_and": " positive and", "p": " pos", "neg": " negative", "ham": " ham spam",
        "win": " winner"}
TITLES = ["film", "a review", "movie night", "the book", "weather", "music"]
TEXTS = ["a charming film", "a dull , boring and tedious mess", "the movie was great", "boring",
         "what a winner , moving and charming", "tedious", "call now", "great and moving"]


def rows_for(labels, n=8, grouped=False):
    names = list(labels)
    label_of = [names[(i * len(names)) // n] if grouped else names[i % len(names)] for i in range(n)]
    return [{"title": TITLES[i % len(TITLES)], "text": TEXTS[i % len(TEXTS)], "year": 2000 + i, "label": lab}
            for i, lab in enumerate(label_of)]


def write_task(folder: Path, labels=None, prompt="Title: {title}\\nReview: {text}\\nLabel:", rows=None,
               extra: str = "", data_extra: str = "", chat: bool = False, name: str = "t") -> Path:
    labels = MANY if labels is None else labels
    folder.mkdir(parents=True, exist_ok=True)
    rows = rows or rows_for(labels)
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    body = (f'name = "{name}"\nkind = "classification"\nprompt = "{prompt}"\n'
            f"chat_template = {'true' if chat else 'false'}\n{extra}\n[labels]\n"
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in labels.items())
            + f'[data]\ntrain = "data.jsonl"\nvalidation = "data.jsonl"\ntest = "data.jsonl"\n{data_extra}')
    path = folder / f"{name}.toml"
    path.write_text(body)
    return path


# ---------------------------------------------------------------- 1. prompts with named fields

def test_prompt_reads_named_fields_once_and_keeps_other_braces(tmp_path, tokenizer):
    task = load_task(write_task(tmp_path, prompt='{{title}} {\\"a\\": 1} {} {0} ({year}) {title}: {text}'))
    assert task.fields == ["year", "title", "text"]  # {{title}} is literal text
    ex = load_examples(task, "test")[0]
    assert ex.fields == {"title": "film", "year": "2000", "text": "a charming film"}  # numbers are printed
    assert build_prompt(task, tokenizer, ex) == '{title} {"a": 1} {} {0} (2000) film: a charming film'
    # a value holding a placeholder is inserted as text, never read again
    assert build_prompt(task, tokenizer, {"title": "{text}", "year": "1", "text": "x"}) == \
        '{title} {"a": 1} {} {0} (1) {text}: x'
    with pytest.raises(TaskSpecError, match=r"reads 3 fields \(year, title, text\); give a row's fields"):
        build_prompt(task, tokenizer, "one text")


def test_text_placeholder_follows_text_field_and_label_field_is_refused(tmp_path):
    rows = [{"sentence": "good", "y": "pos"}, {"sentence": "bad", "y": "neg"}]
    task = load_task(write_task(tmp_path, {"pos": " positive", "neg": " negative"}, prompt="{text} ->", rows=rows,
                                data_extra='text_field = "sentence"\nlabel_field = "y"\n'))
    assert task.fields == ["sentence"] and load_examples(task, "test")[0].text == "good"
    path = write_task(tmp_path / "leak", prompt="{text} (hint: {label})")
    with pytest.raises(TaskSpecError, match=r"key 'prompt' reads the label field 'label' .*shown the answer"):
        load_task(path)


def test_field_of_wrong_type_names_the_row(tmp_path):
    rows = rows_for(MANY)
    rows[2]["title"] = ["a", "list"]
    task = load_task(write_task(tmp_path, rows=rows))
    with pytest.raises(DataError, match=r"data\.jsonl:3: field 'title' must be a string or a number, got list "
                                        r"for the placeholder \{title\}"):
        load_examples(task, "test")


@pytest.mark.parametrize("chat", [False, True])
def test_runner_builds_the_same_prompt_ids_for_several_fields(tmp_path, tokenizer, chat):
    from sieve_edge.bundle import prompt_frame

    task = load_task(write_task(tmp_path, prompt="{title} | {text} | {title}", chat=chat,
                                extra='system = "Be brief."'))
    examples = load_examples(task, "test")
    frame = json.loads(json.dumps(prompt_frame(task, tokenizer, examples)))  # as the bundle stores it
    assert [v for k, v in frame["parts"] if k == "field"] == ["title", "text", "title"]
    assert "prefix" not in frame  # the one-{text} form cannot hold three fields
    runner_task = rt.Task(rt._read_toml(task.path), task.path, frame=frame)
    scorer = rt.Scorer(None, tokenizer.backend_tokenizer, runner_task, {}, set(), max_prompt_tokens=1000)
    want = encode_prompts(tokenizer, [build_prompt(task, tokenizer, ex) for ex in examples])
    assert [scorer.prompt(ex.fields)[1] for ex in examples] == want
    if not chat:  # without a frame the runner parses the template itself
        plain = rt.Scorer(None, tokenizer.backend_tokenizer, rt.Task(rt._read_toml(task.path), task.path), {}, set(),
                          max_prompt_tokens=1000)
        assert [plain.prompt(ex.fields)[1] for ex in examples] == want


def test_runner_reads_a_one_field_frame_of_earlier_bundles(tmp_path, tokenizer):
    task = load_task(write_task(tmp_path, prompt="Review: {text}\\nLabel:"))
    old_frame = {"prefix": "Review: ", "suffix": "\nLabel:", "special_prefix": None}
    runner_task = rt.Task(rt._read_toml(task.path), task.path, frame=old_frame)
    scorer = rt.Scorer(None, tokenizer.backend_tokenizer, runner_task, {}, set(), max_prompt_tokens=1000)
    ex = load_examples(task, "test")[0]
    assert scorer.prompt(ex.text)[1] == encode_prompts(tokenizer, [build_prompt(task, tokenizer, ex)])[0]


# ---------------------------------------------------------------- 2. which rows a limit keeps

def test_select_rows_head_shuffle_stratified():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 15 + ["d"] * 5      # grouped by label, as intent files are
    assert rt.select_rows(labels, 10, "head") == list(range(10))
    shuffled = rt.select_rows(labels, 10, "shuffle", seed=3)
    assert shuffled == sorted(shuffled) and len(set(shuffled)) == 10 and shuffled == rt.select_rows(labels, 10,
                                                                                                   "shuffle", 3)
    assert shuffled != rt.select_rows(labels, 10, "shuffle", seed=4)
    strat = rt.select_rows(labels, 20, "stratified", seed=0)
    counts = {g: sum(labels[i] == g for i in strat) for g in "abcd"}
    assert counts == {"a": 10, "b": 6, "c": 3, "d": 1}              # proportional to 50/30/15/5
    few = rt.select_rows(labels, 4, "stratified", seed=0)           # every label once when the limit allows
    assert sorted(labels[i] for i in few) == ["a", "b", "c", "d"]
    assert rt.select_rows(labels, None, "stratified") == list(range(100))
    with pytest.raises(ValueError, match="allowed: head, shuffle, stratified"):
        rt.select_rows(labels, 5, "random")


def test_data_sample_is_used_by_every_consumer_and_recorded(tmp_path, tokenizer, tiny_llama):
    labels = {"pos": " positive", "neg": " negative", "ham": " ham spam"}
    rows = rows_for(labels, n=30, grouped=True)
    head = load_task(write_task(tmp_path / "head", labels, rows=rows))
    assert {ex.label for ex in load_examples(head, "test", 6)} == {"pos"}   # a file prefix: one class
    strat = load_task(write_task(tmp_path / "strat", labels, rows=rows,
                                 data_extra='sample = "stratified"\nseed = 7\n'))
    examples = load_examples(strat, "test", 6)
    assert sorted(ex.label for ex in examples) == ["ham", "ham", "neg", "neg", "pos", "pos"]
    assert examples.sample == {"mode": "stratified", "seed": 7, "limit": 6, "rows": 6, "of": 30}
    result = evaluate(tiny_llama, tokenizer, strat, limit=6)
    assert result.sample == examples.sample and result.to_dict()["sample"]["mode"] == "stratified"
    # the runner draws the very same rows from the same file
    runner_rows, record = rt.load_rows(rt.Task(rt._read_toml(strat.path), strat.path), strat.data["test"], 6)
    assert [line for line, _ in runner_rows] == [ex.line for ex in examples] and record == examples.sample
    # calibration follows [data] sample when it is set (its seed), its own seeded draw when not
    batches = calibration_batches(strat, tokenizer, 6, batch_size=8)
    text = tokenizer.batch_decode(next(iter(batches))["input_ids"])
    assert sum(" ham spam" in t for t in text) == 2
    with pytest.raises(TaskSpecError, match=r"key 'data\.sample' = 'random' is not allowed; allowed values: "
                                            r"head, shuffle, stratified"):
        load_task(write_task(tmp_path / "bad", labels, rows=rows, data_extra='sample = "random"\n'))


# ---------------------------------------------------------------- 3. long inputs

def test_fit_fields_cuts_the_longest_field_from_the_chosen_side():
    count = lambda f: len(("Q: " + f["q"] + " C: " + f["c"]).split())  # words as tokens
    fields = {"q": "what is it", "c": " ".join(f"w{i}" for i in range(40))}
    left, before = rt.fit_fields(fields, count, 20, "left")
    assert before == 45 and count(left) == 20 and left["q"] == "what is it" and left["c"].endswith("w39")
    right, _ = rt.fit_fields(fields, count, 20, "right")
    assert right["c"].startswith("w0") and count(right) == 20
    assert rt.fit_fields(fields, count, 100, "left") == (fields, 45)      # fits: untouched
    tiny, _ = rt.fit_fields(fields, count, 4, "left")                     # c emptied, then q gives way too
    assert tiny["c"] == "" and count(tiny) <= 4
    with pytest.raises(ValueError, match="with every field empty"):
        rt.fit_fields(fields, count, 1, "left")


@pytest.mark.parametrize("side", ["left", "right"])
def test_long_prompts_cut_alike_in_torch_and_runner(tmp_path, tokenizer, side):
    rows = rows_for(MANY)
    rows[1]["text"] = " ".join(["charming film , moving"] * 60)
    task = load_task(write_task(tmp_path, rows=rows, extra=f'max_prompt_tokens = 40\ntruncation = "{side}"'))
    examples = load_examples(task, "test")
    prompts = encode_examples(task, tokenizer, examples, task.max_prompt_tokens)
    assert prompts.cut == [1] and len(prompts.ids[1]) <= 40 and len(prompts.ids[1]) >= 36
    assert prompts.texts[1].startswith(f"Title: {rows[1]['title']}\nReview: ")    # the template stays whole
    assert prompts.texts[1].endswith("\nLabel:")
    runner = rt.Scorer(None, tokenizer.backend_tokenizer, rt.Task(rt._read_toml(task.path), task.path), {}, set(),
                       max_prompt_tokens=40)
    got = [runner.prompt(ex.fields)[1] for ex in examples]
    assert got == prompts.ids and runner.last_truncated is False


def test_truncation_error_names_the_row(tmp_path, tokenizer):
    rows = rows_for(MANY)
    rows[3]["text"] = "boring " * 100
    task = load_task(write_task(tmp_path, rows=rows, extra='max_prompt_tokens = 60\ntruncation = "error"'))
    with pytest.raises(DataError, match=r"data\.jsonl:4: the prompt is \d+ tokens, over max_prompt_tokens = 60 "
                                        r"\(truncation = \"error\""):
        make_scorer(tokenizer, task, "test")
    runner = rt.Scorer(None, tokenizer.backend_tokenizer, rt.Task(rt._read_toml(task.path), task.path), {}, set(),
                       max_prompt_tokens=60)
    assert runner.prompt(load_examples(task, "test")[1].fields)[1]  # the short rows pass
    with pytest.raises(rt.RunnerError, match=r"data\.jsonl:4: the prompt is \d+ tokens, over max_prompt_tokens"):
        runner.prompt(load_examples(task, "test")[3].fields, "data.jsonl:4")


def test_default_limit_is_the_model_context_and_counted(tmp_path, tokenizer, tiny_llama):
    rows = rows_for(MANY)
    rows[0]["text"] = "a charming film " * 200                          # ~600 tokens, the tiny context is 128
    task = load_task(write_task(tmp_path, rows=rows))
    result = evaluate(tiny_llama, tokenizer, task, limit=4)
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in MANY.values())
    assert result.max_prompt_tokens == 128 - longest and result.truncated == 1
    scorer = make_scorer(tokenizer, task, "test", limit=4, model=tiny_llama)
    assert max(len(p) for p in scorer.prompt_ids) + longest <= 128


def test_batches_are_bounded_by_tokens_not_rows(tmp_path, tokenizer, tiny_llama):
    assert token_batches([50, 40, 10, 10, 10, 10], max_rows=4, max_tokens=100) == [[0, 1], [2, 3, 4, 5]]
    assert token_batches([300, 5], max_rows=8, max_tokens=100) == [[0], [1]]   # too long: alone, never dropped
    labels = {"pos": " and", "neg": " an"}  # single tokens: the fast path
    rows = rows_for(labels)
    rows[2]["text"] = "the movie was great " * 20
    task = load_task(write_task(tmp_path, labels, rows=rows))
    wide = make_scorer(tokenizer, task, "test", batch_size=8, model=tiny_llama)
    narrow = make_scorer(tokenizer, task, "test", batch_size=8, model=tiny_llama, max_batch_tokens=64)
    assert wide.fast and len(wide._batches(list(range(8)), [len(p) for p in wide.prompt_ids], None)) == 1
    lengths = [len(p) for p in narrow.prompt_ids]
    groups = narrow._batches(list(range(8)), lengths, None)
    assert len(groups) > 1 and all(len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 64 for g in groups)
    torch.testing.assert_close(narrow.label_logprobs(tiny_llama), wide.label_logprobs(tiny_llama),
                               atol=LOGPROB_TOL, rtol=0)


def test_tune_micro_batches_add_up_to_the_whole_batch(tmp_path, tokenizer):
    from sieve_edge.tune import tune

    rows = rows_for(MANY)
    rows[0]["text"] = "the movie was great " * 12
    task = load_task(write_task(tmp_path, rows=rows))
    whole = tune(make_model("llama"), tokenizer, task, steps=2, batch_size=8, lr=1e-3, progress=False)
    parts = tune(make_model("llama"), tokenizer, task, steps=2, batch_size=8, lr=1e-3, progress=False,
                 max_batch_tokens=64)
    for (name, a), (_, b) in zip(whole.named_parameters(), parts.named_parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


def test_eval_cli_with_a_200_kb_row_under_an_8_gb_address_limit(tmp_path):
    model, tok = make_model("llama"), make_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rows = rows_for(MANY)
    rows[1]["text"] = ("charming film , a dull mess " * 8000)[:200_000]
    task = write_task(tmp_path, rows=rows)

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (8_000_000 * 1024, 8_000_000 * 1024))  # ulimit -v 8000000

    proc = subprocess.run([sys.executable, "-m", "sieve_edge", "eval", "--model", str(tmp_path / "m"), "--task",
                           str(task), "--limit", "3", "--json"], capture_output=True, text=True,
                          preexec_fn=limit_memory, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["n"] == 3 and out["truncated"] == 1 and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- 4. multi-token labels

@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3", "gemma3_text", "gpt2"])
def test_shared_prefix_scoring_equals_pairs_and_naive(tmp_path, tokenizer, arch):
    model = make_model(arch)
    task = load_task(write_task(tmp_path, prompt="Review: {text}\\nLabel:"))
    n = 8 if arch == "llama" else 3
    scorer = make_scorer(tokenizer, task, "test", limit=n, batch_size=4)
    assert scorer.scoring == "shared-prefix" and not scorer.fast
    shared = scorer.label_logprobs(model)
    pairs = make_scorer(tokenizer, task, "test", limit=n, batch_size=4, scoring="pairs").label_logprobs(model)
    naive = naive_label_logprobs(model, tokenizer, task, load_examples(task, "test", n))
    torch.testing.assert_close(shared, pairs, atol=LOGPROB_TOL, rtol=0)
    torch.testing.assert_close(shared, naive, atol=LOGPROB_TOL, rtol=0)
    # continuations in several chunks (a copy of the prompt's cache each) change nothing
    chunked = make_scorer(tokenizer, task, "test", limit=n, max_batch_tokens=24).label_logprobs(model)
    torch.testing.assert_close(chunked, shared, atol=LOGPROB_TOL, rtol=0)


def test_shared_prefix_on_single_token_labels_equals_the_fast_path(tmp_path, tokenizer, tiny_llama):
    task = load_task(write_task(tmp_path, {"a": " and", "b": " an", "c": " bo"}))
    fast = make_scorer(tokenizer, task, "test")
    shared = make_scorer(tokenizer, task, "test", scoring="shared-prefix")
    assert fast.scoring == "single-token" and shared.scoring == "shared-prefix"
    torch.testing.assert_close(fast.label_logprobs(tiny_llama), shared.label_logprobs(tiny_llama),
                               atol=LOGPROB_TOL, rtol=0)


def test_label_score_mean_divides_by_answer_length(tmp_path, tokenizer, tiny_llama):
    task = load_task(write_task(tmp_path, extra='label_score = "mean"'))
    examples = load_examples(task, "test")
    got = make_scorer(tokenizer, task, "test").label_logprobs(tiny_llama)
    sums = []
    with torch.no_grad():
        for ex in examples:
            prompt = build_prompt(task, tokenizer, ex)
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            row = []
            for answer in task.answers:
                ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(tiny_llama(torch.tensor([ids])).logits[0].double(), -1)
                n = len(ids) - len(p_ids)
                row.append(sum(logp[t - 1, ids[t]] for t in range(len(p_ids), len(ids))) / n)
            sums.append(torch.stack(row))
    torch.testing.assert_close(got, torch.log_softmax(torch.stack(sums), -1).float(), atol=LOGPROB_TOL, rtol=0)
    with pytest.raises(TaskSpecError, match="'label_score' = 'max' is not allowed; allowed values: sum, mean"):
        load_task(write_task(tmp_path / "bad", extra='label_score = "max"'))


def test_continuation_rows_hold_every_prefix_once_in_groups_of_similar_length():
    rows = rt.continuation_rows([[1, 2, 3], [1, 2], [1, 2, 3], [4], [1, 5], []])
    assert rows == [[1, 2, 3], [1, 5], [4]]
    assert rt.row_groups([8, 7, 6, 5, 4, 3, 3, 2, 1], prefix=20) == [[0, 1, 2], [3, 4], [5, 6], [7], [8]]
    assert rt.row_groups([4, 4, 4, 4], prefix=20, budget=50) == [[0, 1], [2, 3]]  # 2 x (20 + 4) <= 50
    assert rt.row_groups([4], prefix=100, budget=50) == [[0]]                     # alone, never dropped


@pytest.mark.parametrize("fmt, runtime", [("onnx", "onnxruntime"), ("openvino", "openvino")])
def test_runner_shared_prefix_matches_torch_and_its_one_row_fallback(tmp_path, tokenizer, fmt, runtime):
    from test_bundle import tiny_export

    task = load_task(write_task(tmp_path, extra='label_score = "mean"'))
    want = make_scorer(tokenizer, task, "test").label_logprobs(make_model("llama")).numpy()
    model = rt.load_model(tiny_export(fmt), runtime, threads=1)
    runner_task = rt.Task(rt._read_toml(task.path), task.path)
    scorer = rt.Scorer(model, tokenizer.backend_tokenizer, runner_task, {}, set(), max_prompt_tokens=100)
    examples = load_examples(task, "test")
    got = rt.log_softmax(np.array([list(scorer.classify(ex.fields)[1].values()) for ex in examples]))
    np.testing.assert_allclose(got, want, atol=LOGPROB_TOL)

    class OneRow:  # a model without forward_rows: the scorer feeds prompt + row, one row at a time
        def __init__(self, inner):
            self.inner = inner

        def reset(self):
            self.inner.reset()

        def forward(self, ids):
            return self.inner.forward(ids)

    plain = rt.Scorer(OneRow(model), tokenizer.backend_tokenizer, runner_task, {}, set(), max_prompt_tokens=100)
    again = rt.log_softmax(np.array([list(plain.classify(ex.fields)[1].values()) for ex in examples]))
    np.testing.assert_allclose(again, got, atol=LOGPROB_TOL)


def test_runner_refuses_a_task_head_for_labels_of_several_tokens(tmp_path, tokenizer):
    single = {"pos": " and", "neg": " an"}
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in single.values()]
    head = {"task_head": {"labels": list(single), "token_ids": ids}}
    ok = load_task(write_task(tmp_path / "ok", single))
    scorer = rt.Scorer(None, tokenizer.backend_tokenizer, rt.Task(rt._read_toml(ok.path), ok.path), head, set())
    scorer.check_head("Review: x\nLabel:", ids)  # one token per label, the head's: fine
    multi = load_task(write_task(tmp_path / "multi", {"pos": " positive", "neg": " an"}))
    scorer = rt.Scorer(None, tokenizer.backend_tokenizer, rt.Task(rt._read_toml(multi.path), multi.path), head, set())
    with pytest.raises(rt.RunnerError, match=r"1 label answer\(s\) are other tokens \(pos -> \[.*export the model "
                                             r"without --task-head"):
        scorer.check_head("Review: x\nLabel:", ids)


def test_search_on_multi_token_labels_falls_back_to_the_spectrum_seed(tmp_path, tokenizer):
    from sieve_edge.search import SearchConfig, search_plan

    labels = {"pos": " positive", "neg": " negative"}  # two tokens each in the tiny vocabulary
    task = load_task(write_task(tmp_path, labels, rows=rows_for(labels, n=8)))
    config = SearchConfig(tolerance=0.5, population=4, generations=1, n_calibration=8, calibration_batch=8,
                          multiple=2, race_size=0, val_limit=None, batch_size=16, seed=0)
    logs = []
    result = search_plan(make_model("llama"), tokenizer, task, config, log=logs.append)
    assert result.evaluations >= 2 and result.task_sensitivity == {}
    assert not any("label Fisher" in line for line in logs)


# ---------------------------------------------------------------- 5. extra test sets

def _with_extra(tmp_path, labels=None, **kw) -> Path:
    labels = MANY if labels is None else labels
    rows = rows_for(labels)
    other = [dict(r, text=r["text"].upper()) for r in rows[:5]]
    (tmp_path / "extra").mkdir(parents=True, exist_ok=True)
    (tmp_path / "extra" / "shout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in other))
    extra = '\n[[extra_test]]\nname = "shout"\npath = "extra/shout.jsonl"\n'
    path = write_task(tmp_path, labels, rows=rows, **kw)
    text = path.read_text()
    path.write_text(text.replace("[labels]", extra.strip() + "\n\n[labels]", 1))
    return path


def test_extra_tests_are_splits_of_their_own(tmp_path, tokenizer, tiny_llama):
    task = load_task(_with_extra(tmp_path))
    assert task.splits == ["train", "calibration", "validation", "test", "extra:shout"]
    assert len(load_examples(task, "extra:shout")) == 5
    results = score_extra_tests(tiny_llama, tokenizer, task)
    assert list(results) == ["shout"] and results["shout"].split == "extra:shout" and results["shout"].n == 5
    with pytest.raises(TaskSpecError, match=r"has no \[\[extra_test\]\] named 'yelp'; declared: shout"):
        load_examples(task, "extra:yelp")


@pytest.mark.parametrize("bad, message", [
    ('[[extra_test]]\nname = "x"\n', r"\[\[extra_test\]\] #1: missing key 'path'"),
    ('[[extra_test]]\nname = "x"\npath = "nope.jsonl"\n', r"key 'extra_test\.path .*data file not found"),
    ('[[extra_test]]\nname = "a b"\npath = "data.jsonl"\n', r"name 'a b' may hold only"),
    ('[[extra_test]]\nname = "x"\npath = "data.jsonl"\nweight = 2\n', r"unknown key\(s\) 'weight'"),
    ('[[extra_test]]\nname = "x"\npath = "data.jsonl"\n[[extra_test]]\nname = "x"\npath = "data.jsonl"\n',
     r"a second extra test named 'x'"),
])
def test_extra_test_errors_name_the_table(tmp_path, bad, message):
    path = write_task(tmp_path)
    path.write_text(path.read_text().replace("[labels]", bad + "\n[labels]", 1))
    with pytest.raises(TaskSpecError, match=message):
        load_task(path)


def test_eval_cli_scores_extra_tests(tmp_path):
    model, tok = make_model("llama"), make_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    task = _with_extra(tmp_path / "task")
    from sieve_edge.cli import main

    runner = CliRunner()
    out = runner.invoke(main, ["eval", "--model", str(tmp_path / "m"), "--task", str(task), "--extra", "--json"])
    assert out.exit_code == 0, out.output
    listed = json.loads(out.output)
    assert [r["split"] for r in listed] == ["test", "extra:shout"] and listed[1]["n"] == 5
    one = runner.invoke(main, ["eval", "--model", str(tmp_path / "m"), "--task", str(task), "--split", "extra:shout"])
    assert one.exit_code == 0 and "extra:shout: accuracy" in one.output
    bad = runner.invoke(main, ["eval", "--model", str(tmp_path / "m"), "--task", str(task), "--split", "extra:nope"])
    assert bad.exit_code == 1 and "no [[extra_test]] named 'nope'; declared: shout" in bad.output


def test_bundle_ships_extra_tests_and_validate_reports_them(tmp_path, tokenizer):
    from sieve_edge.bundle import make_bundle
    from sieve_edge.validate import validate
    from test_bundle import tiny_export, write_profile

    task = _with_extra(tmp_path / "task", chat=True, extra='system = "Rate it."\nmax_prompt_tokens = 60')
    profile = write_profile(tmp_path / "targets", "onnxruntime")
    bundle = make_bundle(tiny_export("onnx"), task, profile, tmp_path / "bundle")
    assert (bundle / "task" / "extra" / "shout.jsonl").is_file()
    bundled = load_task(bundle / "task" / "t.toml")
    assert list(bundled.extra_tests) == ["shout"] and bundled.max_prompt_tokens == 60
    reference = json.loads((bundle / "reference.json").read_text())
    assert reference["extra_tests"]["shout"]["n"] == 5
    spec = load_task(task)
    want = score_extra_tests(make_model("llama"), tokenizer, spec)["shout"].value
    assert reference["extra_tests"]["shout"]["value"] == pytest.approx(want, abs=1e-9)
    report = validate(bundle, profile)
    assert report.extra_tests["shout"]["value"] == pytest.approx(want, abs=1e-9)
    assert report.extra_tests["shout"]["dense"] == pytest.approx(want, abs=1e-9)
    assert "| extra test shout | accuracy" in report.paths["md"].read_text()
    assert json.loads(report.paths["json"].read_text())["extra_tests"]["shout"]["n"] == 5


# ---------------------------------------------------------------- 6. task show

def test_task_show_prints_prompts_answer_ids_balance_and_lengths(tmp_path, monkeypatch):
    model, tok = make_model("llama"), make_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    task = _with_extra(tmp_path / "task")
    from sieve_edge.cli import main

    runner = CliRunner()
    out = runner.invoke(main, ["task", "show", str(task), "--model", str(tmp_path / "m"), "--n", "2", "--json"])
    assert out.exit_code == 0, out.output
    d = json.loads(out.output)
    longest = len(tok(" positive and", add_special_tokens=False)["input_ids"])
    assert d["max_prompt_tokens"] == 128 - longest
    assert f"model context 128 less {longest} for the answer" in d["max_prompt_tokens_from"]
    assert [e["line"] for e in d["examples"]] == [1, 2]
    assert d["examples"][0]["prompt"] == "Title: film\nReview: a charming film\nLabel:"
    pos = next(lab for lab in d["labels"] if lab["label"] == "pos")
    assert pos["ids"] == tok(" positive", add_special_tokens=False)["input_ids"]
    first = {lab: tok(a, add_special_tokens=False)["input_ids"][0] for lab, a in MANY.items()}
    assert set(pos["shares_first_token_with"]) == {k for k in MANY if k != "pos" and first[k] == first["pos"]}
    assert {"pos_and", "p"} <= set(pos["shares_first_token_with"])
    assert d["scoring"].startswith("shared-prefix") and d["task_head"].startswith("not possible")
    assert d["splits"]["test"]["rows"] == 8 and d["splits"]["extra:shout"]["rows"] == 5
    assert sum(d["splits"]["test"]["labels"].values()) == 8
    assert set(d["splits"]["test"]["prompt_tokens"]) == {"p50", "p90", "p99", "max"}
    text = runner.invoke(main, ["task", "show", str(task), "--model", str(tmp_path / "m"), "--n", "1"])
    assert text.exit_code == 0 and "shares its first token with" in text.output and "extra:shout" in text.output

    def missing(spec):
        raise ModelLoadError("model alias 'smollm2-135m' needs the Python package ...")

    monkeypatch.setattr("sieve_edge.tasks.model_context", missing)
    err = runner.invoke(main, ["task", "show", str(task)])
    assert err.exit_code == 1 and "pass --model" in err.output


def test_sample_tasks_load_and_their_data_is_what_they_say():
    for name in ("sst2", "sms_spam", "snips"):
        task = load_task(name)
        assert task.fields == ["text"] and task.sample is None and task.truncation == "left"
    reviews = load_task("reviews")
    assert reviews.fields == ["product", "text"] and list(reviews.extra_tests) == ["imdb"]
    assert {ex.fields["product"] for ex in load_examples(reviews, "extra:imdb")} == {"movie"}
    assert {ex.fields["product"] for ex in load_examples(reviews, "test")} == {"phone accessory", "restaurant"}


# ---------------------------------------------------------------- the benchmark script

def test_banking77_builder_slices_the_csv_files_by_intent(tmp_path):
    # BANKING77 is not shipped: the benchmark builds its task from the dataset's CSV files
    import csv

    from benchscripts import load_benchmark

    bench = load_benchmark("tasks")
    intents = ["card_arrival", "top_up_failed", "reverted_card_payment?"]
    folder = tmp_path / "banking_data"
    folder.mkdir()
    for name, per in (("train.csv", 75), ("test.csv", 4)):
        with open(folder / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "category"])
            for intent in intents:
                for i in range(per):
                    w.writerow([f" {intent} message {i} 1\u00a3 ", intent])
    toml = bench.build_banking77(tmp_path, tmp_path / "task")
    task = load_task(toml)
    assert task.answers == [" card arrival", " top up failed", " reverted card payment"]
    assert task.sample == "stratified"
    sizes = {split: len(load_examples(task, split)) for split in ("train", "validation", "test")}
    assert sizes == {"train": 3 * 60, "validation": 3 * 10, "test": 3 * 4}
    val = load_examples(task, "validation")
    assert val[0].text == "card_arrival message 65 1\u00a3"   # the last 10 train rows of each intent
    assert {ex.label for ex in load_examples(task, "test", 3)} == set(intents)


def test_tasks_benchmark_asks_for_part_one_data_only_when_part_one_runs(capsys):
    from benchscripts import load_benchmark

    bench = load_benchmark("tasks")
    assert bench.parse_args(["--scorings", ""]).scorings == []     # part 2 alone: no BANKING77 needed
    for argv, message in ((["--no-run"], "part 1 needs --banking77"),
                          (["--scorings", "", "--no-run"], "nothing to measure"),
                          (["--task", "t.toml", "--banking77", "d"], "not both")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert message in capsys.readouterr().err


def test_tasks_benchmark_runs_with_tiny_settings(tmp_path):
    from test_bundle import write_profile

    model, tok = make_model("llama"), make_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    many = write_task(tmp_path / "many", prompt="Review: {text}\\nLabel:")
    two = _with_extra(tmp_path / "two", labels={"pos": " and", "neg": " an"})
    profile = write_profile(tmp_path / "targets", "onnxruntime", name="tiny-target", max_metric_drop=1.0)
    out = tmp_path / "tasks.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "tasks.py"), "--model", str(tmp_path / "m"), "--task", str(many),
         "--examples", "4", "--run-task", str(two), "--target", str(profile), "--work", str(tmp_path / "work"),
         "--out", str(out), "--run-args",
         "--tune-steps 0 --calibration 8 --val-limit 8 --test-limit 8 --strategy uniform --tolerance 0.5"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [r["scoring"] for r in doc["scoring"]] == ["pairs", "shared-prefix"]
    assert all(r["examples"] == 4 and r["seconds_per_example"] > 0 for r in doc["scoring"])
    assert doc["scoring"][1]["agreement"] == 1.0 and doc["task"]["labels"] == len(MANY)
    run = doc["run"]
    assert run["exit_code"] == 0 and run["status"] == "pass" and run["prompt"].startswith("Title: {title}")
    assert run["extra_tests"]["shout"]["n"] == 5
    assert "| pairs | 4 |" in proc.stdout and "| shared-prefix | 4 |" in proc.stdout
    assert all(r["cpu_seconds_per_example"] > 0 for r in doc["scoring"])
