"""Task specs (TOML), JSON Lines data, prompt formatting and token sequences.

A task says what the pruned model must still do: how to turn one data row into a prompt,
how the answer is scored, and where the data of each split lives. The TOML format is
documented in ``docs/TASKS.md``; ``samples/tasks/*.toml`` are working examples.

Token sequences are built here, once, for every consumer (evaluation, tuning,
calibration), so that the model sees the same ids for the same example everywhere:
``prompt_ids = special prefix (BOS, if the tokenizer adds one) + ids(prompt)`` and the
answer ids are what ``ids(prompt + answer)`` adds after ``ids(prompt)``. Which rows a limit
keeps, how a template reads a row's fields and how a long prompt is cut come from the
torch-free runner's helpers (``sieve_edge.runtime``), so that the bundle's runner does the same.
"""
from __future__ import annotations

import json
import math
import re

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # Python 3.10: the tomli backport (a dependency there)
    import tomli as tomllib  # type: ignore[no-redef]
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError, TaskSpecError
from .runtime import (BATCH_TOKENS, DEFAULT_CONTEXT, LABEL_SCORES, SAMPLE_MODES, TRUNCATION_SIDES,
                      answer_reserve, context_window, default_prompt_tokens, field_value, fit_fields,
                      parts_fields, render_parts, select_rows, template_parts)

KINDS = {"classification": "accuracy", "generation": "exact_match", "perplexity": "perplexity"}
SPLITS = ("train", "calibration", "validation", "test")
EXTRA = "extra:"  # split name prefix of an [[extra_test]] set: "extra:NAME"
_TOP_KEYS = {"name", "kind", "metric", "prompt", "system", "chat_template", "labels", "data", "max_new_tokens",
             "max_prompt_tokens", "truncation", "label_score", "extra_test"}
_DATA_KEYS = {*SPLITS, "text_field", "label_field", "sample", "seed"}
_EXTRA_KEYS = {"name", "path"}
_EXTRA_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str                        # classification | generation | perplexity
    metric: str                      # accuracy | exact_match | perplexity (fixed by kind)
    prompt: str                      # template; "{name}" is replaced by the row's field (see template_parts)
    path: Path                       # the TOML file (data paths are relative to it)
    data: dict[str, Path]            # split -> JSON Lines file (absolute); calibration defaults to train
    labels: dict[str, str] = field(default_factory=dict)  # data label -> answer text (verbalizer), in order
    system: str | None = None
    chat_template: bool = False
    text_field: str = "text"
    label_field: str = "label"
    max_new_tokens: int = 16
    max_prompt_tokens: int | None = None   # None: the model's context window less the longest answer
    truncation: str = "left"               # left | right | error: which end of a long field is cut
    label_score: str = "sum"               # sum | mean of a label's answer-token log-probabilities
    sample: str | None = None              # head | shuffle | stratified; None: not set (head for limits)
    seed: int = 0                          # of a shuffle / stratified draw
    extra_tests: dict[str, Path] = field(default_factory=dict)  # [[extra_test]] name -> JSON Lines file

    @property
    def label_names(self) -> list[str]:
        return list(self.labels)

    @property
    def answers(self) -> list[str]:
        return list(self.labels.values())

    @cached_property
    def parts(self) -> list[tuple[str, str]]:
        """The prompt template as ("text", literal) / ("field", data field) pieces."""
        return template_parts(self.prompt, self.text_field)

    @cached_property
    def fields(self) -> list[str]:
        """The data fields the prompt reads, in order of first use."""
        return parts_fields(self.parts)

    @property
    def splits(self) -> list[str]:
        """Every split this task declares, extra tests as ``extra:NAME``."""
        return [s for s in SPLITS if s in self.data] + [EXTRA + n for n in self.extra_tests]

    def split_path(self, split: str) -> Path:
        if split.startswith(EXTRA):
            name = split[len(EXTRA):]
            if name not in self.extra_tests:
                declared = ", ".join(self.extra_tests) or "none"
                raise TaskSpecError(f"{self.path}: task '{self.name}' has no [[extra_test]] named '{name}'; "
                                    f"declared: {declared}")
            return self.extra_tests[name]
        if split not in SPLITS:
            raise TaskSpecError(f"{self.path}: unknown split '{split}'; allowed: {', '.join(SPLITS)}, "
                                f"or {EXTRA}NAME for an [[extra_test]]")
        path = self.data.get(split)
        if path is None:
            declared = ", ".join(s for s in SPLITS if s in self.data) or "none"
            raise TaskSpecError(
                f"{self.path}: task '{self.name}' declares no '{split}' split in [data]; declared: {declared}"
            )
        return path


@dataclass(frozen=True)
class Example:
    text: str                # the text field's value ("" when the prompt does not read it)
    label: str | None        # the data label as a string (None when the row has none)
    answer: str | None       # the text the model should produce: verbalizer, or the label itself
    label_index: int | None  # index into task.labels (classification only)
    line: int                # 1-based line in the JSON Lines file
    fields: dict[str, str] = field(default_factory=dict)  # data field -> value, every field the prompt reads
    file: str = ""           # the JSON Lines file


class Examples(list):
    """A list of ``Example`` that also says how its rows were drawn (``sample``)."""

    sample: dict = {}


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


def _check_choice(file: Path, key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise TaskSpecError(f"{file}: key '{key}' = {value!r} is not allowed; allowed values: {', '.join(allowed)}")


def _data_file(file: Path, key: str, value: Any) -> Path:
    _check_type(file, key, value, str, "a path (string) relative to the task file")
    path = (file.parent / value).resolve()
    if not path.is_file():
        raise TaskSpecError(f"{file}: key '{key}': data file not found: {path}")
    return path


def _extra_tests(file: Path, raw: Any) -> dict[str, Path]:
    """[[extra_test]] tables: each a ``name`` and a ``path`` (JSON Lines, relative to the TOML)."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise TaskSpecError(f"{file}: 'extra_test' must be an array of tables [[extra_test]] with keys "
                            f"name and path, got {type(raw).__name__}")
    out: dict[str, Path] = {}
    for i, table in enumerate(raw, 1):
        where = f"[[extra_test]] #{i}"
        unknown = sorted(set(table) - _EXTRA_KEYS)
        if unknown:
            raise TaskSpecError(f"{file}: {where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                                f"allowed keys: name, path")
        for key in ("name", "path"):
            if key not in table:
                raise TaskSpecError(f"{file}: {where}: missing key '{key}'")
        name = table["name"]
        _check_type(file, f"extra_test.name ({where})", name, str, "a string")
        if not _EXTRA_NAME.fullmatch(name):
            raise TaskSpecError(f"{file}: {where}: name {name!r} may hold only letters, digits, '_', '-' and '.'")
        if name in out:
            raise TaskSpecError(f"{file}: {where}: a second extra test named '{name}'")
        out[name] = _data_file(file, f"extra_test.path ({where}, '{name}')", table["path"])
    return out


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
        raise TaskSpecError(f"{file}: missing key 'prompt' (a template containing {{text}} or other {{field}}s)")
    prompt = raw.get("prompt", "{text}")
    _check_type(file, "prompt", prompt, str, "a string")

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

    max_prompt_tokens = raw.get("max_prompt_tokens")
    if max_prompt_tokens is not None:
        _check_type(file, "max_prompt_tokens", max_prompt_tokens, int, "an integer")
        if max_prompt_tokens < 8:
            raise TaskSpecError(f"{file}: key 'max_prompt_tokens' must be >= 8, got {max_prompt_tokens}")
    truncation = raw.get("truncation", "left")
    _check_choice(file, "truncation", truncation, TRUNCATION_SIDES)
    label_score = raw.get("label_score", "sum")
    _check_choice(file, "label_score", label_score, LABEL_SCORES)
    if "label_score" in raw and kind != "classification":
        raise TaskSpecError(f"{file}: key 'label_score' is only allowed for kind 'classification'")

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
    sample = data_raw.get("sample")
    if sample is not None:
        _check_type(file, "data.sample", sample, str, "a string")
        _check_choice(file, "data.sample", sample, SAMPLE_MODES)
    seed = data_raw.get("seed", 0)
    _check_type(file, "data.seed", seed, int, "an integer")

    fields = parts_fields(template_parts(prompt, text_field))
    if not fields and kind != "perplexity":
        raise TaskSpecError(f"{file}: key 'prompt' must contain a placeholder for a field of the row, such as "
                            f"{{text}} (or {{question}}, {{context}}, ...), got {prompt!r}")
    if label_field in fields and kind != "perplexity":
        raise TaskSpecError(f"{file}: key 'prompt' reads the label field '{label_field}' (data.label_field): "
                            f"the model would be shown the answer")

    data: dict[str, Path] = {}
    for split in SPLITS:
        if split in data_raw:
            data[split] = _data_file(file, f"data.{split}", data_raw[split])
    if not data:
        raise TaskSpecError(f"{file}: [data] declares no split; give at least one of {', '.join(SPLITS)}")
    if "calibration" not in data and "train" in data:
        data["calibration"] = data["train"]
    extra = _extra_tests(file, raw["extra_test"]) if "extra_test" in raw else {}

    return TaskSpec(
        name=name, kind=kind, metric=metric, prompt=prompt, path=file, data=data,
        labels=dict(labels), system=system, chat_template=chat,
        text_field=text_field, label_field=label_field, max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens, truncation=truncation, label_score=label_score,
        sample=sample, seed=seed, extra_tests=extra,
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


def load_examples(task: TaskSpec, split: str, limit: int | None = None, *, sample: str | None = None,
                  seed: int | None = None) -> Examples:
    """The rows of one split (or ``extra:NAME``) as ``Example``s, labels checked against ``[labels]``.

    ``limit`` keeps that many rows as the task's ``[data] sample`` says (``head``, the first
    rows in file order, when it says nothing), always returned in file order; ``sample`` and
    ``seed`` override the task's. The returned list's ``sample`` records the draw.
    """
    path = task.split_path(split)
    rows = read_jsonl_lines(path)
    if limit is not None and limit < 1:
        raise TaskSpecError(f"limit must be >= 1, got {limit}")
    mode = sample or task.sample or "head"
    seed = task.seed if seed is None else seed
    raw_labels = [row.get(task.label_field) for _, row in rows]
    keep = select_rows([None if v is None else str(v) for v in raw_labels], limit, mode, seed)
    index = {name: i for i, name in enumerate(task.labels)}
    examples = Examples()
    examples.sample = {"mode": mode, "seed": seed, "limit": limit, "rows": len(keep), "of": len(rows)}
    for line, row in (rows[i] for i in keep):
        fields = {}
        for name in task.fields:
            value = field_value(row, name)
            if value is None:
                what = f"no field '{name}'" if name not in row else \
                    f"field '{name}' must be a string or a number, got {type(row[name]).__name__}"
                placeholder = "{text}" if name == task.text_field else "{" + name + "}"
                raise DataError(f"{path}:{line}: {what} for the placeholder {placeholder} in the prompt of "
                                f"{task.path} (fields of this row: {', '.join(map(str, row)) or 'none'})")
            fields[name] = value
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
        text = fields.get(task.text_field, "")
        examples.append(Example(text=text, label=label, answer=answer, label_index=label_index, line=line,
                                fields=fields, file=str(path)))
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


# ---------------------------------------------------------------- prompts and token ids

def _fields(task: TaskSpec, x) -> dict[str, str]:
    """A row's prompt fields from an Example, a dict of fields, or (one-field prompts) a text."""
    if isinstance(x, Example):
        return x.fields
    if isinstance(x, dict):
        return x
    fields = task.fields
    if len(fields) > 1:
        raise TaskSpecError(f"{task.path}: the prompt reads {len(fields)} fields ({', '.join(fields)}); "
                            "give a row's fields, not one text")
    return {fields[0]: x} if fields else {}


def build_prompt(task: TaskSpec, tokenizer, x) -> str:
    """The prompt string for one row (an Example, its fields, or the text of a one-field
    prompt); the answer text follows it directly.

    With ``chat_template`` the tokenizer's chat template wraps it (system message if any,
    user message, generation prompt). Without, ``system`` is prepended with a blank line.
    Each ``{field}`` is replaced by the row's value once, literally: a value holding braces
    is never read as a placeholder, and braces that are no placeholder stay as they are.
    """
    fields = _fields(task, x)
    try:
        user = render_parts(task.parts, fields)
    except KeyError as e:
        raise TaskSpecError(f"{task.path}: no value for the field {e} the prompt reads") from None
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


# ---------------------------------------------------------------- prompt length

def _tokenizer_context(tokenizer) -> int | None:
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < 1_000_000 else None  # transformers' "unknown" is ~1e30


def prompt_limit(task: TaskSpec, tokenizer, model=None) -> int:
    """The task's ``max_prompt_tokens``, else the model's context window (its config; the
    tokenizer's ``model_max_length`` when no model is given; else 2048) less room for the
    longest answer, or ``max_new_tokens`` for generation. The runner computes the same."""
    if task.max_prompt_tokens is not None:
        return task.max_prompt_tokens
    config = getattr(model, "config", None)
    context = context_window(config.to_dict()) if config is not None else _tokenizer_context(tokenizer)
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in task.answers]
    return default_prompt_tokens(context, answer_reserve(task.kind, lengths, task.max_new_tokens))


@dataclass
class Prompts:
    """Prompt strings of some examples, within a token limit, and their ids (special prefix once)."""

    texts: list[str]
    ids: list[list[int]]
    cut: list[int]           # positions of the examples whose prompt was cut to fit
    limit: int               # max_prompt_tokens they were held to

    @property
    def truncated(self) -> int:
        return len(self.cut)


def encode_examples(task: TaskSpec, tokenizer, examples: list[Example], limit: int,
                    caps: list[int] | None = None) -> Prompts:
    """Prompts of ``examples``, each at most ``limit`` tokens (and ``caps[i]``, a tighter
    bound of the caller's, e.g. a training length): longer ones have their longest field cut
    from the task's ``truncation`` side (``runtime.fit_fields``), or are a ``DataError``
    naming file and line when it is "error" (the caller's cap then cuts from the left).
    A cap shorter than the template itself leaves the prompt whole: the caller cuts tokens."""
    texts = [build_prompt(task, tokenizer, ex) for ex in examples]
    ids = encode_prompts(tokenizer, texts)
    cut = []
    for i, ex in enumerate(examples):
        bound = min(limit, caps[i]) if caps is not None else limit
        if len(ids[i]) <= bound:
            continue
        if task.truncation == "error" and len(ids[i]) > limit:
            raise DataError(f"{ex.file}:{ex.line}: the prompt is {len(ids[i])} tokens, over max_prompt_tokens = "
                            f"{limit} (truncation = \"error\" in {task.path}; use \"left\" or \"right\" to cut it)")
        side = "left" if task.truncation == "error" else task.truncation

        def count(fields):
            return len(encode_prompts(tokenizer, [build_prompt(task, tokenizer, fields)])[0])

        try:
            fields, _ = fit_fields(ex.fields, count, bound, side)
        except ValueError as e:
            if bound == limit:
                raise TaskSpecError(f"{task.path}: {e} (max_prompt_tokens = {limit})") from None
            cut.append(i)  # the caller's bound is tighter than the template: its token cut applies
            continue
        texts[i] = build_prompt(task, tokenizer, fields)
        ids[i] = encode_prompts(tokenizer, [texts[i]])[0]
        cut.append(i)
    return Prompts(texts, ids, cut, limit)


class Sequences(list):
    """(prompt ids, answer ids) per example, with how many prompts were cut (``truncated``)."""

    truncated: int = 0
    limit: int = 0


def example_sequences(task: TaskSpec, tokenizer, examples: list[Example], max_prompt_tokens: int | None = None,
                      max_length: int | None = None) -> Sequences:
    """(prompt ids, answer ids) per example; answer ids are [] when the answer is unknown.

    Prompts are held to ``max_prompt_tokens`` (default: ``prompt_limit`` without a model),
    and, with ``max_length``, prompt + answer to that many tokens (the prompt gives way).
    Perplexity tasks have no prompt/answer split: the whole formatted text is the "answer"
    after the special prefix, so that every token of it is scored or trained.
    """
    limit = prompt_limit(task, tokenizer) if max_prompt_tokens is None else max_prompt_tokens
    answers: list[list[int]] = [[] for _ in examples]
    caps = None
    if task.kind != "perplexity":
        known = [i for i, ex in enumerate(examples) if ex.answer is not None]
        if known:
            # answer ids depend on the prompt only at the boundary: take them from the uncut prompt
            full = [build_prompt(task, tokenizer, examples[i]) for i in known]
            for i, ids in zip(known, encode_answers(tokenizer, full, [examples[i].answer for i in known])):
                answers[i] = ids
        if max_length is not None:
            caps = [max(max_length - len(a), 1) for a in answers]
    elif max_length is not None:
        caps = [max_length] * len(examples)
    prompts = encode_examples(task, tokenizer, examples, limit, caps)
    if task.kind == "perplexity":
        prefix = special_prefix(tokenizer)
        head = [len(prefix) if ids[:len(prefix)] == prefix else 0 for ids in prompts.ids]
        out = Sequences((ids[:h], ids[h:]) for ids, h in zip(prompts.ids, head))
    else:
        cut = [i for i in prompts.cut if examples[i].answer is not None]
        texts = [prompts.texts[i] for i in cut]
        for i, ids in zip(cut, encode_answers(tokenizer, texts, [examples[i].answer for i in cut])):
            answers[i] = ids  # the cut prompt may end otherwise: split its answer again
        out = Sequences(zip(prompts.ids, answers))
    out.truncated, out.limit = prompts.truncated, limit
    return out


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


def token_batches(lengths: list[int], max_rows: int, max_tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """Consecutive groups of positions into ``lengths``, each at most ``max_rows`` rows and
    ``max_tokens`` padded tokens (rows x its longest); a row longer than that goes alone."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        wider = max(longest, n)
        if current and (len(current) + 1 > max_rows or (len(current) + 1) * wider > max_tokens):
            batches.append(current)
            current, wider = [], n
        current.append(i)
        longest = wider
    if current:
        batches.append(current)
    return batches


# ---------------------------------------------------------------- calibration

class CalibrationBatches:
    """Re-iterable calibration batches: each pass yields the same dicts of
    ``input_ids`` and ``attention_mask`` (LongTensors (B, T), right padded).

    A batch holds at most ``batch_size`` rows and ``max_batch_tokens`` padded tokens.
    ``n_tokens`` counts the real (unpadded) tokens of all batches, ``n_examples`` the rows,
    ``truncated`` the prompts that were cut to fit.
    """

    def __init__(self, sequences: list[list[int]], batch_size: int, pad: int,
                 max_batch_tokens: int = BATCH_TOKENS, truncated: int = 0):
        self.sequences = sequences
        self.batch_size = batch_size
        self.pad = pad
        self.n_examples = len(sequences)
        self.n_tokens = sum(len(s) for s in sequences)
        self.truncated = truncated
        self.groups = token_batches([len(s) for s in sequences], batch_size, max_batch_tokens)

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[dict]:
        for group in self.groups:
            ids, mask = right_pad([self.sequences[i] for i in group], self.pad)
            yield {"input_ids": ids, "attention_mask": mask}


def calibration_batches(task: TaskSpec, tokenizer, n_examples: int, batch_size: int = 16,
                        max_length: int = 256, seed: int = 0, max_batch_tokens: int = BATCH_TOKENS,
                        max_prompt_tokens: int | None = None) -> CalibrationBatches:
    """Prompts of the calibration split with the gold answer appended when known.

    ``n_examples`` rows are drawn as the task's ``[data] sample`` says; when it says nothing,
    without replacement by ``seed`` (all rows when the split is smaller), kept in file order.
    Prompts are held to ``max_prompt_tokens`` (default ``prompt_limit``) and prompt + answer
    to ``max_length`` tokens: a longer prompt loses part of its longest field (the task's
    truncation side), never the template or the answer.
    """
    if n_examples < 1:
        raise TaskSpecError(f"n_examples must be >= 1, got {n_examples}")
    if batch_size < 1 or max_length < 2:
        raise TaskSpecError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size}, {max_length}")
    if task.sample is None:
        examples = load_examples(task, "calibration", n_examples, sample="shuffle", seed=seed)
    else:
        examples = load_examples(task, "calibration", n_examples)
    pairs = example_sequences(task, tokenizer, examples, max_prompt_tokens, max_length=max_length)
    head = len(special_prefix(tokenizer))  # an answer alone over max_length keeps its end
    sequences = [truncate(prompt + answer, max_length, head) for prompt, answer in pairs]
    return CalibrationBatches(sequences, batch_size, pad_id(tokenizer), max_batch_tokens, pairs.truncated)


def truncate(ids: list[int], max_length: int, keep_head: int = 0) -> list[int]:
    """Keep the first ``keep_head`` ids (the special prefix) and the last ones, up to max_length."""
    if len(ids) <= max_length:
        return ids
    keep_head = min(keep_head, max_length - 1)
    return ids[:keep_head] + ids[len(ids) - (max_length - keep_head):]


# ---------------------------------------------------------------- a look before a long run

def _percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> int:  # nearest rank
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]

    return {"p50": at(50), "p90": at(90), "p99": at(99), "max": ordered[-1]}


def model_context(spec) -> int | None:
    """A model's context window without loading its weights: config.json of a folder, or the
    GGUF metadata ``<arch>.context_length``; None for a hub id (nothing is downloaded for this)."""
    from .models import read_gguf_metadata, resolve_source

    source = resolve_source(spec)
    if source.is_gguf:
        meta = read_gguf_metadata(source.gguf_path)
        value = meta.get(f"{meta.get('general.architecture')}.context_length")
        return int(value) if isinstance(value, int) else None
    if source.path is not None and (source.path / "config.json").is_file():
        try:
            return context_window(json.loads((source.path / "config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return None
    return None


def describe_task(task: TaskSpec, tokenizer, context: int | None = None, n: int = 3,
                  split: str | None = None) -> dict:
    """What ``sieve-edge task show`` prints: the first ``n`` formatted prompts of ``split``
    (default test, else the first declared), the answer token ids of every label and which
    share a first token (so which scoring path applies), and per split its rows, label
    balance and prompt-length percentiles in tokens against the prompt limit (``context``:
    the model's context window, None when unknown)."""
    reserve = answer_reserve(task.kind, [len(tokenizer(a, add_special_tokens=False)["input_ids"])
                                         for a in task.answers], task.max_new_tokens)
    limit = task.max_prompt_tokens or default_prompt_tokens(context, reserve)
    split = split or ("test" if "test" in task.data else task.splits[0])
    out: dict[str, Any] = {
        "task": task.name, "kind": task.kind, "metric": task.metric, "path": str(task.path),
        "prompt": task.prompt, "fields": task.fields, "chat_template": task.chat_template,
        "max_prompt_tokens": limit,
        "max_prompt_tokens_from": "the task" if task.max_prompt_tokens else
        f"{'model context ' + str(context) if context else f'context {DEFAULT_CONTEXT} (the model does not say)'}"
        f" less {reserve} for the answer",
        "truncation": task.truncation, "sample": task.sample or "head", "seed": task.seed,
        "label_score": task.label_score if task.kind == "classification" else None,
        "splits": {}, "examples": [], "labels": [],
    }
    seen_paths: dict[Path, dict] = {}
    for name in task.splits:
        path = task.split_path(name)
        if path not in seen_paths:
            examples = load_examples(task, name)
            lengths = [len(ids) for ids in encode_prompts(tokenizer, [build_prompt(task, tokenizer, ex)
                                                                       for ex in examples])]
            balance: dict[str, int] = {}
            for ex in examples:
                balance[str(ex.label)] = balance.get(str(ex.label), 0) + 1
            seen_paths[path] = {"file": str(path), "rows": len(examples),
                                "labels": dict(sorted(balance.items(), key=lambda kv: -kv[1])),
                                "prompt_tokens": _percentiles(lengths),
                                "over_limit": sum(n_tok > limit for n_tok in lengths)}
        out["splits"][name] = seen_paths[path]
    shown = load_examples(task, split, n)
    prompts = [build_prompt(task, tokenizer, ex) for ex in shown]
    ids = encode_prompts(tokenizer, prompts)
    for ex, prompt, p_ids in zip(shown, prompts, ids):
        answer = encode_answers(tokenizer, [prompt], [ex.answer])[0] if ex.answer is not None else []
        out["examples"].append({"line": ex.line, "label": ex.label, "prompt": prompt, "prompt_tokens": len(p_ids),
                                "answer": ex.answer, "answer_ids": answer})
    if task.kind == "classification":
        prompt = prompts[0] if prompts else build_prompt(task, tokenizer, {f: "" for f in task.fields})
        per_label = encode_answers(tokenizer, [prompt] * len(task.answers), task.answers)
        firsts: dict[int, list[str]] = {}
        for label, answer_ids in zip(task.labels, per_label):
            firsts.setdefault(answer_ids[0], []).append(label)
        for (label, answer), answer_ids in zip(task.labels.items(), per_label):
            out["labels"].append({"label": label, "answer": answer, "ids": answer_ids,
                                  "tokens": tokenizer.convert_ids_to_tokens(answer_ids),
                                  "shares_first_token_with": [x for x in firsts[answer_ids[0]] if x != label]})
        single = all(len(a) == 1 for a in per_label) and len(firsts) == len(per_label)
        out["scoring"] = "single-token (one forward pass, label rows of the LM head)" if single else \
            "shared-prefix (multi-token answers: the prompt once, each distinct answer prefix once)"
        out["task_head"] = "possible (every answer is one distinct token)" if single else \
            "not possible (an answer has several tokens or shares its first token)"
    return out


def format_task_summary(d: dict) -> str:
    """``describe_task`` as text for a terminal."""
    lines = [f"task {d['task']} ({d['kind']}, {d['metric']}): {d['path']}",
             f"prompt template: {d['prompt']!r}  fields: {', '.join(d['fields']) or 'none'}",
             f"max_prompt_tokens {d['max_prompt_tokens']} ({d['max_prompt_tokens_from']}), truncation "
             f"{d['truncation']}, limits draw rows by [data] sample = {d['sample']} (seed {d['seed']})"]
    if d.get("scoring"):
        lines.append(f"scoring: {d['scoring']}, label_score {d['label_score']}; task-sized LM head {d['task_head']}")
    lines += ["", "split         rows  prompt tokens p50/p90/p99/max  over limit  labels (rows)"]
    for name, s in d["splits"].items():
        p = s["prompt_tokens"]
        lengths = "/".join(str(p.get(k, "-")) for k in ("p50", "p90", "p99", "max"))
        labels = ", ".join(f"{k} {v}" for k, v in list(s["labels"].items())[:8])
        more = f", ... ({len(s['labels'])} labels)" if len(s["labels"]) > 8 else ""
        lines.append(f"{name:<12} {s['rows']:>5}  {lengths:>29}  {s['over_limit']:>10}  {labels}{more}")
    if d["labels"]:
        lines += ["", "label answers and their token ids (after the first example's prompt):"]
        for lab in d["labels"]:
            shared = f"  shares its first token with {', '.join(lab['shares_first_token_with'])}" \
                if lab["shares_first_token_with"] else ""
            lines.append(f"  {lab['label']}: {lab['answer']!r} -> {lab['ids']} {lab['tokens']}{shared}")
    for ex in d["examples"]:
        lines += ["", f"--- example (line {ex['line']}, label {ex['label']!r}, {ex['prompt_tokens']} prompt tokens, "
                      f"answer ids {ex['answer_ids']}) ---", ex["prompt"] + (ex["answer"] or "")]
    return "\n".join(lines)
