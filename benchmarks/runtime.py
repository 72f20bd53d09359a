"""Runtime benchmark: dense and pruned SmolLM2 on every runtime and generation loop, next to
llama.cpp, on a generation workload and a classification workload, with the issue's goals.

Not a test: it measures speed on this machine. Every (variant, workload) runs in its own
child process (peak RSS is that run's); each number is the median of --repeats runs; all
rows come from one invocation. Exports are made (with their fidelity checks) into --work on
first use and reused while the exporter's code is unchanged.

    python benchmarks/runtime.py --model TUNED --pruned SEARCH_OR_CHECKPOINT
    python benchmarks/runtime.py --variants genai-int8-dense,genai-int8-pruned --repeats 1

Workloads:
- generate: the chat prompt PROMPT (token ids from the model's tokenizer, fed as ids to every
  runtime, llama.cpp included), then --decode new tokens, greedy, EOS ignored. first token
  ms = the prompt pass; decode ms/token = the time of the tokens after the first, per token;
  tok/s = 1000 / that.
- classify: --examples validation prompts of --task, one forward pass each, label logits of
  the last position. OpenVINO / onnxruntime classify with the export's default head for a
  classification task (task-sized: the label tokens only); llama.cpp has no such head and
  computes the full vocabulary.

Loops (runner): optimum-ov (optimum-intel's OVModelForCausalLM, transformers' generate
loop in Python), genai (OpenVINO GenAI's LLMPipeline, C++ loop; generate only), runner-ov and
runner-ort (sieve_edge.runtime, the loop a bundle ships: numpy argmax, one runtime call per
token), optimum-ort (optimum's ORTModelForCausalLM), llama.cpp (llama-cpp-python, a Python
loop over llama_decode; GGUF written by sieve_edge.export.gguf, quantized by llama.cpp),
torch. OpenVINO runs with the hints bundles ship: f32 inference precision (the CPU plugin
would pick bf16 on avx512_bf16 CPUs), f32 KV cache, no dynamic int8 activations.

Bandwidth: the read bandwidth is measured (numpy sum over 512 MB); the weight bytes read per
decoded token are the model's constant bytes minus tables that are only gathered (the token
embedding of an untied or task-head model: one row a token); "bound ms" is bytes ÷ bandwidth
and "overhead ms/token" the measured ms/token minus it.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n"
OV_HINT = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
WORKLOADS = ("generate", "classify")


@dataclass(frozen=True)
class Variant:
    runner: str           # optimum-ov | genai | runner-ov | optimum-ort | runner-ort | llama.cpp | torch
    model: str            # dense | pruned
    fmt: str | None       # openvino | onnx | gguf | None (torch)
    weights: str          # fp32 | int8 | int4 | Q8_0 | Q4_0
    fuse: bool = True     # the exporter's MatMul fusion (export/fuse.py)
    label: str = ""

    def workloads(self) -> tuple[str, ...]:
        return ("generate",) if self.runner in ("genai", "ortgenai") else WORKLOADS


def _variants() -> dict[str, Variant]:
    v = {"torch-fp32-dense": Variant("torch", "dense", None, "fp32", label="torch fp32")}
    for kind in ("dense", "pruned"):
        v[f"ov-int8-{kind}"] = Variant("optimum-ov", kind, "openvino", "int8", label="OpenVINO int8, optimum-intel loop")
        v[f"genai-int8-{kind}"] = Variant("genai", kind, "openvino", "int8", label="OpenVINO int8, GenAI C++ loop")
        v[f"runner-ov-int8-{kind}"] = Variant("runner-ov", kind, "openvino", "int8",
                                              label="OpenVINO int8, bundle runner loop")
        v[f"genai-int4-{kind}"] = Variant("genai", kind, "openvino", "int4", label="OpenVINO int4, GenAI C++ loop")
        v[f"runner-ov-int4-{kind}"] = Variant("runner-ov", kind, "openvino", "int4",
                                              label="OpenVINO int4, bundle runner loop")
        v[f"ort-int8-{kind}"] = Variant("optimum-ort", kind, "onnx", "int8", label="onnxruntime int8, optimum loop")
        v[f"runner-ort-int8-{kind}"] = Variant("runner-ort", kind, "onnx", "int8",
                                               label="onnxruntime int8, bundle runner loop")
        v[f"ortgenai-int8-{kind}"] = Variant("ortgenai", kind, "onnx", "int8",
                                             label="onnxruntime int8, onnxruntime-genai C++ generator")
    v["genai-int8-pruned-unfused"] = Variant("genai", "pruned", "openvino", "int8", fuse=False,
                                             label="OpenVINO int8, GenAI C++ loop, unfused export")
    v["runner-ort-int8-pruned-unfused"] = Variant("runner-ort", "pruned", "onnx", "int8", fuse=False,
                                                  label="onnxruntime int8, bundle runner loop, unfused export")
    v["llama.cpp-Q8_0-dense"] = Variant("llama.cpp", "dense", "gguf", "Q8_0", label="llama.cpp Q8_0")
    v["llama.cpp-Q4_0-dense"] = Variant("llama.cpp", "dense", "gguf", "Q4_0", label="llama.cpp Q4_0")
    return v


VARIANTS = _variants()
BASELINE = "ov-int8-dense"


# ---------------------------------------------------------------------------- artifacts


def source_hash(source: str) -> str:
    """8 hex digits naming a model folder (by absolute path) or an alias / hub id."""
    ident = str(Path(source).resolve()) if Path(source).exists() else source
    return hashlib.sha256(ident.encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=None)
def export_code_hash() -> str:
    """8 hex digits of the exporter's source (sieve_edge/export/*.py, factorize.py)."""
    pkg = HERE.parent / "sieve_edge"
    h = hashlib.sha256()
    for path in sorted((pkg / "export").glob("*.py")) + [pkg / "factorize.py"]:
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:8]


def pruned_checkpoint(args) -> Path:
    """A searched checkpoint (--pruned: a search folder or a checkpoint), or uniform --keep."""
    if args.pruned:
        path = Path(args.pruned)
        if not (path / "sieve_edge.json").is_file():
            sys.exit(f"--pruned {path}: not a checkpoint or search folder (no sieve_edge.json)")
        return path
    path = Path(args.work) / f"pruned-keep{args.keep}-{source_hash(args.model)}"
    if (path / "sieve_edge.json").exists():
        return path
    from sieve_edge.checkpoint import build_manifest, save_checkpoint
    from sieve_edge.models import load_model, load_tokenizer
    from sieve_edge.prune import prune
    from sieve_edge.tasks import load_task

    model, tok = load_model(args.model), load_tokenizer(args.model)
    task = load_task(args.task)
    prune(model, tok, task, args.keep, "output", n_calibration=args.calibration, progress=False)
    save_checkpoint(model, tok, path, build_manifest(model, base_model=args.model, method="output", task=task.name))
    return path


def source_of(args, kind: str) -> str:
    return args.model if kind == "dense" else str(pruned_checkpoint(args))


def export_folder(args, v: Variant, workload: str) -> Path:
    """The export a (variant, workload) runs: generation exports keep the full head;
    classification exports take the export's default (the task-sized head for sst2)."""
    from sieve_edge.export import export_model

    source = source_of(args, v.model)
    head = "head" if workload == "classify" else "full"
    tag = f"{v.model}-{source_hash(source)}-{export_code_hash()}-{v.fmt}-{v.weights}-{head}" + ("" if v.fuse else "-unfused")
    out = Path(args.work) / tag
    if not (out / "export.json").exists():
        weights = "fp32" if v.weights == "int4" else v.weights
        export_model(source, v.fmt, weights, out, int4=v.weights == "int4", task=args.task,
                     task_head=None if workload == "classify" else False, fuse=v.fuse,
                     metric_limit=args.metric_limit, force=True,
                     log=lambda m: print(f"  [{tag}] {m}", file=sys.stderr, flush=True))
    return out


def gguf_file(args, v: Variant) -> Path:
    """The dense model as GGUF, quantized by llama.cpp to the variant's type."""
    from sieve_edge.export.gguf import quantize_gguf, write_gguf

    base = Path(args.work) / f"gguf-{source_hash(args.model)}-{export_code_hash()}"
    out = base.with_name(base.name + f".{v.weights}.gguf")
    if out.exists():
        return out
    f32 = base.with_name(base.name + ".F32.gguf")
    if not f32.exists():
        from sieve_edge.models import load_model, load_tokenizer

        write_gguf(load_model(args.model), load_tokenizer(args.model), f32, context_length=2048)
    return quantize_gguf(f32, out, v.weights, threads=args.threads)


def artifact(args, v: Variant, workload: str) -> Path | None:
    if v.fmt is None:
        return None
    if v.fmt == "gguf":
        return gguf_file(args, v)
    return export_folder(args, v, workload)


# ---------------------------------------------------------------------------- bytes read per token


def bytes_read_per_token(path: Path | None) -> int | None:
    """Constant bytes a decode step reads: all weights, less tables only gathered (one row)."""
    if path is None:
        return None
    if path.suffix == ".gguf":
        import gguf

        reader = gguf.GGUFReader(str(path))
        sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
        total = sum(sizes.values())
        if "output.weight" in sizes:   # untied: the embedding is only gathered
            total -= sizes.get("token_embd.weight", 0)
        return total
    if (path / "model.onnx").exists():
        return _onnx_bytes_read(path / "model.onnx")
    return _ov_bytes_read(path / "openvino_model.xml")


def _onnx_bytes_read(model_path: Path) -> int:
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    sizes = {}
    for t in graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        sizes[t.name] = int(ext["length"]) if "length" in ext else len(t.raw_data) or \
            onnx.numpy_helper.to_array(t).nbytes
    readers: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node.op_type, i))
    gathered = [n for n, r in readers.items() if n in sizes and r and all(op == "Gather" and i == 0 for op, i in r)]
    return sum(sizes.values()) - sum(sizes[n] for n in gathered)


def _ov_bytes_read(xml: Path) -> int:
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    passthrough = {"Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze"}
    total = gathered = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant":
            continue
        size = int(op.get_byte_size()) if hasattr(op, "get_byte_size") else op.get_output_tensor(0).size
        total += size
        if size < 4096:
            continue
        # follow the decompression chain (Convert / Subtract zero point / Multiply scale)
        frontier, consumers = [op], []
        while frontier:
            node = frontier.pop()
            for target in node.output(0).get_target_inputs():
                user = target.get_node()
                if user.get_type_name() in passthrough:
                    frontier.append(user)
                else:
                    consumers.append((user.get_type_name(), target.get_index()))
        if consumers and all(t == "Gather" and i == 0 for t, i in consumers):
            gathered += size
    return total - gathered


# ---------------------------------------------------------------------------- child: one measurement


def _times(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _inputs(args):
    from sieve_edge.models import load_tokenizer
    from sieve_edge.tasks import build_prompt, encode_prompts, load_examples, load_task

    tok = load_tokenizer(args.model)
    task = load_task(args.task)
    texts = [build_prompt(task, tok, ex.text) for ex in load_examples(task, "validation", args.examples)]
    from sieve_edge.export.fidelity import first_answer_tokens

    labels = first_answer_tokens(tok, texts[0], task.answers)
    return tok, tok(PROMPT, add_special_tokens=False)["input_ids"], encode_prompts(tok, texts), labels


def measure(v: Variant, workload: str, path: str | None, args) -> dict:
    """One (variant, workload) in this process: per-repeat lists, medians taken by the parent."""
    tok, prompt_ids, cls_ids, label_ids = _inputs(args)
    n = args.decode
    res: dict = {"prompt_tokens": len(prompt_ids),
                 "classification_prompt_tokens": statistics.median(len(i) for i in cls_ids)}
    step, reset, head = _loader(v, path, args, label_ids)
    if workload == "generate":
        if v.runner == "genai":
            return res | _genai(path, prompt_ids, n, args)
        if v.runner == "ortgenai":
            return res | _ortgenai(path, prompt_ids, n, args)
        if v.runner in ("optimum-ov", "optimum-ort", "torch"):
            return res | _hf_generate(step, prompt_ids, n, args)
        firsts, per_token = [], []

        def generate():
            reset()
            t0 = time.perf_counter()
            logits = step(prompt_ids)
            t1 = time.perf_counter()
            for _ in range(n - 1):
                logits = step([int(logits.argmax())])
            t2 = time.perf_counter()
            firsts.append((t1 - t0) * 1e3)
            per_token.append((t2 - t1) * 1e3 / (n - 1))

        generate()  # warm-up
        firsts.clear(), per_token.clear()
        for _ in range(args.repeats):
            generate()
        return res | {"first_token_ms": firsts, "decode_ms_per_token": per_token, "loop": v.runner}
    # classify: one forward pass per prompt, the label logits of the last position
    def classify():
        for seq in cls_ids:
            reset()
            last = step(seq)
            int(last.argmax()) if head else int(last[label_ids].argmax())   # the prediction, as a runner makes it

    classify()
    return res | {"classify_ex_s": [len(cls_ids) / t for t in _times(classify, args.repeats)], "head": head}


def _loader(v: Variant, path, args, label_ids):
    """(step(ids) -> last-position logits as numpy, reset(), task-head?) for a runner."""
    import numpy as np

    if v.runner in ("runner-ov", "runner-ort"):
        from sieve_edge import runtime as rt

        model = rt.load_model(Path(path), "openvino" if v.runner == "runner-ov" else "onnxruntime", args.threads)
        head = bool((rt._maybe_json(Path(path) / "export.json")).get("task_head"))
        return (lambda ids: model.forward(ids)[-1]), model.reset, head
    if v.runner == "llama.cpp":
        import llama_cpp

        llm = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=512, n_threads=args.threads,
                              n_threads_batch=args.threads, logits_all=False, verbose=False)

        def step(ids):
            llm.eval(ids)
            return np.asarray(llm.scores[llm.n_tokens - 1])

        return step, llm.reset, False
    if v.runner in ("genai", "ortgenai"):
        return None, None, False
    import torch

    torch.set_num_threads(args.threads)
    if v.runner == "torch":
        from sieve_edge.models import load_model

        model = load_model(args.model)
    elif v.runner == "optimum-ov":
        from optimum.intel import OVModelForCausalLM

        model = OVModelForCausalLM.from_pretrained(
            path, ov_config={**OV_HINT, "INFERENCE_NUM_THREADS": args.threads, "CACHE_DIR": ""})
    else:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        model = ORTModelForCausalLM.from_pretrained(path, use_cache=True, session_options=so)
    head = bool(path and json.loads((Path(path) / "export.json").read_text()).get("task_head"))

    def step(ids):
        x = torch.tensor([ids])
        with torch.no_grad():
            return model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].float().numpy()

    step.model = model
    return step, (lambda: None), head


def _hf_generate(step, prompt_ids, n, args) -> dict:
    """transformers' generate loop: first token = generate(1); per token from generate(n)."""
    import torch

    model = step.model
    ids = torch.tensor([prompt_ids])

    def gen(k):
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                           min_new_tokens=k, do_sample=False, pad_token_id=0)

    gen(4)  # warm-up
    firsts, per_token = [], []
    for _ in range(args.repeats):
        t1 = _times(lambda: gen(1), 1)[0]
        tn = _times(lambda: gen(n), 1)[0]
        firsts.append(t1 * 1e3)
        per_token.append((tn - t1) * 1e3 / (n - 1))
    return {"first_token_ms": firsts, "decode_ms_per_token": per_token, "loop": "transformers generate"}


def _genai(path, prompt_ids, n, args) -> dict:
    import numpy as np
    import openvino as ov
    import openvino_genai as og

    pipe = og.LLMPipeline(path, "CPU", INFERENCE_NUM_THREADS=args.threads, **OV_HINT)
    cfg = og.GenerationConfig()
    cfg.max_new_tokens = cfg.min_new_tokens = n
    cfg.ignore_eos = True
    cfg.do_sample = False
    ids = ov.Tensor(np.asarray([prompt_ids], dtype=np.int64))
    pipe.generate(ids, cfg)  # warm-up
    firsts, per_token = [], []
    for _ in range(args.repeats):
        m = pipe.generate(ids, cfg).perf_metrics
        firsts.append(m.get_ttft().mean)
        durations = list(m.raw_metrics.m_durations)   # µs, each token after the first
        per_token.append(sum(durations) / len(durations) / 1e3)
    return {"first_token_ms": firsts, "decode_ms_per_token": per_token, "loop": "openvino_genai.LLMPipeline"}


def _ortgenai(path, prompt_ids, n, args) -> dict:
    """onnxruntime-genai's generator, as the bundle runner drives it (``--loop cpp``)."""
    from sieve_edge import runtime as rt

    loop = rt.generation_loop(rt.load_model(Path(path), "onnxruntime", args.threads), "cpp")
    loop.generate(prompt_ids, n, set(), stop_at_eos=False)  # warm-up
    firsts, per_token = [], []
    for _ in range(args.repeats):
        _, first, later = loop.generate(prompt_ids, n, set(), stop_at_eos=False)
        firsts.append(first)
        per_token.append(sum(later) / len(later))
    return {"first_token_ms": firsts, "decode_ms_per_token": per_token, "loop": loop.name}


# ---------------------------------------------------------------------------- parent


def read_bandwidth_gbs(size_mb: int = 512, repeats: int = 5) -> float:
    """Median read bandwidth of summing a large float32 array (GB/s)."""
    import numpy as np

    a = np.ones(size_mb * 2**20 // 4, np.float32)
    a.sum()
    times = _times(lambda: a.sum(), repeats)
    return a.nbytes / statistics.median(times) / 1e9


def child(args, name: str, workload: str, path: str | None) -> dict:
    cmd = [sys.executable, __file__, "--one", name, workload, path or "-", "--model", args.model,
           "--task", args.task, "--repeats", str(args.repeats), "--decode", str(args.decode),
           "--examples", str(args.examples), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(line[7:])


def run(args) -> dict:
    Path(args.work).mkdir(parents=True, exist_ok=True)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    t_start = time.time()
    bw = read_bandwidth_gbs()
    rows = {}
    for name in names:
        v = VARIANTS[name]
        row = {"label": v.label, "runner": v.runner, "model": v.model, "format": v.fmt, "weights": v.weights,
               "fused": v.fuse if v.fmt in ("onnx", "openvino") else None}
        for workload in v.workloads():
            if workload not in args.workloads:
                continue
            try:
                path = artifact(args, v, workload)
            except Exception as e:  # noqa: BLE001 - a row that cannot be built says why; the rest go on
                row[f"{workload}_error"] = f"{type(e).__name__}: {e}"
                print(f"  {name} {workload}: {row[f'{workload}_error']}", file=sys.stderr)
                continue
            print(f"running {name} ({workload})", file=sys.stderr, flush=True)
            r = child(args, name, workload, str(path) if path else None)
            if "error" in r:
                row[f"{workload}_error"] = r["error"]
                print(f"  failed: {r['error'][-400:]}", file=sys.stderr)
                continue
            row[f"{workload}_runs"] = {k: r[k] for k in ("first_token_ms", "decode_ms_per_token", "classify_ex_s")
                                       if k in r}
            row[f"{workload}_peak_rss_mb"] = r["peak_rss_mb"]
            if workload == "generate":
                ms = statistics.median(r["decode_ms_per_token"])
                b = bytes_read_per_token(path)
                row.update({"first_token_ms": statistics.median(r["first_token_ms"]), "decode_ms_per_token": ms,
                            "decode_tok_s": 1e3 / ms, "loop": r.get("loop"), "bytes_read_per_token": b,
                            "prompt_tokens": r["prompt_tokens"]})
                if b:
                    row["bound_ms_per_token"] = b / (bw * 1e9) * 1e3
                    row["overhead_ms_per_token"] = ms - row["bound_ms_per_token"]
                    row["x_of_bound"] = ms / row["bound_ms_per_token"]
                row.update(_export_facts(path))
            else:
                row["classify_ex_s"] = statistics.median(r["classify_ex_s"])
                row["classify_head"] = "task-sized" if r.get("head") else "full vocabulary"
                row["classification_prompt_tokens"] = r["classification_prompt_tokens"]
        rows[name] = row
    base = rows.get(BASELINE, {})
    for row in rows.values():
        for key in ("decode_tok_s", "classify_ex_s"):
            if row.get(key) and base.get(key):
                row[key + "_x"] = row[key] / base[key]
    return {
        "machine": {"cpu": _cpu(), "threads": args.threads, "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "settings": {k: getattr(args, k) for k in ("model", "task", "pruned", "keep", "repeats", "decode",
                                                    "examples", "threads", "workloads")},
        "ov_config": OV_HINT, "read_bandwidth_gbs": bw, "baseline": BASELINE, "variants": rows,
        "goals": goals(rows), "wall_seconds": time.time() - t_start,
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _export_facts(path) -> dict:
    if path is None or path.suffix == ".gguf" or not (path / "export.json").exists():
        return {}
    m = json.loads((path / "export.json").read_text())
    out = {"matmuls_per_layer": _mean(m.get("graph_matmuls_per_layer"))}
    if m.get("fusion"):
        out["matmuls_per_layer_unfused"] = _mean(m["fusion"]["matmuls_per_layer_before"])
    fid = (m.get("fidelity") or {}).get(m.get("weights"))
    if fid:
        out["task_metric_vs_torch"] = {k: fid.get(k) for k in ("torch", "exported", "prediction_agreement")}
    return out


def _mean(xs):
    return None if not xs else sum(xs) / len(xs)


def goals(rows: dict) -> list[dict]:
    """The issue's four goals, each with the rows it compares and its ratio."""
    def get(name, key):
        return (rows.get(name) or {}).get(key)

    out = []
    pairs = [(f"{r}-int8-dense", f"{r}-int8-pruned")
             for r in ("ov", "genai", "runner-ov", "ort", "runner-ort", "ortgenai")]
    best = None
    for d, p in pairs:
        if get(d, "decode_tok_s") and get(p, "decode_tok_s"):
            ratio = get(p, "decode_tok_s") / get(d, "decode_tok_s")
            if best is None or ratio > best[0]:
                best = (ratio, p, d)
    out.append({"goal": "pruned int8 decode >= 1.5x dense int8, same runtime and loop", "target": 1.5,
                "ratio": best and best[0], "rows": best and best[1:], "met": bool(best and best[0] >= 1.5)})
    pruned = [(get(p, "decode_tok_s"), p) for _, p in pairs if get(p, "decode_tok_s")]
    llama = get("llama.cpp-Q8_0-dense", "decode_tok_s")
    top = max(pruned) if pruned else None
    out.append({"goal": "pruned int8 decode >= llama.cpp Q8_0 of the dense model, same threads", "target": 1.0,
                "ratio": top and llama and top[0] / llama, "rows": top and llama and (top[1], "llama.cpp-Q8_0-dense"),
                "met": bool(top and llama and top[0] >= llama)})
    base = get("ov-int8-dense", "classify_ex_s")
    cls = [(get(p, "classify_ex_s"), p) for p in rows if rows[p].get("model") == "pruned"
           and rows[p].get("weights") == "int8" and get(p, "classify_ex_s")]
    top = max(cls) if cls else None
    out.append({"goal": "pruned classification >= 2x dense OpenVINO int8 (optimum-intel) examples/s", "target": 2.0,
                "ratio": top and base and top[0] / base, "rows": top and base and (top[1], "ov-int8-dense"),
                "met": bool(top and base and top[0] >= 2 * base)})
    fastest = max(((get(p, "decode_tok_s"), p) for _, p in pairs if get(p, "x_of_bound")), default=None)
    out.append({"goal": "decode per token within 2x of the bandwidth bound (fastest pruned int8)", "target": 2.0,
                "ratio": fastest and get(fastest[1], "x_of_bound"), "rows": fastest and (fastest[1],),
                "met": bool(fastest and get(fastest[1], "x_of_bound") <= 2.0)})
    return out


def _cpu() -> str:
    from sieve_edge.export.microbench import cpu_name

    return cpu_name()


def format_table(result: dict) -> str:
    def f(x, spec):
        return "" if x is None else format(x, spec)

    head = ("| variant | loop | first token ms | decode tok/s | x | ms/token | bound ms | overhead ms/token "
            "| MatMuls/layer | cls ex/s | x | head | peak RSS MB | MB read/token |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    lines = [head]
    for name, r in result["variants"].items():
        errors = "; ".join(f"{w} failed" for w in WORKLOADS if f"{w}_error" in r)
        mm = r.get("matmuls_per_layer")
        mm_s = "" if mm is None else (f"{r['matmuls_per_layer_unfused']:.1f}→{mm:.1f}"
                                      if r.get("matmuls_per_layer_unfused") else f"{mm:.1f}")
        rss = r.get("generate_peak_rss_mb") or r.get("classify_peak_rss_mb")
        b = r.get("bytes_read_per_token")
        lines.append(
            f"| {name} | {r.get('loop') or ''} | {f(r.get('first_token_ms'), '.1f')} | {f(r.get('decode_tok_s'), '.1f')} "
            f"| {f(r.get('decode_tok_s_x'), '.2f')} | {f(r.get('decode_ms_per_token'), '.2f')} "
            f"| {f(r.get('bound_ms_per_token'), '.2f')} | {f(r.get('overhead_ms_per_token'), '.2f')} | {mm_s} "
            f"| {f(r.get('classify_ex_s'), '.1f')} | {f(r.get('classify_ex_s_x'), '.2f')} "
            f"| {r.get('classify_head', '')} | {f(rss, '.0f')} | {f(b / 1e6 if b else None, '.1f')} |"
            + (f" {errors}" if errors else ""))
    lines.append("")
    lines.append("| goal | ratio | target | met | rows |\n|---|---:|---:|---|---|")
    for g in result["goals"]:
        lines.append(f"| {g['goal']} | {f(g['ratio'], '.2f')} | {g['target']} | {'yes' if g['met'] else 'no'} "
                     f"| {' / '.join(g['rows'] or ())} |")
    s = result["settings"]
    lines.append(f"\nread bandwidth {result['read_bandwidth_gbs']:.1f} GB/s; medians of {s['repeats']} runs; "
                 f"{s['threads']} threads; {s['decode']} new tokens; x = ratio to {result['baseline']}; "
                 f"load average at start {result['machine'].get('load_average_at_start')}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="the dense (tuned) model: folder or alias")
    p.add_argument("--task", default="sst2")
    p.add_argument("--pruned", default=None,
                   help="a search folder or factorized checkpoint (default: uniform --keep, method output)")
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--calibration", type=int, default=256, help="calibration examples for the uniform plan")
    p.add_argument("--work", default=os.environ.get("SIEVE_EDGE_BENCH_WORK", "/tmp/sieve-edge-bench"))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode", type=int, default=64, help="new tokens of the generation workload")
    p.add_argument("--examples", type=int, default=20, help="classification prompts timed per repeat")
    p.add_argument("--metric-limit", type=int, default=100, help="task examples for the export's int8/int4 metric")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "runtime-smollm2.json"))
    p.add_argument("--one", nargs=3, metavar=("VARIANT", "WORKLOAD", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in args.workloads if w not in WORKLOADS]
    if bad:
        p.error(f"unknown workload(s) {bad}; allowed: {', '.join(WORKLOADS)}")
    if args.decode < 2:
        p.error("--decode must be at least 2 (the first token is the prompt pass)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        name, workload, path = args.one
        res = measure(VARIANTS[name], workload, None if path == "-" else path, args)
        from sieve_edge.runtime import peak_rss_mb  # VmHWM: ru_maxrss carries the parent's peak over exec

        res["peak_rss_mb"] = peak_rss_mb()
        print("RESULT " + json.dumps(res))
        return
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(format_table(result))


if __name__ == "__main__":
    main()
