"""Torch-free runner: score a bundle's exported model on its task, time it, apply its budgets.

Imports only the standard library, numpy and tokenizers at the top; onnxruntime or openvino
are imported when a model is loaded. It imports nothing of sieve_edge, because this very file
is copied into every bundle as ``runner.py`` and must run alone on the edge box:

    python -m sieve_edge.runtime BUNDLE [--limit N] [--json OUT]
    python runner.py [BUNDLE] [--limit N] [--json OUT]     # inside a bundle

Exit codes: 0 every gate passed, 3 a gate failed or could not be checked, 1 an error.
``sieve-edge validate --emulate`` (this runner under QEMU's ARM64 emulator) adds 4,
accuracy-only: the accuracy gates passed, latency and memory were not measured (emulated);
this runner itself never returns 4.

Per example (``--per-example``): the measurement also lists every scored example's
prediction and, for classification, its label scores, so that two runs of the same bundle
(e.g. ARM64 under emulation and x86) can be compared example by example.

Prompts. The runner has no Jinja: the bundle stores the task's rendered prompt frame
(``prompt.json``: literal pieces and the row fields between them, computed at bundle time
with the tokenizer's real chat template, and verified on test examples), so here a prompt
is those pieces joined with the row's field values. Without a frame, a task that does not
use a chat template is framed from its ``prompt`` string alone; one that does is an error.
Every prompt is bounded by ``max_prompt_tokens`` (the task's, else the model's context
window less the longest answer): longer ones are cut from the task's ``truncation`` side,
counted, or rejected with their file and line. ``--limit`` keeps rows per the task's
``[data] sample`` (head, shuffle or stratified by label, seeded), as sieve_edge.tasks does.

Scoring. Classification: log-likelihood of each label's answer tokens after the prompt (sum
over the answer's tokens, or their mean with ``label_score = "mean"``): the prompt runs
once, then the labels' continuations run from its KV cache in a few batches of similar
length, each distinct answer prefix scored once; a ``task_head`` export gives the label logits directly.
Generation: greedy decoding with the KV cache, exact match of the first non-empty line
(stripped, case-insensitive). Perplexity: exp of the mean token negative log-likelihood.
Token ids follow sieve_edge.tasks (special prefix once, answer ids split from
ids(prompt + answer)), and tests hold the scores to sieve_edge.evaluate's. The task's
``[[extra_test]]`` sets are scored after the test split, untimed.

Timing. ``first_token_ms``: the prompt forward pass (prefill) of each example;
``token_ms``: one greedy decode step with the KV cache (for classification and perplexity
tasks a few decode steps are run on the first examples just to measure it);
``example_ms``: one example end to end, tokenization included. A generation task decodes
in the runtime's C++ loop when it has one (``--loop``: OpenVINO GenAI, onnxruntime-genai),
timed by that loop; the measurement names the loop (``generation_loop``). ``warmup`` examples run
first, untimed. Percentiles p50/p90 over the timed samples. Peak memory is the process's
peak resident set size; size is the model folder on disk. MB = 2**20 bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

# Run as `python runner.py`, Python puts the bundle folder first on sys.path: a numpy.py or
# tokenizers.py dropped into the bundle would be imported instead of the real package before
# the bundle's files are checked. The runner never imports from its own folder.
if __name__ == "__main__" and not __package__ and sys.path \
        and os.path.abspath(sys.path[0] or os.curdir) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import numpy as np  # noqa: E402 - after the sys.path guard above

RUNNER_VERSION = 1
EXIT_OK, EXIT_ERROR, EXIT_GATE = 0, 1, 3
EXIT_ACCURACY_ONLY = 4  # sieve-edge validate --emulate: accuracy gates passed, latency/memory not measured
MB = float(1 << 20)

# metric name -> True when higher is better
METRICS = {"accuracy": True, "macro_f1": True, "exact_match": True, "perplexity": False}
DEFAULT_METRIC = {"classification": "accuracy", "generation": "exact_match", "perplexity": "perplexity"}
BUDGET_KEYS = ("max_metric_drop", "max_first_token_ms", "max_token_ms", "max_example_ms",
               "max_peak_memory_mb", "max_size_mb")


class RunnerError(Exception):
    """A bundle, task or model the runner cannot use; the message says what and where."""


# ---------------------------------------------------------------- files


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunnerError(f"missing file: {path}") from None
    except UnicodeDecodeError as e:
        raise RunnerError(f"{path}: not UTF-8 text (byte {e.start}): a corrupt file") from None
    except json.JSONDecodeError as e:
        raise RunnerError(f"{path}: not valid JSON: {e}") from None
    except OSError as e:
        raise RunnerError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise RunnerError(f"{path}: must be a JSON object, got {type(data).__name__}")
    return data


def _read_toml(path: Path, fallback: dict | None = None) -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - older Pythons on edge boxes
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            if fallback is not None:
                return fallback  # the parsed copy stored in bundle.json
            raise RunnerError(f"reading {path} needs Python >= 3.11 or `pip install tomli`") from None
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunnerError(f"missing file: {path}") from None
    except UnicodeDecodeError as e:
        raise RunnerError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise RunnerError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise RunnerError(f"{path}: cannot be read ({e.strerror or e})") from None


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    return [row for _, row in read_jsonl_lines(path, limit)]


def read_jsonl_lines(path: Path, limit: int | None = None) -> list[tuple[int, dict]]:
    """(1-based line, row) per non-blank line, the first ``limit`` rows only when given."""
    rows = []
    n = 0
    try:
        with open(path, "rb") as f:  # bytes: a bad byte is reported with its line, not as a decode error
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise RunnerError(f"{path}:{n}: not UTF-8 text (byte {e.start} of the line)") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RunnerError(f"{path}:{n}: not valid JSON: {e}") from None
                if not isinstance(row, dict):
                    raise RunnerError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                rows.append((n, row))
                if limit is not None and len(rows) >= limit:
                    break
    except FileNotFoundError:
        raise RunnerError(f"missing data file: {path}") from None
    except OSError as e:
        raise RunnerError(f"{path}: cannot be read ({e.strerror or e})") from None
    return rows


# ---------------------------------------------------------------- bundle integrity

BUNDLE_MUTABLE = ("MODEL_CARD.md",)  # rewritten by `sieve-edge validate` (its table of targets)
BUNDLE_OUTPUT_DIRS = ("reports",)    # written by `sieve-edge validate`
# An unrecorded file is refused where something could load it: in the folders the runner
# reads (model, task) and anywhere when it is code; others (a `--json out.json`) are left be.
_CODE_SUFFIXES = (".py", ".pyc", ".pyd", ".pth", ".so", ".dll", ".dylib")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_bundle(bundle, manifest: dict | None = None) -> None:
    """Check the bundle's files against the sha256 that ``bundle.json`` records, before anything is loaded.

    A recorded file that is missing or differs is a RunnerError naming it; so is a file that
    ``bundle.json`` does not record inside the model or task folder, or one that is code
    (``.py``, ``.so``, ...) anywhere (``reports/`` and ``MODEL_CARD.md`` are written by validate). This checks integrity (a bad copy, a flipped bit, an edited file), not authenticity:
    whoever can edit the bundle can edit ``bundle.json`` too, so compare ``bundle.json``'s
    own sha256 with the one ``sieve-edge bundle`` printed.
    """
    bundle = Path(bundle)
    manifest_path = bundle / "bundle.json"
    manifest = _read_json(manifest_path) if manifest is None else manifest
    hashes = manifest.get("sha256")
    if not isinstance(hashes, dict) or not hashes:
        raise RunnerError(f"{manifest_path}: records no sha256 of the bundle's files (a bundle older than "
                          "format_version 2, or an edited bundle.json); rebuild it with `sieve-edge bundle`")
    problems = []
    root = bundle.resolve()
    for name, digest in sorted(hashes.items()):
        f = (bundle / name)
        if Path(name).is_absolute() or ".." in Path(name).parts or not f.resolve().is_relative_to(root):
            raise RunnerError(f"{manifest_path}: sha256 names '{name}', a path outside the bundle")
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif file_sha256(f) != digest:
            problems.append(f"{name} was modified (its sha256 differs from bundle.json's)")
    read_dirs = {str(manifest.get("model_dir", "model")).strip("/"), "task"}
    for f in sorted(bundle.rglob("*")):
        rel = f.relative_to(bundle).as_posix()
        top = rel.split("/", 1)[0]
        if f.is_dir() or rel == "bundle.json" or rel in hashes or rel in BUNDLE_MUTABLE or top in BUNDLE_OUTPUT_DIRS:
            continue
        if (top in read_dirs and "/" in rel) or f.suffix.lower() in _CODE_SUFFIXES:
            problems.append(f"{rel} is not part of the bundle (bundle.json does not record it)")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise RunnerError(f"bundle {bundle} does not match its bundle.json: {'; '.join(problems[:3])}{more}; "
                          "copy the bundle again or rebuild it with `sieve-edge bundle`")


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB.

    On Linux this is VmHWM from /proc/self/status, not ``getrusage().ru_maxrss``: the kernel
    carries ru_maxrss over fork and exec, so a runner started by a process that had loaded a
    model would report its parent's peak (checked here: a child of an 800 MB parent read
    813 MB from ru_maxrss, 13 MB from VmHWM).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / MB if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux
    except ImportError:  # pragma: no cover - Windows
        import psutil

        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / MB


# ---------------------------------------------------------------- prompts, rows, lengths
#
# sieve_edge.tasks imports these: the torch side and this runner pick the same rows, fill
# the same fields and cut the same prompts, with one implementation.

# {name} is a placeholder for the row's field `name`; {{name}} is the literal text {name};
# any other brace ({"a": 1}, {}, {0}) is literal text.
_PLACEHOLDER = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
SAMPLE_MODES = ("head", "shuffle", "stratified")
TRUNCATION_SIDES = ("left", "right", "error")
LABEL_SCORES = ("sum", "mean")
DEFAULT_CONTEXT = 2048      # prompt tokens when neither the task nor the model says more
BATCH_TOKENS = 4096         # padded tokens per forward pass (rows x longest row)
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def template_parts(template: str, text_field: str = "text") -> list[tuple[str, str]]:
    """A prompt template as ("text", literal) and ("field", data field) pieces, in order.

    ``{text}`` stands for the row's ``text_field``; ``{name}`` for its field ``name``.
    """
    parts: list[tuple[str, str]] = []
    literal, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        literal.append(template[pos:m.start()])
        pos = m.end()
        if m.group(1) is not None:          # {{name}}: literal braces
            literal.append("{" + m.group(1) + "}")
            continue
        if any(literal):
            parts.append(("text", "".join(literal)))
        literal = []
        name = m.group(2)
        parts.append(("field", text_field if name == "text" else name))
    literal.append(template[pos:])
    if any(literal):
        parts.append(("text", "".join(literal)))
    return parts


def parts_fields(parts) -> list[str]:
    """The data fields a template reads, each once, in order of first use."""
    return list(dict.fromkeys(value for kind, value in parts if kind == "field"))


def render_parts(parts, fields: dict[str, str]) -> str:
    """The prompt text: literals as they are, each field's value inserted once (never re-parsed)."""
    return "".join(value if kind == "text" else fields[value] for kind, value in parts)


def field_value(row: dict, name: str) -> str | None:
    """A row's field as prompt text: strings as they are, numbers printed; None if unusable."""
    value = row.get(name)
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def select_rows(labels: list, limit: int | None, mode: str = "head", seed: int = 0) -> list[int]:
    """Indices (in file order) of the rows a ``limit`` keeps; ``labels`` has one entry per row.

    head: the first rows. shuffle: a seeded draw without replacement. stratified: per label a
    share of the limit proportional to its rows (largest remainders; every label at least one
    row when the limit allows), drawn by seed within the label.
    """
    n = len(labels)
    if limit is None or limit >= n:
        return list(range(n))
    if mode == "head":
        return list(range(limit))
    rng = random.Random(seed)
    if mode == "shuffle":
        return sorted(rng.sample(range(n), limit))
    if mode != "stratified":
        raise ValueError(f"sample mode {mode!r}; allowed: {', '.join(SAMPLE_MODES)}")
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault("" if label is None else str(label), []).append(i)
    names = sorted(groups)
    exact = {g: limit * len(groups[g]) / n for g in names}
    quota = {g: int(exact[g]) for g in names}
    by_remainder = sorted(names, key=lambda g: (-(exact[g] - quota[g]), g))
    for g in by_remainder[:limit - sum(quota.values())]:
        quota[g] += 1
    if limit >= len(names):  # a rare label still gets one row, taken from the largest share
        for g in names:
            if quota[g] == 0:
                donor = max(names, key=lambda d: (quota[d], -names.index(d)))
                quota[donor] -= 1
                quota[g] = 1
    chosen = []
    for g in names:
        chosen += rng.sample(groups[g], quota[g])
    return sorted(chosen)


def context_window(config: dict | None) -> int | None:
    """The model's context length from its config.json (None when it does not say)."""
    for key in _CONTEXT_KEYS:
        value = (config or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def default_prompt_tokens(context: int | None, reserve: int) -> int:
    """The prompt budget when the task sets no ``max_prompt_tokens``: the context window less
    ``reserve`` tokens for what follows the prompt (the longest answer, or max_new_tokens)."""
    return max(8, (context or DEFAULT_CONTEXT) - max(reserve, 0))


def fit_fields(fields: dict[str, str], count, limit: int, side: str) -> tuple[dict[str, str], int]:
    """Cut field values until ``count(fields)`` (prompt tokens) is at most ``limit``.

    The longest value gives way first, cut from ``side`` ("left" drops its start, "right" its
    end) by bisection on characters, so the template itself is never cut; a value emptied
    without fitting passes the cut on to the next longest. Returns (fields, tokens before).
    Raises ValueError when the prompt with every field empty is still over the limit.
    """
    before = count(fields)
    if before <= limit:
        return fields, before
    out = dict(fields)
    for name in sorted(out, key=lambda k: -len(out[k])):   # stable: ties keep template order
        value = out[name]
        out[name] = ""
        if count(out) > limit:
            continue
        lo, hi = 0, len(value)   # keeping lo characters fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            out[name] = value[len(value) - mid:] if side == "left" else value[:mid]
            if count(out) <= limit:
                lo = mid
            else:
                hi = mid
        out[name] = value[len(value) - lo:] if side == "left" else value[:lo]
        return out, before
    raise ValueError(f"the prompt is {count(out)} tokens with every field empty, over the limit of {limit}")


# ---------------------------------------------------------------- task


class Task:
    """The minimum of a task spec the runner needs, read from its TOML (no sieve_edge.tasks).

    Token sequences follow sieve_edge.tasks exactly: prompt ids are the tokenizer's special
    prefix (BOS, if any; once) + ids(prompt); an answer's ids are what ids(prompt + answer)
    adds after ids(prompt), or the answer tokenized alone when the two merge at the boundary.
    Rows, fields and prompt cuts come from the shared helpers above.
    """

    def __init__(self, spec: dict, path: Path, test_path: Path | None = None, frame: dict | None = None):
        self.path = Path(path)
        self.name = spec.get("name", self.path.stem)
        self.kind = spec.get("kind", "classification")
        if self.kind not in DEFAULT_METRIC:
            raise RunnerError(f"{path}: kind '{self.kind}' is not one of {', '.join(DEFAULT_METRIC)}")
        self.metric = spec.get("metric", DEFAULT_METRIC[self.kind])
        if self.metric not in METRICS:
            raise RunnerError(f"{path}: metric '{self.metric}' is not one the runner computes: {', '.join(METRICS)}")
        self.labels = {str(k): str(v) for k, v in (spec.get("labels") or {}).items()}
        if self.kind == "classification" and len(self.labels) < 2:
            raise RunnerError(f"{path}: a classification task needs a [labels] table with at least 2 entries")
        self.max_new_tokens = int(spec.get("max_new_tokens", 16))
        self.label_score = self._choice(spec, "label_score", "sum", LABEL_SCORES)
        self.truncation = self._choice(spec, "truncation", "left", TRUNCATION_SIDES)
        self.max_prompt_tokens = spec.get("max_prompt_tokens")  # None: from the model's context window
        if self.max_prompt_tokens is not None and (not isinstance(self.max_prompt_tokens, int)
                                                   or self.max_prompt_tokens < 8):
            raise RunnerError(f"{path}: 'max_prompt_tokens' must be an integer >= 8, got {self.max_prompt_tokens!r}")
        data = spec.get("data") or {}
        self.text_field = data.get("text_field", "text")
        self.label_field = data.get("label_field", "label")
        self.sample = self._choice(data, "sample", "head", SAMPLE_MODES, "data.")
        self.seed = int(data.get("seed", 0))
        if test_path is None:
            if "test" not in data:
                raise RunnerError(f"{path}: no [data] test file")
            test_path = self.path.parent / data["test"]
        self.test_path = Path(test_path)
        self.extra_tests: dict[str, Path] = {}
        for entry in spec.get("extra_test") or []:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                    or not isinstance(entry.get("path"), str):
                raise RunnerError(f"{path}: each [[extra_test]] needs a string 'name' and 'path', got {entry!r}")
            self.extra_tests[entry["name"]] = self.path.parent / entry["path"]
        if frame is None:
            if spec.get("chat_template"):
                raise RunnerError(f"{path}: the task uses a chat template; the runner needs the bundle's "
                                  "prompt.json (rendered at bundle time) to frame its prompts")
            parts = template_parts(spec.get("prompt", "{text}"), self.text_field)
            if spec.get("system"):
                parts.insert(0, ("text", spec["system"] + "\n\n"))
            frame = {"parts": parts, "special_prefix": None}
        if "parts" in frame:
            self.parts = [(str(kind), str(value)) for kind, value in frame["parts"]]
        else:  # a frame of one {text} field, as bundles made before prompts had several fields
            self.parts = [("text", frame["prefix"]), ("field", self.text_field), ("text", frame["suffix"])]
        self.fields = parts_fields(self.parts)
        if not self.fields and self.kind != "perplexity":
            raise RunnerError(f"{path}: the prompt has no placeholder for a field of the row, e.g. {{text}}")
        # None: derive from the tokenizer (what it adds before a text with add_special_tokens)
        self.special_prefix = frame.get("special_prefix")

    @staticmethod
    def _choice(table: dict, key: str, default: str, allowed: tuple, prefix: str = "") -> str:
        value = table.get(key, default)
        if value not in allowed:
            raise RunnerError(f"'{prefix}{key}' = {value!r} is not allowed; allowed: {', '.join(allowed)}")
        return value

    def prompt(self, fields: dict[str, str]) -> str:
        return render_parts(self.parts, fields)

    def row_fields(self, row: dict, where: str) -> dict[str, str]:
        """The values the prompt reads from one row; ``where`` names the file and line."""
        out = {}
        for name in self.fields:
            value = field_value(row, name)
            if value is None:
                what = "no field" if name not in row else f"a {type(row[name]).__name__} in field"
                raise RunnerError(f"{where}: {what} '{name}' for the prompt of {self.path} "
                                  f"(fields of this row: {', '.join(map(str, row)) or 'none'})")
            out[name] = value
        return out

    def label(self, row: dict) -> str | None:
        value = row.get(self.label_field)
        return None if value is None else str(value)

    def answer(self, row: dict) -> str:
        label = self.label(row) or ""
        return self.labels.get(label, label)


# ---------------------------------------------------------------- models


class _OrtModel:
    """optimum's decoder ONNX with KV cache (past_key_values.{i}.key/value -> present.{i}.*)."""

    runtime = "onnxruntime"

    def __init__(self, model_dir: Path, threads: int, precision: str, device: str):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RunnerError("onnxruntime is not installed: pip install onnxruntime") from None
        if precision != "f32":
            raise RunnerError(f"onnxruntime's CPU provider has no '{precision}' precision hint; use f32")
        if device != "cpu":
            raise RunnerError(f"this runner drives onnxruntime on cpu only, not '{device}'")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._ort, self._opts = ort, opts
        self.model_dir, self.threads = Path(model_dir), threads
        self.version = ort.__version__
        self.settings = {"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                         "inference_precision": "f32", "provider": "CPUExecutionProvider"}
        self.session = None   # opened on first use: a C++ generation loop opens its own
        self.length = 0

    def open(self) -> None:
        if self.session is not None:
            return
        model_dir = self.model_dir
        self.session = _loaded(model_dir / "model.onnx", self.runtime, lambda: self._ort.InferenceSession(
            str(model_dir / "model.onnx"), self._opts, providers=["CPUExecutionProvider"]))
        config = _maybe_json(model_dir / "config.json")
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        if "input_ids" not in self.inputs or "logits" not in self.output_names:
            raise RunnerError(f"{model_dir / 'model.onnx'}: expected an input 'input_ids' and an output 'logits'")
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]
        self._int = {n: (np.int32 if "int32" in self.inputs[n].type else np.int64)
                     for n in ("input_ids", "attention_mask", "position_ids") if n in self.inputs}
        self._empty = {}
        for n in self.past:
            shape = self.inputs[n].shape  # (batch, kv_heads, past_len, head_dim)
            heads, head_dim = shape[1], shape[3]
            if not isinstance(heads, int):
                heads = config.get("num_key_value_heads", config.get("num_attention_heads"))
            if not isinstance(head_dim, int):
                head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
            dtype = np.float16 if "float16" in self.inputs[n].type else np.float32
            self._empty[n] = np.zeros((1, heads, 0, head_dim), dtype=dtype)

    def reset(self) -> None:
        self.open()
        self.cache = dict(self._empty)
        self.length = 0

    def forward(self, ids: list[int]) -> np.ndarray:
        """Feed new tokens after those already cached; return their logits (T, V)."""
        t = len(ids)
        feeds = {"input_ids": np.asarray([ids], dtype=self._int["input_ids"])}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((1, self.length + t), dtype=self._int["attention_mask"])
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(self.length, self.length + t, dtype=self._int["position_ids"])[None]
        if "use_cache_branch" in self.inputs:  # merged decoders of older optimum
            feeds["use_cache_branch"] = np.asarray([self.length > 0])
        feeds.update(self.cache)
        outs = dict(zip(self.output_names, self.session.run(None, feeds)))
        for n in self.past:
            self.cache[n] = outs[n.replace("past_key_values.", "present.")]
        self.length += t
        return outs["logits"][0]

    def forward_rows(self, rows: list[list[int]]) -> np.ndarray:
        """Logits (R, A, V) of several continuations of the cached tokens, each row right padded
        to A (padding comes after a row's tokens, so causal attention keeps it out of them).
        The cache is left as it was: the next call continues the same prefix."""
        r, a = len(rows), max(len(row) for row in rows)
        ids = np.zeros((r, a), dtype=self._int["input_ids"])
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
        feeds = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((r, self.length + a), dtype=self._int["attention_mask"])
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.tile(np.arange(self.length, self.length + a,
                                                      dtype=self._int["position_ids"]), (r, 1))
        if "use_cache_branch" in self.inputs:
            feeds["use_cache_branch"] = np.asarray([self.length > 0])
        for n in self.past:  # (1, heads, T, head_dim) -> (R, heads, T, head_dim)
            feeds[n] = np.repeat(self.cache[n], r, axis=0)
        return self.session.run(["logits"], feeds)[0]


class _OvModel:
    """optimum-intel's stateful OpenVINO IR (KV cache held in the infer request's state).

    Compiled on first use: a generation task run through OpenVINO GenAI's C++ loop
    (``_GenAiLoop``) never compiles it, so the process holds one compiled model, not two.
    """

    runtime = "openvino"

    def __init__(self, model_dir: Path, threads: int, precision: str, device: str,
                 dynamic_quantization: bool = False, cache_capacity: int | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise RunnerError("openvino is not installed: pip install openvino") from None
        self.model_dir, self.device = Path(model_dir), device
        self._core = ov.Core()
        self._model = self._core.read_model(str(model_dir / "openvino_model.xml"))
        names = {i.get_any_name() for i in self._model.inputs}
        if "beam_idx" not in names:
            raise RunnerError(f"{model_dir / 'openvino_model.xml'}: not a stateful export (no 'beam_idx' input); "
                              "export with stateful=True")
        self.inputs = names
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision,
                  "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if precision == "f32":
            config["KV_CACHE_PRECISION"] = "f32"   # else the CPU plugin keeps the KV cache in f16
        if not dynamic_quantization:
            # else int8 activations for compressed-weight MatMuls, even with the f32 hint: on
            # SmolLM2 int8 / sst2 that flipped 4.0% of 300 predictions instead of 1.7%
            config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0
        if cache_capacity is not None:
            # the CPU plugin keeps compiled kernels and buffers per input shape (default 5000
            # entries); every prompt length and KV length is a new shape, so its memory grows
            # with the lengths seen: see docs/TARGETS.md (runtime_cache_capacity)
            config["CPU_RUNTIME_CACHE_CAPACITY"] = int(cache_capacity)
        self.config = config
        self.version = ov.get_version()
        # what was asked for; replaced by what the plugin reports once compiled
        self.settings = {k: str(v) for k, v in config.items()}
        self.settings["inference_precision"] = precision
        self.settings["compiled"] = "not yet"
        self._request = None
        self._beam = np.zeros(1, dtype=np.int32)
        self.length = 0

    @property
    def request(self):
        self.open()
        return self._request

    def open(self) -> None:
        if self._request is not None:
            return
        compiled = _loaded(self.model_dir / "openvino_model.xml", self.runtime,
                           lambda: self._core.compile_model(self._model, self.device.upper(), self.config))
        self._request = compiled.create_infer_request()
        settings = {"INFERENCE_NUM_THREADS": self.config["INFERENCE_NUM_THREADS"]}
        for key in ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION", "DYNAMIC_QUANTIZATION_GROUP_SIZE",
                    "NUM_STREAMS", "PERFORMANCE_HINT"):
            try:  # read back what the plugin actually uses: the hint is stated, not assumed
                value = compiled.get_property(key)
                settings[key] = value.to_string() if hasattr(value, "to_string") else str(value)
            except Exception:  # noqa: BLE001 - a property a plugin does not expose
                pass
        # an internal plugin property: known to compile_model (which rejects unknown keys), not readable back
        capacity = self.config.get("CPU_RUNTIME_CACHE_CAPACITY")
        settings["CPU_RUNTIME_CACHE_CAPACITY"] = "plugin default" if capacity is None else str(capacity)
        settings["inference_precision"] = settings.get("INFERENCE_PRECISION_HINT",
                                                       self.config["INFERENCE_PRECISION_HINT"])
        self.settings = settings

    def reset(self) -> None:
        self.request.reset_state()
        self.length = 0

    def forward(self, ids: list[int]) -> np.ndarray:
        t = len(ids)
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64), "beam_idx": self._beam}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((1, self.length + t), dtype=np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(self.length, self.length + t, dtype=np.int64)[None]
        self.request.infer(feeds)
        self.length += t
        return self.request.get_tensor("logits").data[0].copy()

    def forward_rows(self, rows: list[list[int]]) -> np.ndarray:
        """Logits (R, A, V) of several continuations of the cached tokens (see _OrtModel).
        ``beam_idx`` = zeros copies the one cached row to R rows inside the plugin; the state
        is saved before and restored after, so the next call continues the same prefix."""
        import openvino as ov

        saved = [(s, s.state.data.copy()) for s in self.request.query_state()]
        r, a = len(rows), max(len(row) for row in rows)
        ids = np.zeros((r, a), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
        feeds = {"input_ids": ids, "beam_idx": np.zeros(r, dtype=np.int32)}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((r, self.length + a), dtype=np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.tile(np.arange(self.length, self.length + a, dtype=np.int64), (r, 1))
        try:
            self.request.infer(feeds)
            return self.request.get_tensor("logits").data.copy()
        finally:
            for state, data in saved:
                state.state = ov.Tensor(data)


# Generation loops. "python": the runner's own greedy loop over ``model.forward`` (one call
# into the runtime per token, numpy argmax in between). "cpp": the runtime's own C++ loop,
# where it has one: OpenVINO GenAI's LLMPipeline over the same IR and hints. "auto": cpp
# when it is importable and the task generates, else python.
LOOPS = ("auto", "python", "cpp")


class _GenAiLoop:
    """Greedy generation in OpenVINO GenAI's C++ ``LLMPipeline``, fed the runner's token ids.

    The runner tokenizes (its tokenizers file, its prompt frame), so the folder needs no
    converted tokenizer. Same IR, same plugin config as ``_OvModel``; timings come from the
    pipeline's own perf metrics (time to first token, then each later token)."""

    name = "openvino_genai.LLMPipeline (C++)"

    def __init__(self, model_dir: Path, device: str, config: dict):
        import openvino as ov
        import openvino_genai as og

        self._og, self._ov = og, ov
        self.pipe = og.LLMPipeline(str(model_dir), device.upper(), **{k: v for k, v in config.items()
                                                                      if k not in ("PERFORMANCE_HINT", "NUM_STREAMS")})
        self.version = og.get_version() if hasattr(og, "get_version") else getattr(og, "__version__", "?")

    def generate(self, ids: list[int], max_new: int, eos: set[int], stop_at_eos: bool):
        """(new token ids, first-token ms, [ms of each later token])."""
        cfg = self._og.GenerationConfig()
        cfg.max_new_tokens = max_new
        cfg.do_sample = False
        if stop_at_eos and eos:
            cfg.stop_token_ids = set(int(e) for e in eos)
        else:
            cfg.ignore_eos = True
            cfg.min_new_tokens = max_new
        result = self.pipe.generate(self._ov.Tensor(np.asarray([ids], dtype=np.int64)), cfg)
        tokens = [int(t) for t in result.tokens[0]]
        if stop_at_eos:
            cut = next((i for i, t in enumerate(tokens) if t in eos), None)
            tokens = tokens if cut is None else tokens[:cut]
        metrics = result.perf_metrics
        later = [d / 1e3 for d in metrics.raw_metrics.m_durations]   # microseconds -> ms
        return tokens[:max_new], float(metrics.get_ttft().mean), later


class _OrtGenAiLoop:
    """Greedy generation in onnxruntime-genai's C++ generator over the export's own graph
    (``genai_config.json``, written by the exporter), fed the runner's token ids.

    The KV cache stays in the generator between steps (the Python loop hands it through
    numpy every step). Timing: first token = the prompt pass and the pick of the first
    token; each later token = one ``generate_next_token`` (one forward + the pick)."""

    name = "onnxruntime_genai.Generator (C++)"

    def __init__(self, model_dir: Path, threads: int):
        import onnxruntime_genai as og

        self._og = og
        config = og.Config(str(model_dir))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.version = getattr(og, "__version__", "?")

    def generate(self, ids: list[int], max_new: int, eos: set[int], stop_at_eos: bool):
        og = self._og
        params = og.GeneratorParams(self.model)
        total = len(ids) + max_new
        params.set_search_options(max_length=total, min_length=0 if stop_at_eos else total, do_sample=False)
        gen = og.Generator(self.model, params)
        out, later = [], []
        t0 = time.perf_counter()
        gen.append_tokens([ids])
        first = None
        while len(out) < max_new and not gen.is_done():
            t = time.perf_counter()
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            now = time.perf_counter()
            if first is None:
                first = (now - t0) * 1e3
            else:
                later.append((now - t) * 1e3)
            if stop_at_eos and token in eos:
                break
            out.append(token)
        return out, first if first is not None else (time.perf_counter() - t0) * 1e3, later


def _open_loop(cls, loop: str, model, *args):
    """The C++ loop, or (auto) None with the reason in the model's settings when it cannot
    open this folder (a model type its runtime does not know, say)."""
    try:
        return cls(*args)
    except Exception as e:  # noqa: BLE001 - the runtime's own error types differ per package
        if loop == "cpp":
            raise RunnerError(f"{cls.name} cannot run {model.model_dir}: {e}") from None
        model.settings["cpp_loop_unavailable"] = f"{cls.name}: {type(e).__name__}: {e}"[:300]
        return None


def generation_loop(model, loop: str = "auto"):
    """The C++ loop for ``model`` (``_GenAiLoop``), or None for the runner's Python loop."""
    if loop not in LOOPS:
        raise RunnerError(f"unknown generation loop '{loop}'; allowed: {', '.join(LOOPS)}")
    if loop == "python":
        return None
    if getattr(model, "runtime", None) == "openvino":
        try:
            import openvino_genai  # noqa: F401
        except ImportError:
            if loop == "cpp":
                raise RunnerError("--loop cpp needs OpenVINO GenAI: pip install openvino-genai") from None
            return None
        return _open_loop(_GenAiLoop, loop, model, model.model_dir, model.device, model.config)
    if getattr(model, "runtime", None) == "onnxruntime":
        if not (model.model_dir / "genai_config.json").is_file():
            if loop == "cpp":
                raise RunnerError(f"{model.model_dir}: no genai_config.json (export with sieve-edge >= this "
                                  "version) for onnxruntime-genai's C++ loop")
            return None
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError:
            if loop == "cpp":
                raise RunnerError("--loop cpp needs onnxruntime-genai: pip install onnxruntime-genai") from None
            return None
        return _open_loop(_OrtGenAiLoop, loop, model, model.model_dir, model.threads)
    if loop == "cpp":
        raise RunnerError(f"no C++ generation loop for runtime '{getattr(model, 'runtime', '?')}'")
    return None


def _cache_capacity(target: dict) -> int | None:
    """The profile's `runtime_cache_capacity` (runner.py reads profiles unchecked: check it here)."""
    value = target.get("runtime_cache_capacity")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RunnerError(f"target profile: 'runtime_cache_capacity' = {value!r} is not valid; "
                          "allowed: an integer >= 0")
    if target.get("runtime") != "openvino" or target.get("device", "cpu") != "cpu":
        raise RunnerError("target profile: 'runtime_cache_capacity' is a setting of OpenVINO's CPU plugin; "
                          "allowed only with runtime = \"openvino\" and device = \"cpu\"")
    return value


def _maybe_json(path: Path) -> dict:
    return _read_json(path) if Path(path).is_file() else {}


def load_model(model_dir, runtime: str, threads: int, precision: str = "f32", device: str = "cpu",
               dynamic_quantization: bool = False, cache_capacity: int | None = None):
    """The exported model in ``runtime``. OpenVINO: ``precision`` is its inference precision
    hint; with f32 the KV cache is f32 too, and the CPU plugin's dynamic int8 quantization of
    activations (on by default for int8/int4 weights) is off unless ``dynamic_quantization``;
    ``cache_capacity`` bounds the CPU plugin's per-shape kernel cache (None: its default)."""
    model_dir = Path(model_dir)
    if runtime == "onnxruntime":
        if not (model_dir / "model.onnx").is_file():
            raise RunnerError(f"{model_dir}: no model.onnx for runtime onnxruntime (is this an OpenVINO export?)")
        return _loaded(model_dir / "model.onnx", runtime, lambda: _OrtModel(model_dir, threads, precision, device))
    if runtime == "openvino":
        if not (model_dir / "openvino_model.xml").is_file():
            raise RunnerError(f"{model_dir}: no openvino_model.xml for runtime openvino (is this an ONNX export?)")
        return _loaded(model_dir / "openvino_model.xml", runtime, lambda: _OvModel(
            model_dir, threads, precision, device, dynamic_quantization, cache_capacity))
    raise RunnerError(f"unknown runtime '{runtime}'; allowed: onnxruntime | openvino")


def _loaded(path: Path, runtime: str, make):
    """``make()``, with a runtime's own exception for a corrupt model file turned into a RunnerError."""
    try:
        return make()
    except RunnerError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime / openvino raise their own exception types
        detail = " ".join(str(e).split())
        raise RunnerError(f"{path}: {runtime} cannot load this model ({type(e).__name__}: "
                          f"{detail[:240]}{' ...' if len(detail) > 240 else ''}); the file is corrupt or "
                          "not an export of sieve-edge") from None


def device_available(runtime: str, device: str) -> bool:
    """Whether ``device`` exists here for ``runtime`` (cpu always does)."""
    if device == "cpu":
        return True
    try:
        if runtime == "openvino":
            import openvino as ov

            return any(d.split(".")[0] == device.upper() for d in ov.Core().available_devices)
        import onnxruntime as ort

        gpu = {"CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider", "OpenVINOExecutionProvider"}
        return device == "gpu" and bool(gpu & set(ort.get_available_providers()))
    except ImportError:
        return False


# ---------------------------------------------------------------- scoring


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def special_prefix(tok) -> list[int]:
    """The ids the tokenizer puts before a text when it adds special tokens (BOS), or []."""
    plain = tok.encode("x", add_special_tokens=False).ids
    full = tok.encode("x", add_special_tokens=True).ids
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i])
    return []


class Scorer:
    """Scores one example at a time with a loaded model, recording timings.

    ``max_prompt_tokens`` bounds every prompt (the task's truncation side says how);
    ``last_truncated`` tells whether the last prompt built was cut.
    """

    def __init__(self, model, tokenizer, task: Task, export: dict, eos_ids: set[int],
                 max_prompt_tokens: int | None = None, loop=None):
        self.model, self.tok, self.task, self.eos = model, tokenizer, task, eos_ids
        self.loop = loop            # a C++ generation loop (_GenAiLoop), or None: the Python loop
        self.first_ms: list[float] = []
        self.token_ms: list[float] = []
        self.bos = task.special_prefix if task.special_prefix is not None else special_prefix(tokenizer)
        self.max_prompt_tokens = max_prompt_tokens or task.max_prompt_tokens or DEFAULT_CONTEXT
        self.last_truncated = False
        head = export.get("task_head")
        self.head_index = None
        # a task-sized head returns k label logits: a decode step feeds the label token it picked
        self.head_token_ids = [int(t) for t in head["token_ids"]] if head else None
        if head and task.kind == "classification":
            labels = [str(x) for x in head["labels"]]
            # a task_head's labels are the task's data labels (or, tolerated, their answer texts)
            index = {}
            for key, answer in task.labels.items():
                for cand in (key, answer, answer.strip()):
                    if cand in labels:
                        index[key] = labels.index(cand)
                        break
            missing = [k for k in task.labels if k not in index]
            if missing:
                raise RunnerError(f"export task_head labels {labels} do not cover task labels {missing}")
            self.head_index = index
        elif head:
            raise RunnerError(f"a task-sized head (labels {head['labels']}) cannot run a {task.kind} task")

    def _ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def check_head(self, prompt: str, token_ids: list[int]) -> None:
        """A task-sized head scores each label by one logit: right only when every label's
        answer is exactly the one token the head was cut for (``token_ids``, in head order)."""
        if self.head_index is None or not token_ids:
            return
        answers = {k: self.answer_ids(prompt, a) for k, a in self.task.labels.items()}
        wrong = [f"{k} -> {ids}" for k, ids in answers.items() if ids != [int(token_ids[self.head_index[k]])]]
        if wrong:
            raise RunnerError(f"this export's task-sized LM head scores one token per label ({list(token_ids)}), "
                              f"but {len(wrong)} label answer(s) are other tokens ({'; '.join(wrong[:3])}): "
                              "export the model without --task-head for answers of several tokens")

    def _with_bos(self, ids: list[int]) -> list[int]:
        bos = self.bos
        return ids if bos and ids[:len(bos)] == bos else list(bos) + ids

    def _fields(self, x) -> dict[str, str]:
        if isinstance(x, dict):
            return x
        if len(self.task.fields) != 1:
            raise RunnerError(f"{self.task.path}: the prompt reads {len(self.task.fields)} fields "
                              f"({', '.join(self.task.fields)}); pass them all, not one text")
        return {self.task.fields[0]: x}

    def prompt(self, x, where: str = "") -> tuple[str, list[int]]:
        """(prompt text, prompt ids) for a row's fields (or the one field's text), within
        ``max_prompt_tokens``: cut per the task's truncation, or an error naming ``where``."""
        fields = self._fields(x)
        limit = self.max_prompt_tokens
        text = self.task.prompt(fields)
        ids = self._with_bos(self._ids(text))
        self.last_truncated = len(ids) > limit
        if not self.last_truncated:
            return text, ids
        if self.task.truncation == "error":
            raise RunnerError(f"{where or self.task.path}: the prompt is {len(ids)} tokens, over max_prompt_tokens "
                              f"= {limit} (truncation = \"error\" in {self.task.path})")

        def count(f):
            return len(self._with_bos(self._ids(self.task.prompt(f))))

        try:
            fields, _ = fit_fields(fields, count, limit, self.task.truncation)
        except ValueError as e:
            raise RunnerError(f"{self.task.path}: {e} (max_prompt_tokens)") from None
        text = self.task.prompt(fields)
        return text, self._with_bos(self._ids(text))

    def encode_prompt(self, x) -> list[int]:
        return self.prompt(x)[1]

    def answer_ids(self, prompt: str, answer: str) -> list[int]:
        plain, joint = self._ids(prompt), self._ids(prompt + answer)
        if len(joint) > len(plain) and joint[:len(plain)] == plain:
            return joint[len(plain):]
        return self._ids(answer)

    def _prefill(self, ids: list[int]) -> np.ndarray:
        self.model.reset()
        t0 = time.perf_counter()
        logits = self.model.forward(ids)
        self.first_ms.append((time.perf_counter() - t0) * 1e3)
        return logits

    def classify(self, x, where: str = "") -> tuple[str, dict]:
        """(predicted label, score per label). A label's score is the sum (or, with
        label_score = "mean", the mean) of its answer tokens' log-probabilities after the prompt.

        Shared-prefix scoring: the prompt runs once; every label's continuation then runs
        from its KV cache, each distinct answer prefix once (see ``continuation_rows``).
        """
        prompt, ids = self.prompt(x, where)
        if self.head_index is not None:  # logits (T, k): column k is label k's first-token logit
            last = self._prefill(ids)[-1]
            return max(self.head_index, key=lambda k: last[self.head_index[k]]), {
                k: float(last[i]) for k, i in self.head_index.items()}
        answers = {k: self.answer_ids(prompt, v) for k, v in self.task.labels.items()}
        empty = [k for k, a in answers.items() if not a]
        if empty:
            raise RunnerError(f"{self.task.path}: label answer(s) {empty} encode to no tokens")
        lp = log_softmax(self._prefill(ids)[-1])           # (V,) the first answer token
        scores = {k: float(lp[a[0]]) for k, a in answers.items()}
        rows = continuation_rows([a[:-1] for a in answers.values() if len(a) > 1])
        if rows:
            after = self._continuations(rows, ids)
            for k, a in answers.items():
                scores[k] += sum(float(after[tuple(a[:j])][a[j]]) for j in range(1, len(a)))
        if self.task.label_score == "mean":
            scores = {k: s / len(answers[k]) for k, s in scores.items()}
        return max(scores, key=scores.get), scores  # first label wins a tie, as in evaluate.py

    def _continuations(self, rows: list[list[int]], prompt_ids: list[int]) -> dict[tuple, np.ndarray]:
        """Log-probabilities (V,) after each distinct prefix of ``rows``, which continue the
        prompt held in the model's KV cache; rows go in groups of similar length (``row_groups``)."""
        out: dict[tuple, np.ndarray] = {}
        batched = hasattr(self.model, "forward_rows")
        for group in row_groups([len(r) for r in rows], len(prompt_ids)):
            chunk = [rows[i] for i in group]
            if batched:
                logits = self.model.forward_rows(chunk)                    # (R, A, V)
            else:  # a model without batched continuations: prompt + row, one row at a time
                logits = []
                for row in chunk:
                    self.model.reset()
                    logits.append(self.model.forward(prompt_ids + row)[len(prompt_ids):])
            for r, row in enumerate(chunk):
                for t in range(len(row)):
                    key = tuple(row[:t + 1])
                    if key not in out:
                        out[key] = log_softmax(logits[r][t])
        return out

    def generate(self, ids: list[int], max_new: int, stop_at_eos: bool = True) -> list[int]:
        if self.loop is not None:
            out, first, later = self.loop.generate(ids, max_new, self.eos, stop_at_eos)
            self.first_ms.append(first)
            self.token_ms.extend(later)
            return out
        logits = self._prefill(ids)
        out: list[int] = []
        while len(out) < max_new:
            nxt = int(np.argmax(logits[-1]))
            if self.head_token_ids is not None:
                # task-sized head: column -> its label token. Only decode timing of a
                # classification bundle gets here: the step costs what a second scoring
                # step would (k label logits), not a text generator's step (docs/EXPORT.md)
                nxt = self.head_token_ids[nxt]
            if stop_at_eos and nxt in self.eos:
                break
            out.append(nxt)
            if len(out) == max_new:
                break
            t0 = time.perf_counter()
            logits = self.model.forward([nxt])
            self.token_ms.append((time.perf_counter() - t0) * 1e3)
        return out

    def nll(self, x, where: str = "") -> tuple[float, int]:
        ids = self.prompt(x, where)[1]
        if len(ids) < 2:
            return 0.0, 0
        lp = log_softmax(self._prefill(ids)[:-1])
        return -float(sum(lp[j, t] for j, t in enumerate(ids[1:]))), len(ids) - 1


def row_groups(lengths: list[int], prefix: int, budget: int = BATCH_TOKENS) -> list[list[int]]:
    """Consecutive groups of ``lengths`` (longest first, as ``continuation_rows`` gives them),
    each one forward pass after a ``prefix``-token cache: a group closes when its next row is
    shorter than 3/4 of its first (so padding stays under a third) or when rows x (prefix +
    its first length) would pass ``budget`` (the cache copies and attention scale with both)."""
    groups: list[list[int]] = []
    for i, n in enumerate(lengths):
        if groups:
            group = groups[-1]
            width = lengths[group[0]]
            if 4 * n >= 3 * width and (len(group) + 1) * (prefix + width) <= budget:
                group.append(i)
                continue
        groups.append([i])
    return groups


def continuation_rows(prefixes: list[list[int]]) -> list[list[int]]:
    """The fewest token rows that hold every given prefix as a prefix of one of them.

    For answers a of two tokens or more, ``prefixes`` are a[:-1]: feeding a row after the
    prompt gives, at its position t, the distribution over the token after row[:t + 1].
    Duplicates and prefixes of longer rows are dropped; longest first, then by ids.
    """
    rows: list[list[int]] = []
    for p in sorted({tuple(p) for p in prefixes if p}, key=lambda p: (-len(p), p)):
        if not any(r[:len(p)] == list(p) for r in rows):
            rows.append(list(p))
    return rows


def normalize_prediction(text: str) -> str:
    """First non-empty line, stripped and casefolded (as sieve_edge.evaluate)."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip().casefold()
    return ""


def macro_f1(gold: list[str], pred: list[str]) -> float:
    f1s = []
    for c in sorted(set(gold) | set(pred)):
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else 0.0


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "mean": None, "n": 0}
    a = np.asarray(xs, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "mean": float(a.mean()), "n": int(a.size)}


def _eos_ids(model_dir: Path, tok) -> set[int]:
    """Stop ids as evaluate.py takes them: generation_config's, else config's, else the tokenizer's."""
    for name in ("generation_config.json", "config.json"):
        eos = _maybe_json(model_dir / name).get("eos_token_id")
        if eos is not None:
            return set(eos) if isinstance(eos, list) else {int(eos)}
    eos_tok = _maybe_json(model_dir / "tokenizer_config.json").get("eos_token")
    if isinstance(eos_tok, dict):
        eos_tok = eos_tok.get("content")
    if isinstance(eos_tok, str) and tok.token_to_id(eos_tok) is not None:
        return {tok.token_to_id(eos_tok)}
    return set()


def answer_reserve(kind: str, answer_lengths: list[int], max_new_tokens: int) -> int:
    """Tokens that follow a prompt: the longest answer, or the generation length."""
    if kind == "generation":
        return max_new_tokens
    return max(answer_lengths, default=0) if kind == "classification" else 0


def load_rows(task: Task, path: Path, limit: int | None) -> tuple[list[tuple[int, dict]], dict]:
    """(line, row) pairs a ``limit`` keeps per the task's [data] sample, and a record of the draw."""
    lines = read_jsonl_lines(path)
    if not lines:
        raise RunnerError(f"{path}: no examples")
    keep = select_rows([task.label(row) for _, row in lines], limit, task.sample, task.seed)
    sample = {"mode": task.sample, "seed": task.seed, "limit": limit, "rows": len(keep), "of": len(lines)}
    return [lines[i] for i in keep], sample


def _check_gold(task: Task, path: Path, rows: list[tuple[int, dict]]) -> list:
    gold = [task.label(r) for _, r in rows]
    if task.kind == "classification":
        for (line, _), g in zip(rows, gold):
            if g not in task.labels:
                raise RunnerError(f"{path}:{line}: label {g!r} is not in the task's [labels] "
                                  f"({', '.join(task.labels)})")
    if task.kind == "generation" and None in gold:
        line = rows[gold.index(None)][0]
        raise RunnerError(f"{path}:{line}: generation needs a '{task.label_field}' answer on every row")
    return gold


def _metric(task: Task, rows, gold, preds) -> float:
    if task.kind == "classification":
        if task.metric == "accuracy":
            return float(np.mean([p == g for p, g in zip(preds, gold)]))
        return macro_f1(gold, preds)
    if task.kind == "generation":
        return float(np.mean([normalize_prediction(p) == task.answer(r).strip().casefold()
                              for p, (_, r) in zip(preds, rows)]))
    tokens = sum(t for _, t in preds)
    if tokens == 0:
        raise RunnerError(f"{task.test_path}: no tokens to score for perplexity")
    return math.exp(sum(n for n, _ in preds) / tokens)


def run_task(model, model_dir: Path, task: Task, export: dict, limit: int | None = None,
             warmup: int = 2, decode_tokens: int = 8, decode_examples: int = 3, loop=None,
             per_example: bool = False, progress=None) -> dict:
    """Score ``task``'s test split (and its extra tests) with a loaded model and time the test
    split. Returns the measurement.

    ``loop``: a C++ generation loop for generation tasks (``generation_loop``), else None.
    per_example: add ``per_example``, one entry per scored test example (see ``_example_entry``).
    progress: called as ``progress(done, total)`` after each timed example.
    """
    from tokenizers import Tokenizer

    if not (model_dir / "tokenizer.json").is_file():
        raise RunnerError(f"{model_dir}: no tokenizer.json (the runner needs a fast tokenizer file)")
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    answer_lengths = [len(tok.encode(a, add_special_tokens=False).ids) for a in task.labels.values()]
    max_prompt = task.max_prompt_tokens or default_prompt_tokens(
        context_window(_maybe_json(model_dir / "config.json")),
        answer_reserve(task.kind, answer_lengths, task.max_new_tokens))
    scorer = Scorer(model, tok, task, export, _eos_ids(model_dir, tok), max_prompt_tokens=max_prompt,
                    loop=loop if task.kind == "generation" else None)

    last: dict = {}  # label scores behind the latest classification, for per_example

    def one(fields: dict, where: str):
        if task.kind == "classification":
            pred, last["scores"] = scorer.classify(fields, where)
            return pred
        if task.kind == "generation":
            out = scorer.generate(scorer.prompt(fields, where)[1], task.max_new_tokens)
            return tok.decode(out, skip_special_tokens=True)
        return scorer.nll(fields, where)

    def fields_of(path: Path, rows) -> list[tuple[dict, str]]:
        return [(task.row_fields(row, f"{path}:{line}"), f"{path}:{line}") for line, row in rows]

    rows, sample = load_rows(task, task.test_path, limit)
    gold = _check_gold(task, task.test_path, rows)
    inputs = fields_of(task.test_path, rows)
    if scorer.head_index is not None:
        scorer.check_head(scorer.prompt(*inputs[0])[0], export["task_head"].get("token_ids") or [])

    for fields, where in inputs[:warmup]:  # warm-up: first-call allocations and kernel selection, untimed
        one(fields, where)
    scorer.first_ms.clear()
    scorer.token_ms.clear()

    example_ms, preds, truncated, entries = [], [], 0, []
    for i, (fields, where) in enumerate(inputs):
        t0 = time.perf_counter()
        preds.append(one(fields, where))
        example_ms.append((time.perf_counter() - t0) * 1e3)
        truncated += scorer.last_truncated
        if per_example:
            entries.append(_example_entry(i, task.kind, preds[-1], last.get("scores")))
        if progress is not None:
            progress(i + 1, len(inputs))
    value = _metric(task, rows, gold, preds)

    def shown_text(fields: dict) -> str:
        return " | ".join(fields.values())[:80]

    if task.kind == "classification":
        shown = [{"text": shown_text(f), "label": g, "pred": p} for (f, _), g, p in zip(inputs[:5], gold, preds)]
    elif task.kind == "generation":
        shown = [{"text": shown_text(f), "answer": task.answer(r), "output": p}
                 for (f, _), (_, r), p in zip(inputs[:5], rows, preds)]
    else:
        shown = []

    if task.kind != "generation" and decode_tokens > 0:
        # Decode-step latency for tasks that do not generate: a few forced greedy steps.
        first = list(scorer.first_ms)
        for fields, where in inputs[:decode_examples]:
            scorer.generate(scorer.prompt(fields, where)[1], decode_tokens + 1, stop_at_eos=False)
        scorer.first_ms[:] = first

    extra = {}
    timings = (list(scorer.first_ms), list(scorer.token_ms))
    for name, path in task.extra_tests.items():  # scored like the test split, not timed
        x_rows, x_sample = load_rows(task, path, limit)
        x_gold = _check_gold(task, path, x_rows)
        x_preds, x_truncated = [], 0
        for fields, where in fields_of(path, x_rows):
            x_preds.append(one(fields, where))
            x_truncated += scorer.last_truncated
        extra[name] = {"metric": task.metric, "value": _metric(task, x_rows, x_gold, x_preds),
                       "n_examples": len(x_rows), "truncated": x_truncated, "sample": x_sample,
                       "data": str(path)}
    scorer.first_ms[:], scorer.token_ms[:] = timings
    m = {
        "generation_loop": scorer.loop.name if scorer.loop is not None else "python",
        "task": task.name, "kind": task.kind, "metric": task.metric, "value": value,
        "higher_is_better": METRICS[task.metric], "n_examples": len(rows), "test_data": str(task.test_path),
        "sample": sample, "max_prompt_tokens": max_prompt, "truncation": task.truncation, "truncated": truncated,
        "label_score": task.label_score if task.kind == "classification" else None,
        "latency": {"first_token_ms": _stats(scorer.first_ms), "token_ms": _stats(scorer.token_ms),
                    "example_ms": _stats(example_ms), "warmup_examples": min(warmup, len(rows))},
        "examples": shown, "extra_tests": extra,
    }
    if per_example:
        m["per_example"] = entries
        m["scores_are"] = "label logit (task head)" if scorer.head_index is not None else "label log-prob"
    return m


def _example_entry(index: int, kind: str, pred, scores: dict | None) -> dict:
    """One example of ``per_example``: classification {index, pred, scores: label -> score};
    generation {index, pred (normalized first line), output}; perplexity {index, nll, tokens}."""
    if kind == "classification":
        return {"index": index, "pred": pred, "scores": scores}
    if kind == "generation":
        return {"index": index, "pred": normalize_prediction(pred), "output": pred}
    return {"index": index, "nll": pred[0], "tokens": pred[1]}


# ---------------------------------------------------------------- gates


def _gate(name, key, measured, limit, unit, status, detail):
    return {"gate": name, "budget_key": key, "measured": measured, "limit": limit, "unit": unit,
            "status": status, "detail": detail}


def evaluate_gates(measurement: dict, budget: dict, reference: dict | None) -> list[dict]:
    """One gate per budget key present. Status: pass | fail | not run (never pass untested)."""
    gates = []
    limit = budget.get("max_metric_drop")
    if limit is not None:
        metric, value = measurement["metric"], measurement["value"]
        ref = (reference or {}).get("value")
        if ref is None:
            gates.append(_gate("metric drop", "max_metric_drop", None, limit, metric, "not run",
                               "no dense reference in the bundle (reference.json has no value)"))
        elif (reference or {}).get("metric", metric) != metric:
            gates.append(_gate("metric drop", "max_metric_drop", None, limit, metric, "not run",
                               f"the reference measured '{reference['metric']}', the runner '{metric}'"))
        elif reference.get("n") and measurement.get("n_examples") and reference["n"] != measurement["n_examples"]:
            gates.append(_gate("metric drop", "max_metric_drop", None, limit, metric, "not run",
                               f"scored {measurement['n_examples']} test examples, the reference "
                               f"{reference['n']} (--limit?)"))
        elif reference.get("sample") and measurement.get("sample") \
                and _draw(reference["sample"]) != _draw(measurement["sample"]):
            gates.append(_gate("metric drop", "max_metric_drop", None, limit, metric, "not run",
                               f"the reference scored other test rows ({_draw(reference['sample'])}) than "
                               f"the runner ({_draw(measurement['sample'])}): [data] sample or seed changed"))
        else:
            drop = (ref - value) if METRICS.get(metric, True) else (value - ref)
            ok = drop <= limit + 1e-9
            detail = f"{metric} {value:.4f} vs dense {ref:.4f}: drop {drop:+.4f}"
            detail += f" within {limit:g}" if ok else f" exceeds {limit:g} by {drop - limit:.4f}"
            gates.append(_gate("metric drop", "max_metric_drop", drop, limit, metric, "pass" if ok else "fail", detail))
    lat = measurement.get("latency", {})
    for name, key, value, unit, what in (
        ("first token", "max_first_token_ms", lat.get("first_token_ms", {}).get("p90"), "ms", "p90 first token"),
        ("per token", "max_token_ms", lat.get("token_ms", {}).get("p90"), "ms", "p90 per token"),
        ("per example", "max_example_ms", lat.get("example_ms", {}).get("p90"), "ms", "p90 per example"),
        ("peak memory", "max_peak_memory_mb", measurement.get("peak_rss_mb"), "MB", "peak RSS"),
        ("size on disk", "max_size_mb", measurement.get("size_mb"), "MB", "model size"),
    ):
        limit = budget.get(key)
        if limit is None:
            continue
        if value is None:
            gates.append(_gate(name, key, None, limit, unit, "not run", f"{what} was not measured"))
            continue
        ok = value <= limit
        detail = f"{what} {value:.1f} {unit}" + (f" within {limit:g} {unit}" if ok else
                                                  f" exceeds {limit:g} {unit} by {value - limit:.1f} {unit} "
                                                  f"(+{100 * (value - limit) / limit:.0f}%)")
        gates.append(_gate(name, key, value, limit, unit, "pass" if ok else "fail", detail))
    return gates


def _draw(sample: dict) -> tuple | None:
    """Which rows a score is on: None for every row of its file, else the draw (mode, seed)."""
    if sample.get("rows") == sample.get("of"):
        return None
    return sample.get("mode"), sample.get("seed") if sample.get("mode") != "head" else 0


def overall_status(gates: list[dict]) -> str:
    statuses = {g["status"] for g in gates}
    if "fail" in statuses:
        return "fail"
    if "not run" in statuses or not gates:
        return "not run"
    return "pass"


def format_table(measurement: dict, gates: list[dict]) -> str:
    lat = measurement["latency"]

    def ms(s):
        return "-" if s.get("p50") is None else f"{s['p50']:.1f} / {s['p90']:.1f}"

    rows = [
        ("runtime", f"{measurement['runtime']} {measurement['runtime_version']} on {measurement['device']}, "
                    f"{measurement['threads']} threads, precision {measurement['inference_precision']}"),
        ("task", f"{measurement['task']} ({measurement['kind']}), {measurement['n_examples']} examples"),
        (measurement["metric"], f"{measurement['value']:.4f}"),
    ]
    if measurement.get("truncated"):
        rows.append(("prompts truncated", f"{measurement['truncated']} of {measurement['n_examples']} "
                                          f"(max_prompt_tokens {measurement.get('max_prompt_tokens')})"))
    for name, x in (measurement.get("extra_tests") or {}).items():
        rows.append((f"extra test {name}", f"{x['metric']} {x['value']:.4f} on {x['n_examples']} examples"))
    rows += [
        ("first token ms p50/p90", ms(lat["first_token_ms"])),
        ("per token ms p50/p90", ms(lat["token_ms"]) + (f"  ({measurement['generation_loop']} loop)"
                                                         if measurement.get("generation_loop") else "")),
        ("per example ms p50/p90", ms(lat["example_ms"])),
        ("peak RSS MB", f"{measurement['peak_rss_mb']:.1f}"),
        ("model size MB", f"{measurement['size_mb']:.1f}"),
    ]
    rows += [(f"gate {g['gate']}", f"{g['status'].upper()}: {g['detail']}") for g in gates]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ---------------------------------------------------------------- bundle


def run_bundle(bundle, limit: int | None = None, task_path=None, frame_path=None, target_path=None,
               threads: int | None = None, precision: str | None = None, warmup: int = 2,
               decode_tokens: int = 8, loop: str = "auto", per_example: bool = False, progress=None) -> dict:
    """Load a bundle's model with its target's settings and run its task check.

    ``loop``: the generation loop of a generation task (``LOOPS``; auto: OpenVINO GenAI's
    C++ loop for an OpenVINO bundle when it is installed, else the Python loop).
    ``per_example``, ``progress``: see ``run_task``."""
    bundle = Path(bundle)
    manifest = _read_json(bundle / "bundle.json")
    model_dir = bundle / manifest.get("model_dir", "model")
    target = _read_toml(Path(target_path) if target_path else bundle / manifest["target"],
                        None if target_path else manifest.get("target_profile"))
    if task_path:
        frame = _read_json(Path(frame_path)) if frame_path else None
        task = Task(_read_toml(Path(task_path)), Path(task_path), frame=frame)
    else:
        frame = _read_json(Path(frame_path) if frame_path else bundle / manifest["prompt_frame"])
        task = Task(_read_toml(bundle / manifest["task"], manifest.get("task_spec")), bundle / manifest["task"],
                    test_path=bundle / manifest["test_data"], frame=frame)
    export = _maybe_json(model_dir / "export.json")
    runtime = target["runtime"]
    threads = int(threads or target.get("threads", 1))
    precision = precision or target.get("inference_precision", "f32")
    device = target.get("device", "cpu")
    t0 = time.perf_counter()
    model = load_model(model_dir, runtime, threads, precision, device,
                       dynamic_quantization=bool(target.get("dynamic_quantization", False)),
                       cache_capacity=_cache_capacity(target))
    cpp = generation_loop(model, loop) if task.kind == "generation" else None
    if cpp is None:
        model.open()  # compile / open now, so that load_s includes it (a C++ loop opens its own copy)
    load_s = time.perf_counter() - t0
    m = run_task(model, model_dir, task, export, limit=limit, warmup=warmup, decode_tokens=decode_tokens, loop=cpp,
                 per_example=per_example, progress=progress)
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    m.update({
        "runner_version": RUNNER_VERSION, "bundle": str(bundle.resolve()), "target": target.get("name"),
        "runtime": runtime, "runtime_version": model.version, "device": device, "threads": threads,
        "inference_precision": model.settings.get("inference_precision", precision),
        "requested_precision": precision, "runtime_settings": model.settings,
        "model_format": export.get("format"), "weights": export.get("weights"),
        "load_s": load_s, "peak_rss_mb": peak_rss_mb(), "size_mb": dir_size(model_dir) / MB,
        "host": {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
                 "processor": _cpu_name(), "cpu_count": os.cpu_count(), "cpu_affinity": affinity},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pid": os.getpid(),
    })
    return m


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _error_log(exc: BaseException) -> str:
    import tempfile
    import traceback

    path = Path(tempfile.gettempdir()) / f"sieve-edge-runner-{os.getpid()}-{int(time.time())}.log"
    try:
        path.write_text(f"argv: {sys.argv!r}\n\n" + "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__)), encoding="utf-8")
    except OSError as e:
        return f"no log written: {e}"
    return f"details in {path}"


def _print_progress(done: int, total: int) -> None:
    if done == total or done % max(1, total // 20) == 0:  # about every 5%
        print(f"progress: {done}/{total}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(prog="runner.py" if (here / "bundle.json").is_file() else "python -m sieve_edge.runtime",
                                description="Run a sieve-edge bundle's task check with its target's settings.")
    p.add_argument("bundle", nargs="?", help="bundle folder (default: the folder holding this runner)")
    p.add_argument("--limit", type=int, help="score N test examples (which ones: the task's [data] sample)")
    p.add_argument("--json", dest="json_out", help="write the measurement and gates as JSON to this file")
    p.add_argument("--task", help="task TOML to use instead of the bundle's")
    p.add_argument("--prompt-frame", help="prompt.json to use (needed with --task when it uses a chat template)")
    p.add_argument("--target", help="target profile TOML to use instead of the bundle's")
    p.add_argument("--threads", type=int, help="override the profile's threads")
    p.add_argument("--precision", choices=("f32", "bf16", "f16"), help="override the profile's precision hint")
    p.add_argument("--cpu-affinity", help="pin this process to these CPUs, e.g. 0,1, or 'none' "
                   "(default: the profile's cpu_affinity)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up examples (default 2)")
    p.add_argument("--decode-tokens", type=int, default=8,
                   help="decode steps timed per example for tasks that do not generate (default 8)")
    p.add_argument("--loop", choices=LOOPS, default="auto",
                   help="generation loop for generation tasks: cpp (OpenVINO GenAI's LLMPipeline), python "
                        "(this runner's), auto (cpp when installed; default)")
    p.add_argument("--no-gates", action="store_true", help="measure only; exit 0 whatever the budgets say")
    p.add_argument("--per-example", action="store_true",
                   help="list every example's prediction (and label scores) in the --json output")
    p.add_argument("--progress", action="store_true", help="print 'progress: DONE/TOTAL' lines on stderr")
    args = p.parse_args(argv)
    bundle = Path(args.bundle) if args.bundle else here
    try:
        if not (bundle / "bundle.json").is_file():
            raise RunnerError(f"{bundle}: not a sieve-edge bundle (no bundle.json)")
        manifest = _read_json(bundle / "bundle.json")
        verify_bundle(bundle, manifest)  # first: nothing of a modified bundle is loaded
        target = _read_toml(Path(args.target) if args.target else bundle / manifest["target"],
                            None if args.target else manifest.get("target_profile"))
        if args.cpu_affinity == "none":
            cpus = set()
        elif args.cpu_affinity:
            cpus = {int(c) for c in args.cpu_affinity.split(",") if c.strip()}
        else:
            cpus = set(target.get("cpu_affinity") or ())
        if cpus:
            # Before any runtime is imported, so its thread pool is created inside the mask.
            if not hasattr(os, "sched_setaffinity"):
                raise RunnerError("cpu affinity needs os.sched_setaffinity (Linux)")
            try:
                os.sched_setaffinity(0, cpus)
            except OSError as e:
                raise RunnerError(f"cannot pin to CPUs {sorted(cpus)}: {e} (pass --cpu-affinity none)") from None
        m = run_bundle(bundle, args.limit, args.task, args.prompt_frame, args.target, args.threads,
                       args.precision, args.warmup, args.decode_tokens, args.loop, args.per_example,
                       _print_progress if args.progress else None)
        ref_path = bundle / manifest.get("reference", "reference.json")
        reference = _read_json(ref_path) if ref_path.is_file() else None
        if args.task:
            reference = None  # the bundle's reference was measured on the bundle's task
        gates = evaluate_gates(m, target.get("budget", {}), reference)
        m["gates"], m["status"] = gates, overall_status(gates)
    except RunnerError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - one line on the terminal, the traceback in a file
        print(f"internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]} "
              f"({_error_log(e)})", file=sys.stderr)
        return EXIT_ERROR
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(m, indent=2), encoding="utf-8")
    print(format_table(m, gates))
    print(f"status: {m['status']}")
    if args.no_gates or m["status"] == "pass":
        return EXIT_OK
    return EXIT_GATE


if __name__ == "__main__":
    sys.exit(main())
