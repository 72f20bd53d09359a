"""Runtime benchmark: decode tok/s, time to first token, classification examples/s, peak RSS
and size on disk, for dense and pruned SmolLM2 across torch, onnxruntime and OpenVINO.

Not a test: it measures speed on this machine. Every variant runs in its own child process
(so peak RSS is that variant's), each measurement is the median of --repeats runs, and the
ratios are to dense OpenVINO int8 through optimum-intel, all in one run. Exports are made
(with their fidelity checks) into --work on first use and reused afterwards.

    python benchmarks/runtime.py --repeats 3                     # full table
    python benchmarks/runtime.py --variants ov-int8-dense,genai-int8-dense

Variants: torch fp32; optimum-intel (OVModelForCausalLM, Python loop); OpenVINO GenAI
(LLMPipeline, C++ loop; decode and first token only); optimum ORTModelForCausalLM; and a
plain onnxruntime loop (numpy, no optimum wrapper). OpenVINO runs with the hints a bundle
ships with: INFERENCE_PRECISION_HINT=f32 (the CPU plugin would pick bf16 on avx512_bf16
CPUs), f32 KV cache, and no dynamic int8 quantization of activations
(--dynamic-quantization turns the plugin's default back on). The memory-bandwidth bound is measured read bandwidth divided by the
bytes of weights read per token (the weights file of the int8 export).
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n"
OV_HINT = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}

# name -> (runner, model kind, export format or None, weights)
VARIANTS = {
    "torch-fp32-dense": ("torch", "dense", None, "fp32"),
    "ov-int8-dense": ("optimum-ov", "dense", "openvino", "int8"),
    "genai-int8-dense": ("genai", "dense", "openvino", "int8"),
    "ort-int8-dense": ("optimum-ort", "dense", "onnx", "int8"),
    "ortraw-int8-dense": ("ort-raw", "dense", "onnx", "int8"),
    "ov-fp32-pruned": ("optimum-ov", "pruned", "openvino", "fp32"),
    "ov-int8-pruned": ("optimum-ov", "pruned", "openvino", "int8"),
    "genai-int8-pruned": ("genai", "pruned", "openvino", "int8"),
    "ort-fp32-pruned": ("optimum-ort", "pruned", "onnx", "fp32"),
    "ort-int8-pruned": ("optimum-ort", "pruned", "onnx", "int8"),
    "ortraw-int8-pruned": ("ort-raw", "pruned", "onnx", "int8"),
}
BASELINE = "ov-int8-dense"


# ---------------------------------------------------------------------------- artifacts


def pruned_checkpoint(args) -> Path:
    """A searched checkpoint (--pruned), or uniform keep --keep with the 'output' method."""
    if args.pruned:
        return Path(args.pruned)
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


def folder_of(args, source: str, kind: str, fmt: str, weights: str) -> Path:
    """The export folder names its source and the exporter's code, so another --model or
    --pruned, or a changed exporter, never reuses a stale export."""
    return Path(args.work) / f"{kind}-{source_hash(source)}-{export_code_hash()}-{fmt}-{weights}"


def source_of(args, kind: str) -> str:
    return args.model if kind == "dense" else str(pruned_checkpoint(args))


def export_folder(args, kind: str, fmt: str, weights: str) -> Path:
    from sieve_edge.export import export_model

    source = source_of(args, kind)
    out = folder_of(args, source, kind, fmt, weights)
    if not (out / "export.json").exists():
        export_model(source, fmt, weights, out, task=args.task, metric_limit=args.metric_limit, force=True,
                     log=lambda m: print(f"  [{kind} {fmt} {weights}] {m}", file=sys.stderr, flush=True))
    return out


def weight_bytes(folder: Path | None) -> int | None:
    if folder is None:
        return None
    names = ("openvino_model.bin", "model.onnx", "model.onnx_data")
    return sum((folder / n).stat().st_size for n in names if (folder / n).exists())


# ---------------------------------------------------------------------------- child: one variant


def _median_times(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run_variant(runner: str, source: str, args) -> dict:
    """Measure one variant in this process; returns lists of per-repeat values."""
    import torch

    torch.set_num_threads(args.threads)
    from sieve_edge.models import load_tokenizer
    from sieve_edge.tasks import build_prompt, encode_prompts, load_examples, load_task

    tok = load_tokenizer(source if runner != "torch" else args.model)
    task = load_task(args.task)
    cls_ids = encode_prompts(tok, [build_prompt(task, tok, ex.text)
                                   for ex in load_examples(task, "validation", args.examples)])
    prompt_ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    n = args.decode
    res: dict = {"prompt_tokens": len(prompt_ids),
                 "classification_prompt_tokens": statistics.median(len(i) for i in cls_ids)}

    if runner == "genai":
        import openvino_genai as og

        pipe = og.LLMPipeline(source, "CPU", INFERENCE_NUM_THREADS=args.threads, **OV_HINT)
        cfg = og.GenerationConfig()
        cfg.max_new_tokens = n
        cfg.min_new_tokens = n
        cfg.ignore_eos = True
        pipe.generate(PROMPT, cfg)  # warm-up
        tps, ttft = [], []
        for _ in range(args.repeats):
            r = pipe.generate([PROMPT], cfg)
            m = r.perf_metrics
            tps.append(n * 1000.0 / m.get_generate_duration().mean)  # n tokens / whole generate call
            ttft.append(m.get_ttft().mean)                           # ms
        res.update(decode_tok_s=tps, ttft_ms=ttft, classify_ex_s=None)
        return res

    if runner == "ort-raw":
        return res | _ort_raw(source, prompt_ids, cls_ids, n, args)

    if runner == "torch":
        from sieve_edge.models import load_model

        model = load_model(source)
    elif runner == "optimum-ov":
        from optimum.intel import OVModelForCausalLM

        model = OVModelForCausalLM.from_pretrained(
            source, ov_config={**OV_HINT, "INFERENCE_NUM_THREADS": args.threads, "CACHE_DIR": ""})
    else:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        model = ORTModelForCausalLM.from_pretrained(source, use_cache=True, session_options=so)

    ids = torch.tensor([prompt_ids])

    def gen(k):
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                           min_new_tokens=k, do_sample=False, pad_token_id=tok.pad_token_id)

    gen(4)  # warm-up
    ttft = [t * 1e3 for t in _median_times(lambda: gen(1), args.repeats)]
    # tok/s of the whole greedy generate call (prompt processing included), for every runner
    tps = [n / t for t in _median_times(lambda: gen(n), args.repeats)]

    def classify():
        with torch.no_grad():
            for seq in cls_ids:
                x = torch.tensor([seq])
                model(input_ids=x, attention_mask=torch.ones_like(x))

    classify()
    cls = [len(cls_ids) / t for t in _median_times(classify, args.repeats)]
    res.update(decode_tok_s=tps, ttft_ms=ttft, classify_ex_s=cls)
    return res


def _ort_raw(folder: str, prompt_ids, cls_ids, n, args) -> dict:
    """Greedy decode with a bare InferenceSession: numpy in, numpy out, no wrapper."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(Path(folder) / "model.onnx"), so, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    past_names = [k for k in inputs if k.startswith("past_key_values")]
    cfg = json.loads((Path(folder) / "config.json").read_text())
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    out_names = [o.name for o in sess.get_outputs()]

    def step(ids, past, start):
        T = ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, start + T), np.int64)}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(start, start + T, dtype=np.int64)[None]
        feed.update(past)
        outs = sess.run(out_names, feed)
        new_past = {name.replace("present", "past_key_values"): v for name, v in zip(out_names[1:], outs[1:])}
        return outs[0], new_past

    empty = {k: np.zeros((1, kv_heads, 0, head_dim), np.float32) for k in past_names}

    def generate(k):
        ids = np.array([prompt_ids], np.int64)
        logits, past = step(ids, empty, 0)
        pos = ids.shape[1]
        for _ in range(k - 1):
            nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            logits, past = step(nxt, past, pos)
            pos += 1

    generate(4)
    ttft = [t * 1e3 for t in _median_times(lambda: generate(1), args.repeats)]
    tps = [n / t for t in _median_times(lambda: generate(n), args.repeats)]

    def classify():
        for seq in cls_ids:
            step(np.array([seq], np.int64), empty, 0)

    classify()
    cls = [len(cls_ids) / t for t in _median_times(classify, args.repeats)]
    return {"decode_tok_s": tps, "ttft_ms": ttft, "classify_ex_s": cls}


# ---------------------------------------------------------------------------- parent


def read_bandwidth_gbs(size_mb: int = 512, repeats: int = 5) -> float:
    """Median read bandwidth of summing a large float32 array (GB/s)."""
    import numpy as np

    a = np.ones(size_mb * 2**20 // 4, np.float32)
    a.sum()
    times = _median_times(lambda: a.sum(), repeats)
    return a.nbytes / statistics.median(times) / 1e9


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="sst2")
    p.add_argument("--pruned", default=None, help="a pruned checkpoint (default: uniform --keep, method output)")
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--calibration", type=int, default=256, help="calibration examples for the uniform plan")
    p.add_argument("--work", default=os.environ.get("SIEVE_EDGE_BENCH_WORK", "/tmp/sieve-edge-bench"))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--examples", type=int, default=20, help="classification prompts timed per repeat")
    p.add_argument("--metric-limit", type=int, default=100, help="task examples for the export's int8 metric")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "runtime-smollm2.json"))
    p.add_argument("--dynamic-quantization", action="store_true",
                   help="OpenVINO: keep the CPU plugin's dynamic int8 activations (default: off, as bundles ship)")
    p.add_argument("--one", nargs=2, metavar=("RUNNER", "SOURCE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dynamic_quantization:
        OV_HINT.pop("DYNAMIC_QUANTIZATION_GROUP_SIZE")

    if args.one:
        res = run_variant(args.one[0], args.one[1], args)
        from sieve_edge.runtime import peak_rss_mb  # VmHWM: ru_maxrss carries the parent's peak over exec

        res["peak_rss_mb"] = peak_rss_mb()
        print("RESULT " + json.dumps(res))
        return

    Path(args.work).mkdir(parents=True, exist_ok=True)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    t_start = time.time()
    rows = {}
    for name in names:
        runner, kind, fmt, weights = VARIANTS[name]
        if fmt is None:
            source = args.model if kind == "dense" else str(pruned_checkpoint(args))
            folder = None
        else:
            folder = export_folder(args, kind, fmt, weights)
            source = str(folder)
        print(f"running {name}", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--one", runner, source, "--model", args.model, "--task", args.task,
               "--repeats", str(args.repeats), "--decode", str(args.decode), "--examples", str(args.examples),
               "--threads", str(args.threads)] + (["--dynamic-quantization"] if args.dynamic_quantization else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            rows[name] = {"error": (proc.stderr or proc.stdout)[-2000:]}
            print(f"  failed: {rows[name]['error'][-400:]}", file=sys.stderr)
            continue
        r = json.loads(line[7:])
        export = json.loads((folder / "export.json").read_text()) if folder else None
        rows[name] = {
            "runner": runner, "model": kind, "format": fmt, "weights": weights,
            "decode_tok_s": statistics.median(r["decode_tok_s"]),
            "ttft_ms": statistics.median(r["ttft_ms"]),
            "classify_ex_s": statistics.median(r["classify_ex_s"]) if r["classify_ex_s"] else None,
            "peak_rss_mb": r["peak_rss_mb"],
            "weights_bytes": weight_bytes(folder),
            "size_on_disk_bytes": sum(export["files"].values()) if export else None,
            "runs": {k: r[k] for k in ("decode_tok_s", "ttft_ms", "classify_ex_s")},
            "int8_metric": (export or {}).get("fidelity", {}).get(weights) if weights != "fp32" else None,
        }
    base = rows.get(BASELINE, {})
    for row in rows.values():
        for key in ("decode_tok_s", "classify_ex_s"):
            if row.get(key) and base.get(key):
                row[key + "_vs_ov_int8_dense"] = row[key] / base[key]
        if row.get("ttft_ms") and base.get("ttft_ms"):
            row["ttft_vs_ov_int8_dense"] = base["ttft_ms"] / row["ttft_ms"]  # >1: faster
    bw = read_bandwidth_gbs()
    bound = {}
    for kind in ("dense", "pruned"):
        folder = folder_of(args, source_of(args, kind), kind, "openvino", "int8")
        if (folder / "openvino_model.bin").exists():
            b = weight_bytes(folder)
            bound[kind] = {"weights_bytes_per_token": b, "tok_s": bw * 1e9 / b}
    result = {
        "machine": {"cpu": _cpu(), "threads": args.threads, "python": platform.python_version()},
        "settings": {k: getattr(args, k) for k in ("model", "task", "pruned", "keep", "repeats", "decode",
                                                    "examples", "threads")},
        "ov_config": OV_HINT, "read_bandwidth_gbs": bw, "bandwidth_bound": bound,
        "baseline": BASELINE, "variants": rows, "wall_seconds": time.time() - t_start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))


def _cpu() -> str:
    from sieve_edge.export.microbench import cpu_name

    return cpu_name()


def format_table(result: dict) -> str:
    head = (f"| variant | decode tok/s | x | TTFT ms | cls ex/s | x | peak RSS MB | weights MB |\n"
            f"|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for name, r in result["variants"].items():
        if "error" in r:
            lines.append(f"| {name} | failed | | | | | | |")
            continue
        f = lambda v, fmt: "" if v is None else format(v, fmt)
        wb = r.get("weights_bytes")
        lines.append(
            f"| {name} | {f(r['decode_tok_s'], '.1f')} | {f(r.get('decode_tok_s_vs_ov_int8_dense'), '.2f')} "
            f"| {f(r['ttft_ms'], '.1f')} | {f(r['classify_ex_s'], '.1f')} "
            f"| {f(r.get('classify_ex_s_vs_ov_int8_dense'), '.2f')} | {f(r['peak_rss_mb'], '.0f')} "
            f"| {f(wb / 1e6 if wb else None, '.1f')} |")
    for kind, b in result["bandwidth_bound"].items():
        lines.append(f"| bandwidth bound ({kind} int8) | {b['tok_s']:.1f} | | | | | | "
                     f"{b['weights_bytes_per_token'] / 1e6:.1f} |")
    lines.append(f"\nread bandwidth {result['read_bandwidth_gbs']:.1f} GB/s; medians of "
                 f"{result['settings']['repeats']} runs; {result['settings']['threads']} threads; "
                 f"x = ratio to {result['baseline']} (higher is better)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
