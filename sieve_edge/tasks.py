"""Task specs (TOML), JSON Lines data, prompt formatting and token sequences.

A task says what the pruned model must still do: how to turn one data row into a prompt,
how the answer is scored, and where the data of each split lives. The TOML format is
documented in ``docs/TASKS.md``; ``samples/tasks/*.toml`` are working examples.

Token sequences are built here, once, for every consumer (evaluation, tuning,
calibration), so that the model sees the same ids for the same example everywhere:
``prompt_ids = special prefix (BOS, if the tokenizer adds one) + ids(prompt)`` and the
answer ids are what ``ids(prompt + answer)`` adds after ``ids(prompt)``.
"""
from __future__ import annotations

import json
import random

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # Python 3.10: the tomli backport (a dependency there)
    import tomli as tomllib  # type: ignore[no-redef]
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError, TaskSpecError

KINDS = {"classification": "accuracy", "generation": "exact_match", "perplexity": "perplexity"}
SPLITS = ("train", "calibration", "validation", "test")
_TOP_KEYS = {"name", "kind", "metric", "prompt", "system", "chat_template", "labels", "data", "max_new_tokens"}
_DATA_KEYS = {*SPLITS, "text_field", "label_field"}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str                        # classification | generation | perplexity
    metric: str                      # accuracy | exact_match | perplexity (fixed by kind)
    prompt: str                      # template; "{text}" is replaced by the row's text
    path: Path                       # the TOML file (data paths are relative to it)
    data: dict[str, Path]            # split -> JSON Lines file (absolute); calibration defaults to train
    labels: dict[str, str] = field(default_factory=dict)  # data label -> answer text (verbalizer), in order
    system: str | None = None
    chat_template: bool = False
    text_field: str = "text"
    label_field: str = "label"
    max_new_tokens: int = 16

    @property
    def label_names(self) -> list[str]:
        return list(self.labels)

    @property
    def answers(self) -> list[str]:
        return list(self.labels.values())

    def split_path(self, split: str) -> Path:
        if split not in SPLITS:
            raise TaskSpecError(f"{self.path}: unknown split '{split}'; allowed: {', '.join(SPLITS)}")
        path = self.data.get(split)
        if path is None:
            declared = ", ".join(s for s in SPLITS if s in self.data) or "none"
            raise TaskSpecError(
                f"{self.path}: task '{self.name}' declares no '{split}' split in [data]; declared: {declared}"
            )
        return path


@dataclass(frozen=True)
class Example:
    text: str
    label: str | None        # the data label as a string (None when the row has none)
    answer: str | None       # the text the model should produce: verbalizer, or the label itself
    label_index: int | None  # index into task.labels (classification only)
    line: int                # 1-based line in the JSON Lines file


# ---------------------------------------------------------------- loading the spec

def _repo_root() -> Path:
    import sieve_edge

    return Path(sieve_edge.__file__).resolve().parents[1]


def sample_tasks() -> list[str]:
    folder = _repo_root() / "samples" / "tasks"
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


def resolve_task_path(path_or_name: str | Path) -> Path:
    """A path to a .toml file, or a bare name resolved to ``samples/tasks/<name>.toml``."""
    text = str(path_or_name)
    path = Path(text).expanduser()
    if path.suffix == ".toml" or path.exists() or "/" in text or "\\" in text:
        if not path.is_file():
            raise TaskSpecError(f"task file not found: {path}")
        return path.resolve()
    sample = _repo_root() / "samples" / "tasks" / f"{text}.toml"
    if not sample.is_file():
        raise TaskSpecError(
            f"unknown task '{text}': not a file, and no samples/tasks/{text}.toml; "
            f"sample tasks: {', '.join(sample_tasks()) or 'none'}"
        )
    return sample


def _check_type(file: Path, key: str, value: Any, typ, what: str) -> None:
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok:
        raise TaskSpecError(f"{file}: key '{key}' must be {what}, got {type(value).__name__} {value!r}")


def load_task(path_or_name: "str | Path | TaskSpec") -> TaskSpec:
    """Read and check a task TOML. Every problem is a ``TaskSpecError`` naming file and key.

    A TaskSpec passes through unchanged, so stages can take either."""
    if isinstance(path_or_name, TaskSpec):
        return path_or_name
    file = resolve_task_path(path_or_name)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise TaskSpecError(f"{file}: not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise TaskSpecError(f"{file}: not UTF-8 text: {e}") from e

    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise TaskSpecError(
            f"{file}: unknown key(s) {', '.join(repr(k) for k in unknown)}; allowed keys: {', '.join(sorted(_TOP_KEYS))}"
        )

    name = raw.get("name", file.stem)
    _check_type(file, "name", name, str, "a string")

    if "kind" not in raw:
        raise TaskSpecError(f"{file}: missing key 'kind'; allowed values: {', '.join(KINDS)}")
    kind = raw["kind"]
    _check_type(file, "kind", kind, str, "a string")
    if kind not in KINDS:
        raise TaskSpecError(f"{file}: key 'kind' = {kind!r} is not allowed; allowed values: {', '.join(KINDS)}")

    metric = raw.get("metric", KINDS[kind])
    _check_type(file, "metric", metric, str, "a string")
    if metric != KINDS[kind]:
        allowed = ", ".join(f"{m} (kind {k})" for k, m in KINDS.items())
        raise TaskSpecError(
            f"{file}: key 'metric' = {metric!r} is not allowed for kind '{kind}'; "
            f"use '{KINDS[kind]}' (allowed: {allowed})"
        )

    if "prompt" not in raw and kind != "perplexity":
        raise TaskSpecError(f"{file}: missing key 'prompt' (a template containing {{text}})")
    prompt = raw.get("prompt", "{text}")
    _check_type(file, "prompt", prompt, str, "a string")
    if "{text}" not in prompt:
        raise TaskSpecError(f"{file}: key 'prompt' must contain the placeholder {{text}}, got {prompt!r}")

    system = raw.get("system")
    if system is not None:
        _check_type(file, "system", system, str, "a string")

    chat = raw.get("chat_template", False)
    _check_type(file, "chat_template", chat, bool, "true or false")
    if chat and kind == "perplexity":
        raise TaskSpecError(f"{file}: key 'chat_template' must be false for kind 'perplexity'")

    max_new_tokens = raw.get("max_new_tokens", 16)
    _check_type(file, "max_new_tokens", max_new_tokens, int, "an integer")
    if max_new_tokens < 1:
        raise TaskSpecError(f"{file}: key 'max_new_tokens' must be >= 1, got {max_new_tokens}")
    if "max_new_tokens" in raw and kind != "generation":
        raise TaskSpecError(f"{file}: key 'max_new_tokens' is only allowed for kind 'generation'")

    labels = raw.get("labels", {})
    _check_type(file, "labels", labels, dict, "a table [labels] mapping data label -> answer text")
    for key, value in labels.items():
        if not isinstance(value, str) or not value.strip():
            raise TaskSpecError(
                f"{file}: key 'labels.{key}' must be a non-empty string (the answer text), got {value!r}"
            )
    if kind == "classification" and len(labels) < 2:
        raise TaskSpecError(
            f"{file}: kind 'classification' needs a [labels] table with at least 2 entries "
            f"(data label = \"answer text\"), got {len(labels)}"
        )
    if kind == "perplexity" and labels:
        raise TaskSpecError(f"{file}: key 'labels' is not allowed for kind 'perplexity'")
    if kind == "classification" and len(set(labels.values())) != len(labels):
        raise TaskSpecError(f"{file}: [labels] maps two labels to the same answer text: {labels}")

    if "data" not in raw:
        raise TaskSpecError(f"{file}: missing table [data] (keys: {', '.join(sorted(_DATA_KEYS))})")
    data_raw = raw["data"]
    _check_type(file, "data", data_raw, dict, "a table [data]")
    unknown = sorted(set(data_raw) - _DATA_KEYS)
    if unknown:
        raise TaskSpecError(
            f"{file}: unknown key(s) {', '.join(repr('data.' + k) for k in unknown)}; "
            f"allowed keys in [data]: {', '.join(sorted(_DATA_KEYS))}"
        )
    text_field = data_raw.get("text_field", "text")
    label_field = data_raw.get("label_field", "label")
    _check_type(file, "data.text_field", text_field, str, "a string")
    _check_type(file, "data.label_field", label_field, str, "a string")
    data: dict[str, Path] = {}
    for split in SPLITS:
        if split not in data_raw:
            continue
        value = data_raw[split]
        _check_type(file, f"data.{split}", value, str, "a path (string) relative to the task file")
        path = (file.parent / value).resolve()
        if not path.is_file():
            raise TaskSpecError(f"{file}: key 'data.{split}': data file not found: {path}")
        data[split] = path
    if not data:
        raise TaskSpecError(f"{file}: [data] declares no split; give at least one of {', '.join(SPLITS)}")
    if "calibration" not in data and "train" in data:
        data["calibration"] = data["train"]

    return TaskSpec(
        name=name, kind=kind, metric=metric, prompt=prompt, path=file, data=data,
        labels=dict(labels), system=system, chat_template=chat,
        text_field=text_field, label_field=label_field, max_new_tokens=max_new_tokens,
    )


# ---------------------------------------------------------------- data

def read_jsonl(path: str | Path) -> list[dict]:
    """One dict per non-blank line; a malformed line is a ``DataError`` naming ``file:line``."""
    return [row for _, row in read_jsonl_lines(path)]


def read_jsonl_lines(path: str | Path) -> list[tuple[int, dict]]:
    """Like ``read_jsonl`` with the 1-based line number of each row."""
    path = Path(path)
    rows: list[tuple[int, dict]] = []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    with handle:
        try:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: malformed JSON: {e}") from e
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                rows.append((number, row))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text: {e}") from e
    return rows


def load_examples(task: TaskSpec, split: str, limit: int | None = None) -> list[Example]:
    """The rows of one split as ``Example``s, labels checked against ``[labels]``.

    ``limit`` keeps the first rows in file order (deterministic, no shuffling).
    """
    path = task.split_path(split)
    rows = read_jsonl_lines(path)
    if limit is not None:
        if limit < 1:
            raise TaskSpecError(f"limit must be >= 1, got {limit}")
        rows = rows[:limit]
    index = {name: i for i, name in enumerate(task.labels)}
    examples = []
    for line, row in rows:
        if task.text_field not in row:
            raise DataError(f"{path}:{line}: no field '{task.text_field}' (task {task.path}, data.text_field)")
        text = row[task.text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{line}: field '{task.text_field}' must be a string, got {type(text).__name__}")
        raw_label = row.get(task.label_field)
        label = None if raw_label is None else str(raw_label)
        answer = label_index = None
        if task.kind == "classification":
            if label is None:
                raise DataError(f"{path}:{line}: no field '{task.label_field}' (task {task.path}, data.label_field)")
            if label not in index:
                raise TaskSpecError(
                    f"{path}:{line}: label {label!r} is not declared in [labels] of {task.path}; "
                    f"declared labels: {', '.join(task.labels)}"
                )
            label_index = index[label]
            answer = task.labels[label]
        elif task.kind == "generation" and label is not None:
            if task.labels and label not in task.labels:
                raise TaskSpecError(
                    f"{path}:{line}: label {label!r} is not declared in [labels] of {task.path}; "
                    f"declared labels: {', '.join(task.labels)}"
                )
            answer = task.labels.get(label, label)
        examples.append(Example(text=text, label=label, answer=answer, label_index=label_index, line=line))
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


# ---------------------------------------------------------------- prompts and token ids

def build_prompt(task: TaskSpec, tokenizer, text: str) -> str:
    """The prompt string for one row; the answer text follows it directly.

    With ``chat_template`` the tokenizer's chat template wraps it (system message if any,
    user message, generation prompt). Without, ``system`` is prepended with a blank line.
    ``{text}`` is replaced literally, so other braces in the template are kept as they are.
    """
    user = task.prompt.replace("{text}", text)
    if task.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise TaskSpecError(
                f"{task.path}: chat_template = true, but the tokenizer "
                f"({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}) has no chat template; "
                "set chat_template = false"
            )
        messages = ([{"role": "system", "content": task.system}] if task.system else []) + [
            {"role": "user", "content": user}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{task.system}\n\n{user}" if task.system else user


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text when it adds special tokens (BOS), or []."""
    probe = "x"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i])
    return []


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt ids with the special prefix exactly once (a chat template may already hold it)."""
    prefix = special_prefix(tokenizer)
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
    out = []
    for ids in encoded:
        ids = list(ids)
        out.append(ids if prefix and ids[:len(prefix)] == prefix else prefix + ids)
    return out


def encode_answers(tokenizer, prompts: list[str], answers: list[str]) -> list[list[int]]:
    """Answer ids as the tokenizer splits ``prompt + answer`` after the prompt's own ids.

    Falls back to the answer tokenized alone when the two merge across the boundary.
    """
    if not prompts:
        return []
    plain = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    joint = tokenizer([p + a for p, a in zip(prompts, answers)], add_special_tokens=False)["input_ids"]
    alone = None
    out = []
    for i, (p, j) in enumerate(zip(plain, joint)):
        if len(j) > len(p) and list(j[:len(p)]) == list(p):
            out.append(list(j[len(p):]))
        else:
            if alone is None:
                alone = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
            out.append(list(alone[i]))
        if not out[-1]:
            raise TaskSpecError(f"answer {answers[i]!r} encodes to no tokens")
    return out


def pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def example_sequences(task: TaskSpec, tokenizer, examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per example; answer ids are [] when the answer is unknown.

    Perplexity tasks have no prompt/answer split: the whole formatted text is the
    "answer" after the special prefix, so that every token of it is scored or trained.
    """
    if task.kind == "perplexity":
        prefix = special_prefix(tokenizer)
        texts = [build_prompt(task, tokenizer, ex.text) for ex in examples]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [(list(prefix), list(i)) for i in ids]
    prompts = [build_prompt(task, tokenizer, ex.text) for ex in examples]
    prompt_ids = encode_prompts(tokenizer, prompts)
    known = [i for i, ex in enumerate(examples) if ex.answer is not None]
    answer_ids = encode_answers(tokenizer, [prompts[i] for i in known], [examples[i].answer for i in known])
    answers: list[list[int]] = [[] for _ in examples]
    for i, ids in zip(known, answer_ids):
        answers[i] = ids
    return list(zip(prompt_ids, answers))


def right_pad(sequences: list[list[int]], pad: int, value_mask: int = 0):
    """(input_ids, attention_mask) LongTensors (B, T), right padded."""
    import torch

    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    mask = torch.full((len(sequences), length), value_mask, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids, mask


# ---------------------------------------------------------------- calibration

class CalibrationBatches:
    """Re-iterable calibration batches: each pass yields the same dicts of
    ``input_ids`` and ``attention_mask`` (LongTensors (B, T), right padded).

    ``n_tokens`` counts the real (unpadded) tokens of all batches, ``n_examples`` the rows.
    """

    def __init__(self, sequences: list[list[int]], batch_size: int, pad: int):
        self.sequences = sequences
        self.batch_size = batch_size
        self.pad = pad
        self.n_examples = len(sequences)
        self.n_tokens = sum(len(s) for s in sequences)

    def __len__(self) -> int:
        return (self.n_examples + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, self.n_examples, self.batch_size):
            ids, mask = right_pad(self.sequences[start:start + self.batch_size], self.pad)
            yield {"input_ids": ids, "attention_mask": mask}


def calibration_batches(task: TaskSpec, tokenizer, n_examples: int, batch_size: int = 16,
                        max_length: int = 256, seed: int = 0) -> CalibrationBatches:
    """Prompts of the calibration split with the gold answer appended when known.

    ``n_examples`` rows are drawn without replacement by ``seed`` (all rows when the split
    is smaller), kept in file order. Sequences longer than ``max_length`` keep their end
    (the answer) and drop the start of the prompt after the special prefix.
    """
    if n_examples < 1:
        raise TaskSpecError(f"n_examples must be >= 1, got {n_examples}")
    if batch_size < 1 or max_length < 2:
        raise TaskSpecError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size}, {max_length}")
    examples = load_examples(task, "calibration")
    if n_examples < len(examples):
        chosen = sorted(random.Random(seed).sample(range(len(examples)), n_examples))
        examples = [examples[i] for i in chosen]
    prefix = special_prefix(tokenizer)
    sequences = []
    for prompt, answer in example_sequences(task, tokenizer, examples):
        sequences.append(truncate(prompt + answer, max_length, len(prefix)))
    return CalibrationBatches(sequences, batch_size, pad_id(tokenizer))


def truncate(ids: list[int], max_length: int, keep_head: int = 0) -> list[int]:
    """Keep the first ``keep_head`` ids (the special prefix) and the last ones, up to max_length."""
    if len(ids) <= max_length:
        return ids
    keep_head = min(keep_head, max_length - 1)
    return ids[:keep_head] + ids[len(ids) - (max_length - keep_head):]
