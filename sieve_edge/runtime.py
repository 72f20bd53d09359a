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
(``prompt.json``: the text before and after ``{text}``, computed at bundle time with the
tokenizer's real chat template, and verified on test examples), so here a prompt is
``prefix + text + suffix``. Without a frame, a task that does not use a chat template is
framed from its ``prompt`` string alone; one that does is an error.

Scoring. Classification: log-likelihood of each label's answer tokens after the prompt (sum
over the answer's tokens); when every answer is one token, one forward pass and the last
position's logits; a ``task_head`` export gives the label logits directly. Generation:
greedy decoding with the KV cache, exact match of the first non-empty line (stripped,
case-insensitive). Perplexity: exp of the mean token negative log-likelihood. Token ids
follow sieve_edge.tasks (special prefix once, answer ids split from ids(prompt + answer)),
and tests hold the scores to sieve_edge.evaluate's.

Timing. ``first_token_ms``: the prompt forward pass (prefill) of each example;
``token_ms``: one greedy decode step with the KV cache (for classification and perplexity
tasks a few decode steps are run on the first examples just to measure it);
``example_ms``: one example end to end, tokenization included. ``warmup`` examples run
first, untimed. Percentiles p50/p90 over the timed samples. Peak memory is the process's
peak resident set size; size is the model folder on disk. MB = 2**20 bytes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

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
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunnerError(f"missing file: {path}") from None
    except json.JSONDecodeError as e:
        raise RunnerError(f"{path}: not valid JSON: {e}") from None


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
    except tomllib.TOMLDecodeError as e:
        raise RunnerError(f"{path}: not valid TOML: {e}") from None


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RunnerError(f"{path}:{n}: not valid JSON: {e}") from None
                if limit is not None and len(rows) >= limit:
                    break
    except FileNotFoundError:
        raise RunnerError(f"missing test data: {path}") from None
    return rows


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


# ---------------------------------------------------------------- task


class Task:
    """The minimum of a task spec the runner needs, read from its TOML (no sieve_edge.tasks).

    Token sequences follow sieve_edge.tasks exactly: prompt ids are the tokenizer's special
    prefix (BOS, if any; once) + ids(prompt); an answer's ids are what ids(prompt + answer)
    adds after ids(prompt), or the answer tokenized alone when the two merge at the boundary.
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
        data = spec.get("data") or {}
        self.text_field = data.get("text_field", "text")
        self.label_field = data.get("label_field", "label")
        if test_path is None:
            if "test" not in data:
                raise RunnerError(f"{path}: no [data] test file")
            test_path = self.path.parent / data["test"]
        self.test_path = Path(test_path)
        if frame is None:
            if spec.get("chat_template"):
                raise RunnerError(f"{path}: the task uses a chat template; the runner needs the bundle's "
                                  "prompt.json (rendered at bundle time) to frame its prompts")
            prompt = spec.get("prompt", "{text}")
            if prompt.count("{text}") != 1:
                raise RunnerError(f"{path}: 'prompt' must contain {{text}} exactly once")
            if spec.get("system"):
                prompt = spec["system"] + "\n\n" + prompt
            prefix, suffix = prompt.split("{text}")
            frame = {"prefix": prefix, "suffix": suffix, "special_prefix": None}
        self.prefix, self.suffix = frame["prefix"], frame["suffix"]
        # None: derive from the tokenizer (what it adds before a text with add_special_tokens)
        self.special_prefix = frame.get("special_prefix")

    def prompt(self, text: str) -> str:
        return self.prefix + text + self.suffix

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
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.version = ort.__version__
        self.settings = {"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                         "inference_precision": "f32", "provider": "CPUExecutionProvider"}
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
        self.reset()

    def reset(self) -> None:
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


class _OvModel:
    """optimum-intel's stateful OpenVINO IR (KV cache held in the infer request's state)."""

    runtime = "openvino"

    def __init__(self, model_dir: Path, threads: int, precision: str, device: str,
                 dynamic_quantization: bool = False, cache_capacity: int | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise RunnerError("openvino is not installed: pip install openvino") from None
        core = ov.Core()
        model = core.read_model(str(model_dir / "openvino_model.xml"))
        names = {i.get_any_name() for i in model.inputs}
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
        compiled = core.compile_model(model, device.upper(), config)
        self.request = compiled.create_infer_request()
        self.version = ov.get_version()
        self.settings = {"INFERENCE_NUM_THREADS": threads}
        for key in ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION", "DYNAMIC_QUANTIZATION_GROUP_SIZE",
                    "NUM_STREAMS", "PERFORMANCE_HINT"):
            try:  # read back what the plugin actually uses: the hint is stated, not assumed
                value = compiled.get_property(key)
                self.settings[key] = value.to_string() if hasattr(value, "to_string") else str(value)
            except Exception:  # noqa: BLE001 - a property a plugin does not expose
                pass
        # an internal plugin property: known to compile_model (which rejects unknown keys), not readable back
        self.settings["CPU_RUNTIME_CACHE_CAPACITY"] = "plugin default" if cache_capacity is None else str(cache_capacity)
        self.settings["inference_precision"] = self.settings.get("INFERENCE_PRECISION_HINT", precision)
        self._beam = np.zeros(1, dtype=np.int32)
        self.reset()

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
        return _OrtModel(model_dir, threads, precision, device)
    if runtime == "openvino":
        if not (model_dir / "openvino_model.xml").is_file():
            raise RunnerError(f"{model_dir}: no openvino_model.xml for runtime openvino (is this an ONNX export?)")
        return _OvModel(model_dir, threads, precision, device, dynamic_quantization, cache_capacity)
    raise RunnerError(f"unknown runtime '{runtime}'; allowed: onnxruntime | openvino")


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
    """Scores one example at a time with a loaded model, recording timings."""

    def __init__(self, model, tokenizer, task: Task, export: dict, eos_ids: set[int]):
        self.model, self.tok, self.task, self.eos = model, tokenizer, task, eos_ids
        self.first_ms: list[float] = []
        self.token_ms: list[float] = []
        self.bos = task.special_prefix if task.special_prefix is not None else special_prefix(tokenizer)
        head = export.get("task_head")
        self.head_index = None
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

    def encode_prompt(self, text: str) -> list[int]:
        ids = self._ids(self.task.prompt(text))
        bos = self.bos
        return ids if bos and ids[:len(bos)] == bos else list(bos) + ids

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

    def classify(self, text: str) -> tuple[str, dict]:
        ids = self.encode_prompt(text)
        if self.head_index is not None:  # logits (T, k): column k is label k's first-token logit
            last = self._prefill(ids)[-1]
            return max(self.head_index, key=lambda k: last[self.head_index[k]]), {
                k: float(last[i]) for k, i in self.head_index.items()}
        prompt = self.task.prompt(text)
        answers = {k: self.answer_ids(prompt, v) for k, v in self.task.labels.items()}
        empty = [k for k, a in answers.items() if not a]
        if empty:
            raise RunnerError(f"{self.task.path}: label answer(s) {empty} encode to no tokens")
        if all(len(a) == 1 for a in answers.values()):  # fast path: one forward, last position
            lp = log_softmax(self._prefill(ids)[-1])
            scores = {k: float(lp[a[0]]) for k, a in answers.items()}
        else:  # sum of the answer tokens' log-probs, one sequence per label
            scores = {}
            for n, (k, ans) in enumerate(answers.items()):
                if n == 0:
                    logits = self._prefill(ids + ans)
                else:
                    self.model.reset()
                    logits = self.model.forward(ids + ans)
                lp = log_softmax(logits[len(ids) - 1:-1])  # (len(ans), V): positions predicting ans
                scores[k] = float(sum(lp[j, t] for j, t in enumerate(ans)))
        return max(scores, key=scores.get), scores  # first label wins a tie, as in evaluate.py

    def generate(self, ids: list[int], max_new: int, stop_at_eos: bool = True) -> list[int]:
        logits = self._prefill(ids)
        out: list[int] = []
        while len(out) < max_new:
            nxt = int(np.argmax(logits[-1]))
            if stop_at_eos and nxt in self.eos:
                break
            out.append(nxt)
            if len(out) == max_new:
                break
            t0 = time.perf_counter()
            logits = self.model.forward([nxt])
            self.token_ms.append((time.perf_counter() - t0) * 1e3)
        return out

    def nll(self, text: str, max_length: int = 1024) -> tuple[float, int]:
        ids = self.encode_prompt(text)
        ids = ids[len(ids) - max_length:] if len(ids) > max_length else ids  # keep the end, as evaluate.py
        if len(ids) < 2:
            return 0.0, 0
        lp = log_softmax(self._prefill(ids)[:-1])
        return -float(sum(lp[j, t] for j, t in enumerate(ids[1:]))), len(ids) - 1


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


def run_task(model, model_dir: Path, task: Task, export: dict, limit: int | None = None,
             warmup: int = 2, decode_tokens: int = 8, decode_examples: int = 3, per_example: bool = False,
             progress=None) -> dict:
    """Score ``task``'s test split with a loaded model and time it. Returns the measurement.

    per_example: add ``per_example``, one entry per scored example (see ``_example_entry``).
    progress: called as ``progress(done, total)`` after each timed example.
    """
    from tokenizers import Tokenizer

    if not (model_dir / "tokenizer.json").is_file():
        raise RunnerError(f"{model_dir}: no tokenizer.json (the runner needs a fast tokenizer file)")
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    rows = read_jsonl(task.test_path, limit)
    if not rows:
        raise RunnerError(f"{task.test_path}: no examples")
    scorer = Scorer(model, tok, task, export, _eos_ids(model_dir, tok))

    def text(row: dict) -> str:
        value = row.get(task.text_field)
        if not isinstance(value, str):
            raise RunnerError(f"{task.test_path}: a row has no string field '{task.text_field}'")
        return value

    last: dict = {}  # label scores behind the latest classification, for per_example

    def one(row: dict):
        if task.kind == "classification":
            pred, last["scores"] = scorer.classify(text(row))
            return pred
        if task.kind == "generation":
            out = scorer.generate(scorer.encode_prompt(text(row)), task.max_new_tokens)
            return tok.decode(out, skip_special_tokens=True)
        return scorer.nll(text(row))

    gold = [task.label(r) for r in rows]
    if task.kind == "classification":
        unknown = sorted({str(g) for g in gold} - set(task.labels))
        if unknown:
            raise RunnerError(f"{task.test_path}: labels {unknown} are not in the task's [labels]")
    if task.kind == "generation" and None in gold:
        raise RunnerError(f"{task.test_path}: generation needs a '{task.label_field}' answer on every row")

    for row in rows[:warmup]:  # warm-up: first-call allocations and kernel selection, untimed
        one(row)
    scorer.first_ms.clear()
    scorer.token_ms.clear()

    example_ms, preds, entries = [], [], []
    for i, row in enumerate(rows):
        t0 = time.perf_counter()
        preds.append(one(row))
        example_ms.append((time.perf_counter() - t0) * 1e3)
        if per_example:
            entries.append(_example_entry(i, task.kind, preds[-1], last.get("scores")))
        if progress is not None:
            progress(i + 1, len(rows))

    if task.kind == "classification":
        value = float(np.mean([p == g for p, g in zip(preds, gold)])) if task.metric == "accuracy" \
            else macro_f1(gold, preds)
        shown = [{"text": text(r)[:80], "label": g, "pred": p} for r, g, p in zip(rows[:5], gold, preds)]
    elif task.kind == "generation":
        hits = [normalize_prediction(p) == task.answer(r).strip().casefold() for p, r in zip(preds, rows)]
        value = float(np.mean(hits))
        shown = [{"text": text(r)[:80], "answer": task.answer(r), "output": p} for r, p in zip(rows[:5], preds)]
    else:
        total = sum(n for n, _ in preds)
        tokens = sum(t for _, t in preds)
        if tokens == 0:
            raise RunnerError(f"{task.test_path}: no tokens to score for perplexity")
        value = math.exp(total / tokens)
        shown = []

    if task.kind != "generation" and decode_tokens > 0:
        # Decode-step latency for tasks that do not generate: a few forced greedy steps.
        first = list(scorer.first_ms)
        for row in rows[:decode_examples]:
            scorer.generate(scorer.encode_prompt(text(row)), decode_tokens + 1, stop_at_eos=False)
        scorer.first_ms[:] = first
    m = {
        "task": task.name, "kind": task.kind, "metric": task.metric, "value": value,
        "higher_is_better": METRICS[task.metric], "n_examples": len(rows), "test_data": str(task.test_path),
        "latency": {"first_token_ms": _stats(scorer.first_ms), "token_ms": _stats(scorer.token_ms),
                    "example_ms": _stats(example_ms), "warmup_examples": min(warmup, len(rows))},
        "examples": shown,
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
        ("first token ms p50/p90", ms(lat["first_token_ms"])),
        ("per token ms p50/p90", ms(lat["token_ms"])),
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
               decode_tokens: int = 8, per_example: bool = False, progress=None) -> dict:
    """Load a bundle's model with its target's settings and run its task check
    (``per_example``, ``progress``: see ``run_task``)."""
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
    load_s = time.perf_counter() - t0
    m = run_task(model, model_dir, task, export, limit=limit, warmup=warmup, decode_tokens=decode_tokens,
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


def _print_progress(done: int, total: int) -> None:
    if done == total or done % max(1, total // 20) == 0:  # about every 5%
        print(f"progress: {done}/{total}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(prog="runner.py" if (here / "bundle.json").is_file() else "python -m sieve_edge.runtime",
                                description="Run a sieve-edge bundle's task check with its target's settings.")
    p.add_argument("bundle", nargs="?", help="bundle folder (default: the folder holding this runner)")
    p.add_argument("--limit", type=int, help="score only the first N test examples")
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
                       args.precision, args.warmup, args.decode_tokens, args.per_example,
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
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(m, indent=2), encoding="utf-8")
    print(format_table(m, gates))
    print(f"status: {m['status']}")
    if args.no_gates or m["status"] == "pass":
        return EXIT_OK
    return EXIT_GATE


if __name__ == "__main__":
    sys.exit(main())
