"""Scale benchmark (issue 13): search throughput on Ray workers, and streamed calibration memory.

Part 1, search throughput: the GA on SmolLM2-135M / sst2 scored by one process (2 threads)
and by a local Ray cluster of 2 workers (1 thread each), same seed, same settings: the plans
must be equal; the table gives candidates per minute of the generations (the part the
workers share: seeding bisects one candidate at a time) and their ratio.

Part 2, calibration streamed layer by layer (``calibrate.stream_decompositions``) of
synthetic Llama-shaped models with random weights, written at run time as bf16 safetensors
one layer per shard (the shapes of SmolLM2-135M, SmolLM2-360M, Llama-3.2-1B, and the 1B
shape with 2 layers): peak RSS (each in a fresh child process) and seconds per layer, then
extrapolated to Llama-3.1-8B and Llama-3-70B shapes by the formula printed with the table.

Part 3 (``--part offload``, not in ``both``), candidate scoring with ``--offload``: a synthetic
Llama-shaped model (``--offload-shape``, default 360m) and random search bases of the
ladder's deepest rank are written to disk; fresh child processes then score the same N
random rank plans (sst2 validation prompts, SmolLM2's tokenizer) with the model and bases in
memory, and with them offloaded (``offload.OffloadedSearch``, the model read as a skeleton):
peak RSS, seconds per evaluation, and the largest label log-prob difference between the two.
The 24 GB limit is then computed from the measured per-module figures (formula printed).

Prints Markdown tables and writes benchmarks/results/scale.json (``--out``).

    python benchmarks/scale.py                          # both parts (idle box: ~40 min + ~30 min)
    python benchmarks/scale.py --part calibration --shapes 135m,360m
    python benchmarks/scale.py --quick                  # a tiny smoke run of both parts (~3 min)
    python benchmarks/scale.py --part offload --offload-shape 360m --plans 4

Part 1 needs ray (pip install 'sieve-edge[ray]') and the smollm2-135m alias's wheel.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Llama-family shapes: hidden, intermediate, layers, heads, kv heads, vocabulary
SHAPES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "1b-2layer": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
}
EXTRAPOLATE = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256),
}
GB = 1e9
VOCAB_SMOLLM2 = 49152
MMAP_THRESHOLD = 128 * 1024                     # glibc's default, fixed (MALLOC_MMAP_THRESHOLD_)
OFFLOAD_FIXED = f"offload, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("both", "search", "calibration", "offload"), default="both")
    # part 1
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="sst2")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads of the single process (the workers share them)")
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--val-limit", type=int, default=300)
    p.add_argument("--race", type=int, default=64)
    p.add_argument("--calibration", type=int, default=256)
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    # part 2
    p.add_argument("--shapes", default="135m,360m,1b,1b-2layer")
    p.add_argument("--examples", type=int, default=512, help="calibration sequences per model")
    p.add_argument("--tokens", type=int, default=64, help="tokens per calibration sequence (sst2 prompts: ~50)")
    p.add_argument("--method", default="output", choices=("output", "input-pca", "svd"))
    p.add_argument("--work", type=Path, default=None, help="where the synthetic models are written (default: a temp dir)")
    p.add_argument("--combine", default=None, metavar="FILES",
                   help="part 2 without measuring: merge the rows of these result files (comma list; a later file's "
                        "shape replaces an earlier one's) and extrapolate again")
    p.add_argument("--base-bytes", type=float, default=None,
                   help="with --combine: the child's own baseline RSS for rows measured with ru_maxrss (before "
                        "VmHWM), whose baseline is the parent's peak; e.g. a `--shapes tiny` run's baseline_rss")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    # part 3
    p.add_argument("--offload-shape", default="360m")
    p.add_argument("--plans", type=int, default=4, help="random rank plans scored per mode (after the dense model)")
    p.add_argument("--offload-rows", type=int, default=32, help="sst2 validation prompts scored per evaluation")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run of both parts")
    p.add_argument("--calibrate-one", type=Path, default=None, help=argparse.SUPPRESS)  # the child process
    p.add_argument("--score-one", nargs=3, default=None, help=argparse.SUPPRESS)  # child: model, bases, mode
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.population, args.generations = "tiny", 4, 1
        args.val_limit, args.race, args.calibration = 32, 8, 16
        args.shapes, args.examples, args.tokens = "tiny", 32, 16
        args.offload_shape, args.plans, args.offload_rows = "tiny", 2, 8
        if args.out == ROOT / "benchmarks" / "results" / "scale.json":
            args.out = ROOT / "benchmarks" / "results" / "scale-quick.json"
    return args


# ---------------------------------------------------------------- synthetic models

def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, **shape)


def layer_params(shape: dict) -> int:
    """Weights of one decoder layer: q, k, v, o, gate, up, down (the norms are noise)."""
    d, i = shape["hidden_size"], shape["intermediate_size"]
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return 2 * d * d + 2 * d * kv + 3 * d * i


def write_synthetic(shape: dict, folder: Path, seed: int = 0) -> Path:
    """A Llama-shaped model folder with random bf16 weights, one shard per decoder layer, made
    one layer at a time (never the whole model in memory)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    config = llama_config(shape)
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    names = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}  # tied head: listed once
    groups: dict[str, list[str]] = {}
    for n in names:
        parts = n.split(".")
        key = f"layer-{int(parts[2]):03d}" if n.startswith("model.layers.") else "outer"
        groups.setdefault(key, []).append(n)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for key, members in groups.items():
        tensors = {}
        for n in members:
            shape_n = names[n]
            if len(shape_n) == 1:
                t = torch.ones(shape_n)
            else:
                t = torch.randn(shape_n, generator=gen) * (1.0 / shape_n[-1] ** 0.5)
            tensors[n] = t.to(torch.bfloat16).contiguous()
        file = f"model-{key}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in members})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    return folder


def calibrate_one(folder: Path, examples: int, tokens: int, method: str) -> dict:
    """Run in a fresh child: streamed calibration of ``folder``; peak RSS and time per layer."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401 - counted in the baseline, not the calibration

    from sieve_edge.calibrate import stream_decompositions

    base = peak_rss()
    config = json.loads((folder / "config.json").read_text())
    gen = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, examples, 16):
        n = min(16, examples - start)
        ids = torch.randint(0, config["vocab_size"], (n, tokens), generator=gen)
        mask = torch.ones(n, tokens, dtype=torch.long)
        mask[:, : tokens // 4] = torch.arange(tokens // 4) >= torch.randint(0, tokens // 4, (n, 1), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": mask})
    t0 = time.perf_counter()
    first = None
    layers = 0
    for _ in stream_decompositions(folder, batches, method, device="cpu"):
        layers += 1
        if first is None:
            first = time.perf_counter() - t0  # includes recording layer 0's inputs
    seconds = time.perf_counter() - t0
    peak = peak_rss()
    return {"layers": layers, "seconds": seconds, "first_layer_seconds": first,
            "seconds_per_layer": (seconds - first) / max(layers - 1, 1) if layers > 1 else seconds,
            "peak_rss": peak, "baseline_rss": base, "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches)),
            "padded_tokens": examples * tokens, "threads": torch.get_num_threads(),
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_child(argv: list[str], what: str, env: dict | None = None) -> dict:
    """This script in a fresh process (its own peak RSS), sieve-edge from this checkout; the
    JSON its last line prints."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def part_calibration(args, save=lambda partial: None) -> dict:
    """``save(partial result)`` after each shape: a long run killed midway keeps what it measured."""
    work = args.work or Path(tempfile.mkdtemp(prefix="sieve-scale-"))
    rows = []
    for name in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        shape = SHAPES[name]
        folder = write_synthetic(shape, work / name)
        disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        m = run_child(["--calibrate-one", str(folder), "--examples", str(args.examples), "--tokens",
                       str(args.tokens), "--method", args.method], f"calibration of {name}")
        params = layer_params(shape) * shape["num_hidden_layers"]
        rows.append({"shape": name, **{k: shape[k] for k in ("hidden_size", "intermediate_size",
                                                              "num_hidden_layers", "vocab_size")},
                     "linear_params": params, "fp32_model_bytes": 4 * (params + shape["vocab_size"] *
                                                                        shape["hidden_size"]),
                     "disk_bytes": disk, **m})
        print(f"  {name}: peak RSS {m['peak_rss'] / GB:.2f} GB, {m['seconds_per_layer']:.1f} s/layer", flush=True)
        save({"rows": rows, "extrapolation": extrapolate(rows, args)})
    return {"rows": rows, "extrapolation": extrapolate(rows, args), "settings": {
        "examples": args.examples, "tokens": args.tokens, "method": args.method}}


def combine_calibration(files: list[Path], args) -> dict:
    """The measured rows of earlier part-2 result files, extrapolated again. A row measured
    with ru_maxrss (no "ru_maxrss" key beside its peak: before VmHWM) has the parent's peak as
    its baseline, so ``args.base_bytes`` replaces it; its peak is max(the parent's, its own)."""
    rows: dict[str, dict] = {}
    for f in files:
        doc = json.loads(Path(f).read_text())
        for r in (doc.get("calibration") or {}).get("rows", []):
            r = dict(r, source=str(f))
            if "ru_maxrss" not in r:
                if args.base_bytes is None:
                    raise SystemExit(f"{f}: row {r['shape']} was measured before VmHWM (its baseline is the parent's "
                                     "peak); give --base-bytes (the child's own baseline RSS)")
                r["baseline_rss_as_measured"], r["baseline_rss"] = r["baseline_rss"], args.base_bytes
            rows[r["shape"]] = r
    ordered = [rows[n] for n in SHAPES if n in rows]
    return {"rows": ordered, "extrapolation": extrapolate(ordered, args), "combined_from": [str(f) for f in files],
            "base_bytes_override": args.base_bytes}


def layer_bytes(shape: dict) -> float:
    """What one layer's turn holds, by construction: its weights in float32 plus the float64
    input covariances of its 4 groups (q/k/v, o and gate/up read the hidden size d, down reads
    the intermediate size i)."""
    d, i = shape["hidden_size"], shape["intermediate_size"]
    return 4 * layer_params(shape) + 8 * (3 * d * d + i * i)


def extrapolate(rows: list[dict], args) -> dict:
    """peak ≈ base + H + max(k·S, E), s/layer ≈ c·(3d³ + i³):

    base: the process before calibrating (torch, transformers); H: the cached hidden states,
    4 bytes x padded tokens x d (a layer replaces them batch by batch); S: ``layer_bytes``; E: the
    float32 embedding, held only while layer 0's inputs are recorded. k (working set over S:
    eigendecomposition workspace, bases) and c (the eigendecompositions' O(n³)) are fitted on
    the measured model with the largest layer."""
    if not rows:
        return {}
    ref = max(rows, key=lambda r: layer_bytes(SHAPES[r["shape"]]))
    s_ref = SHAPES[ref["shape"]]
    hidden = lambda shape: 4 * args.examples * args.tokens * shape["hidden_size"]  # noqa: E731
    embed = lambda shape: 4 * shape["vocab_size"] * shape["hidden_size"]  # noqa: E731
    base = ref["baseline_rss"]
    k = max(ref["peak_rss"] - base - hidden(s_ref), 0) / layer_bytes(s_ref)
    cube = lambda shape: 3 * shape["hidden_size"] ** 3 + shape["intermediate_size"] ** 3  # noqa: E731
    c = ref["seconds_per_layer"] / cube(s_ref)
    out = {"formula": "peak = base + H + max(k*S, E); s/layer = c*(3d^3 + i^3); H = 4*examples*tokens*d, "
                      "S = 4*layer_params + 8*(3d^2 + i^2), E = 4*vocab*d",
           "fitted_on": ref["shape"], "k": k, "c": c, "base_bytes": base, "rows": []}
    for name, shape in {**{r["shape"]: SHAPES[r["shape"]] for r in rows}, **EXTRAPOLATE}.items():
        peak = base + hidden(shape) + max(k * layer_bytes(shape), embed(shape))
        out["rows"].append({"shape": name, "layers": shape["num_hidden_layers"], "predicted_peak_rss": peak,
                            "predicted_seconds_per_layer": c * cube(shape),
                            "predicted_hours": c * cube(shape) * shape["num_hidden_layers"] / 3600,
                            "measured_peak_rss": next((r["peak_rss"] for r in rows if r["shape"] == name), None)})
    return out


# ---------------------------------------------------------------- part 1: search throughput

def _tiny_model(folder: Path):
    """The --quick model: a tiny random Llama folder with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from sieve_edge.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    if not (folder / "config.json").is_file():
        config = llama_config({**SHAPES["tiny"], "vocab_size": len(tok)})
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(folder)


def part_search(args) -> dict:
    import torch

    from sieve_edge.calibrate import iter_decompositions, load_decompositions, save_decompositions
    from sieve_edge.factorize import linear_shapes
    from sieve_edge.models import load_model, load_tokenizer
    from sieve_edge.search import SearchConfig, search_plan
    from sieve_edge.search.distributed import RayWorkers, require_ray
    from sieve_edge.search.drivers import ladder_max_ranks
    from sieve_edge.tasks import calibration_batches, load_task

    ray = require_ray()
    work = args.work or Path(tempfile.mkdtemp(prefix="sieve-scale-"))
    spec = _tiny_model(work / "tiny-model") if args.model == "tiny" else args.model
    task = load_task(args.task)
    torch.set_num_threads(args.threads)
    model, tok = load_model(spec), load_tokenizer(spec)
    config = SearchConfig(tolerance=args.tolerance, seed=args.seed, population=args.population,
                          generations=args.generations, val_limit=args.val_limit, race_size=args.race,
                          n_calibration=args.calibration)
    decs_dir = work / f"decompositions-{Path(str(spec)).name}-{args.calibration}"
    if not (decs_dir / "decompositions.json").is_file():
        decs_dir.mkdir(parents=True, exist_ok=True)
        deepest = ladder_max_ranks(linear_shapes(model), config)
        batches = list(calibration_batches(task, tok, config.n_calibration, config.calibration_batch))
        save_decompositions(decs_dir, iter_decompositions(model, batches, "output", lambda n, m, k: deepest[n]))
    decs, tokens, _ = load_decompositions(decs_dir)
    runs = {}
    for label, workers in (("1 process", None), (f"ray {args.workers} workers", args.workers)):
        pool = None
        if workers:
            ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
            pool = RayWorkers(workers=workers, model_spec=spec, decompositions=str(decs_dir))
        lines: list[str] = []
        t0 = time.perf_counter()
        res = search_plan(model, tok, task, config, decompositions=(decs, tokens), workers=pool,
                          log=lambda m: (lines.append(m), print(f"    {m}", flush=True)))
        wall = time.perf_counter() - t0
        if workers:
            ray.shutdown()
        gens = res.history  # one record per generation (generation 0: the initial population)
        n_gen = sum(r["evaluations"] for r in gens)
        s_gen = sum(r["seconds"] for r in gens)
        runs[label] = {"ranks": res.plan.ranks, "evaluations": res.evaluations, "metric": res.metric,
                       "reduction": res.plan.linear_param_reduction, "generation_candidates": n_gen,
                       "generation_seconds": s_gen, "search_seconds": res.seconds, "wall_seconds": wall,
                       "candidates_per_minute": 60 * n_gen / s_gen if s_gen else None,
                       "search_candidates_per_minute": 60 * res.evaluations / res.seconds if res.seconds else None}
    one, many = runs["1 process"], runs[f"ray {args.workers} workers"]
    return {"runs": runs, "same_plan": one["ranks"] == many["ranks"],
            "ratio": (many["candidates_per_minute"] / one["candidates_per_minute"]
                      if one["candidates_per_minute"] and many["candidates_per_minute"] else None),
            "settings": {k: getattr(args, k) for k in ("model", "task", "workers", "threads", "population",
                                                       "generations", "val_limit", "race", "calibration",
                                                       "tolerance", "seed")}}


# ---------------------------------------------------------------- part 3: offloaded scoring

def write_bases(folder: Path, model_folder: Path, shape: dict, seed: int = 0) -> Path:
    """Random search bases of the default ladder's deepest rank for every matrix of a synthetic
    model, as the calibrate stage writes them (``layer-NNN.safetensors``), one layer at a time.
    Their values do not matter here: scoring costs the same for any bases of these shapes."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from sieve_edge.calibrate import save_decompositions
    from sieve_edge.factorize import linear_shapes
    from sieve_edge.lowrank import Decomposition
    from sieve_edge.search import SearchConfig
    from sieve_edge.search.drivers import ladder_max_ranks

    if (folder / "decompositions.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(llama_config(shape))
    shapes = linear_shapes(skeleton)
    deepest = ladder_max_ranks(shapes, SearchConfig())
    gen = torch.Generator().manual_seed(seed)

    def layers():
        for i in range(shape["num_hidden_layers"]):
            decs = {}
            for name, (m, n) in shapes.items():
                if name.startswith(f"model.layers.{i}."):
                    k = deepest[name]
                    decs[name] = Decomposition(torch.randn(m, k, generator=gen) / m ** 0.5,
                                               torch.randn(k, n, generator=gen) / n ** 0.5,
                                               torch.linspace(1.0, 0.0, k, dtype=torch.float64), 1.0, "output")
            yield i, decs, 0

    save_decompositions(folder, layers())
    return folder


def peak_rss() -> int:
    """This process's peak RSS in bytes, from the package's VmHWM reader (``ru_maxrss``, which
    Linux carries over exec from the forked parent, only where /proc is missing): a parent
    that has just written a large synthetic model would otherwise inflate a child's figure."""
    from sieve_edge.runtime import peak_rss_mb

    return round(peak_rss_mb() * 2**20)


def score_one(model_folder: Path, bases: Path, mode: str, plans: int, rows: int) -> dict:
    """Run in a fresh child: score the dense model and ``plans`` random rank plans (seeded, the
    same in both modes) on ``rows`` sst2 validation prompts; ``mode`` = memory | DIR (offload)."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401 - counted in the baseline

    from sieve_edge.calibrate import DecompositionFiles, load_decompositions
    from sieve_edge.evaluate import make_scorer
    from sieve_edge.factorize import attach_search_, linear_shapes, set_ranks_
    from sieve_edge.models import load_model, load_tokenizer
    from sieve_edge.search import SearchConfig
    from sieve_edge.search.stage import param_ladder_ranks
    from sieve_edge.tasks import load_task

    tok = load_tokenizer("smollm2-135m")
    task = load_task("sst2")
    base = peak_rss()
    t0 = time.perf_counter()
    offloaded = offload_bytes = None
    if mode == "memory":
        model = load_model(str(model_folder))
        decs, _, _ = load_decompositions(bases)
        attach_search_(model, decs)
        del decs
    else:
        from sieve_edge.offload import OffloadedSearch, skeleton_with_resident_weights

        lazy = skeleton_with_resident_weights(model_folder)
        model = lazy.model
        offloaded = OffloadedSearch(Path(mode), weights=lazy)
        offloaded.attach(model, DecompositionFiles(bases))
        offload_bytes = sum(f.stat().st_size for f in Path(mode).glob("*.dat"))
    setup = time.perf_counter() - t0
    setup_peak = peak_rss()
    resident = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]
                                                          if t.device.type != "meta"}.values())
    scorer = make_scorer(tok, task, "validation", limit=rows, batch_size=16, model=model)
    ladder = param_ladder_ranks(linear_shapes(model), SearchConfig())
    gen = torch.Generator().manual_seed(0)
    candidates = [{}] + [{name: rs[int(torch.randint(len(rs), (1,), generator=gen))] for name, rs in ladder.items()}
                         for _ in range(plans)]
    seconds, logprobs = [], []
    for ranks in candidates:
        set_ranks_(model, ranks)
        t1 = time.perf_counter()
        logprobs.append(scorer.label_logprobs(model).float().tolist())
        seconds.append(time.perf_counter() - t1)
    if offloaded is not None:
        offloaded.detach(model)
    peak = peak_rss()
    return {"mode": "memory" if mode == "memory" else "offload", "baseline_rss": base, "setup_peak_rss": setup_peak,
            "peak_rss": peak, "setup_seconds": setup, "seconds": seconds,
            "seconds_per_evaluation": sum(seconds[1:]) / max(len(seconds) - 1, 1), "dense_seconds": seconds[0],
            "resident_bytes": resident, "offload_bytes": offload_bytes, "rows": scorer.n,
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "threads": torch.get_num_threads(), "logprobs": logprobs}


def module_bytes(shape: dict) -> dict[str, float]:
    """Float32 bytes of the largest SearchLinear (its dense matrix plus bases A, Bt at the default
    ladder's deepest rank: keep 0.9), of all of them (what is offloaded), and of the resident
    embedding (E, tied; twice for an untied head)."""
    from sieve_edge.lowrank import rank_for_keep

    d, i = shape["hidden_size"], shape["intermediate_size"]
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    mats = [(d, d), (kv, d), (kv, d), (d, d), (i, d), (i, d), (d, i)]
    one = [4 * (m * n + (rank_for_keep(m, n, 0.9, 8) or 0) * (m + n)) for m, n in mats]
    heads = 1 if shape.get("tie_word_embeddings", False) else 2
    return {"largest_module": max(one), "offloaded": sum(one) * shape["num_hidden_layers"],
            "resident": 4 * heads * shape["vocab_size"] * d}


def part_offload(args) -> dict:
    """Write the synthetic model and bases; score in memory and offloaded, each in a fresh child."""
    work = args.work or Path(tempfile.mkdtemp(prefix="sieve-scale-"))
    name = args.offload_shape
    shape = SHAPES[name]
    if shape["vocab_size"] < VOCAB_SMOLLM2:  # the prompts are SmolLM2's token ids
        shape, name = {**shape, "vocab_size": VOCAB_SMOLLM2}, f"{name}-v{VOCAB_SMOLLM2}"
    folder = write_synthetic(shape, work / name)
    bases = write_bases(work / f"{name}-bases", folder, shape)
    runs = {}
    # glibc's default mmap threshold grows with the blocks freed (up to 32 MB): the tensors each
    # module frees after its forward then stay in the heap. A fixed threshold returns them.
    fixed = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    for label, mode, extra in (("memory", "memory", {}), ("offload", str(work / f"{name}-offload"), {}),
                               (OFFLOAD_FIXED, str(work / f"{name}-offload"), fixed)):
        r = run_child(["--score-one", str(folder), str(bases), mode, "--plans", str(args.plans),
                       "--offload-rows", str(args.offload_rows)], f"scoring {name} ({label})", extra)
        runs[label] = {**r, "mode": label, "environment": extra}
        print(f"  {label}: peak RSS {r['peak_rss'] / GB:.2f} GB, {r['seconds_per_evaluation']:.1f} s/evaluation",
              flush=True)
    mem, off = runs["memory"], runs[OFFLOAD_FIXED]
    diff = max(abs(a - b) for run in runs.values() for pa, pb in zip(mem["logprobs"], run["logprobs"])
               for ra, rb in zip(pa, pb) for a, b in zip(ra, rb))
    for r in runs.values():
        r.pop("logprobs")
    return {"shape": name, "runs": runs, "max_logprob_difference": diff,
            "slowdown": {label: r["seconds_per_evaluation"] / mem["seconds_per_evaluation"] for label, r in runs.items()},
            "limit": offload_limit(off, shape),
            "settings": {"plans": args.plans, "rows": args.offload_rows, "bases_rank": "default ladder, keep 0.9"}}


def offload_limit(measured: dict, shape: dict) -> dict:
    """Offloaded scoring's peak ≈ base + R + M + A: R the resident embedding/head/norms, M the
    largest module with its bases (float32), A the activations and allocator slack, fitted on the
    measurement with a fixed mmap threshold (A = peak - base - R - M) and scaled by the
    intermediate size (the widest activation). Predicted for the extrapolation shapes
    (Llama-3.1-8B, Llama-3-70B, Llama-3.1-405B: untied heads)."""
    got = module_bytes(shape)
    base = measured["baseline_rss"]
    act = max(measured["peak_rss"] - base - measured["resident_bytes"] - got["largest_module"], 0)
    out = {"formula": "peak = base + R + M + A*(i/i_measured); R = 4*vocab*d (x2 untied head), "
                      "M = 4*(m*n + k*(m+n)) of the largest matrix at keep 0.9",
           "base_bytes": base, "activations_bytes": act, "rows": []}
    for label, s in {"measured": shape, **EXTRAPOLATE, "405b": dict(
            hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
            num_key_value_heads=8, vocab_size=128256)}.items():
        b = module_bytes(s)
        peak = base + b["resident"] + b["largest_module"] + act * s["intermediate_size"] / shape["intermediate_size"]
        out["rows"].append({"shape": label, "resident": b["resident"], "largest_module": b["largest_module"],
                            "offloaded_disk": b["offloaded"], "predicted_peak_rss": peak})
    return out


# ---------------------------------------------------------------- tables

def tables(result: dict) -> str:
    out = []
    s = result.get("search")
    if s:
        out += ["| scoring | candidates/min (generations) | candidates/min (whole search) | evaluations | plan |",
                "|---|---|---|---|---|"]
        for label, r in s["runs"].items():
            cpm = "-" if r["candidates_per_minute"] is None else f"{r['candidates_per_minute']:.1f}"
            spm = "-" if r["search_candidates_per_minute"] is None else f"{r['search_candidates_per_minute']:.1f}"
            out.append(f"| {label} | {cpm} | {spm} | {r['evaluations']} | -{r['reduction']:.1%} |")
        ratio = "-" if s["ratio"] is None else f"{s['ratio']:.2f}x"
        out += ["", f"same plan: {s['same_plan']}; ratio (generations): {ratio}", ""]
    c = result.get("calibration")
    if c:
        out += ["| shape | layers | d | i | peak RSS | s/layer | model fp32 |", "|---|---|---|---|---|---|---|"]
        for r in c["rows"]:
            out.append(f"| {r['shape']} | {r['num_hidden_layers']} | {r['hidden_size']} | {r['intermediate_size']} | "
                       f"{r['peak_rss'] / GB:.2f} GB | {r['seconds_per_layer']:.1f} | {r['fp32_model_bytes'] / GB:.1f} GB |")
        e = c["extrapolation"]
        if e:
            out += ["", f"extrapolation ({e['formula']}; k = {e['k']:.2f}, c = {e['c']:.3g} s, fitted on "
                        f"{e['fitted_on']}):", "", "| shape | layers | peak RSS | s/layer | hours |", "|---|---|---|---|---|"]
            for r in e["rows"]:
                measured = "" if r["measured_peak_rss"] is None else f" (measured {r['measured_peak_rss'] / GB:.2f})"
                out.append(f"| {r['shape']} | {r['layers']} | {r['predicted_peak_rss'] / GB:.2f} GB{measured} | "
                           f"{r['predicted_seconds_per_layer']:.1f} | {r['predicted_hours']:.2f} |")
    o = result.get("offload")
    if o:
        out += [f"offloaded scoring, {o['shape']} shape ({o['settings']['rows']} sst2 prompts per evaluation, "
                f"{o['settings']['plans']} random plans):", "",
                "| scoring | peak RSS | s/evaluation | dense s | setup s | in memory (model tensors) | on disk |",
                "|---|---|---|---|---|---|---|"]
        for label, r in o["runs"].items():
            disk = "-" if r["offload_bytes"] is None else f"{r['offload_bytes'] / GB:.2f} GB"
            out.append(f"| {label} | {r['peak_rss'] / GB:.2f} GB | {r['seconds_per_evaluation']:.1f} | "
                       f"{r['dense_seconds']:.1f} | {r['setup_seconds']:.0f} | {r['resident_bytes'] / GB:.2f} GB | {disk} |")
        lim = o["limit"]
        slow = ", ".join(f"{label} {x:.2f}x" for label, x in o["slowdown"].items() if label != "memory")
        out += ["", f"time per evaluation over memory: {slow}; largest label log-prob difference from memory "
                    f"{o['max_logprob_difference']:.2g}",
                "", f"predicted ({lim['formula']}; base {lim['base_bytes'] / GB:.2f} GB, "
                    f"A {lim['activations_bytes'] / GB:.2f} GB):", "",
                "| shape | R | M | offloaded to disk | peak RSS |", "|---|---|---|---|---|"]
        for r in lim["rows"]:
            out.append(f"| {r['shape']} | {r['resident'] / GB:.2f} GB | {r['largest_module'] / GB:.2f} GB | "
                       f"{r['offloaded_disk'] / GB:.0f} GB | {r['predicted_peak_rss'] / GB:.2f} GB |")
    return "\n".join(out)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.calibrate_one is not None:
        print(json.dumps(calibrate_one(args.calibrate_one, args.examples, args.tokens, args.method)))
        return {}
    if args.score_one is not None:
        model_folder, bases, mode = args.score_one
        print(json.dumps(score_one(Path(model_folder), Path(bases), mode, args.plans, args.offload_rows)))
        return {}
    t0 = time.time()
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_average_at_start": os.getloadavg()},
              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.combine:
        files = [Path(f.strip()) for f in args.combine.split(",") if f.strip()]
        result["calibration"] = combine_calibration(files, args)
        return publish(result, args.out)
    if args.part in ("both", "search"):
        print("part 1: search throughput", flush=True)
        result["search"] = part_search(args)
    if args.part in ("both", "calibration"):
        print("part 2: streamed calibration", flush=True)

        def save(partial):
            from sieve_edge.stages import write_json_atomic

            write_json_atomic(args.out, {**result, "calibration": partial, "partial": True})

        result["calibration"] = part_calibration(args, save)
    if args.part == "offload":
        print("part 3: offloaded scoring", flush=True)
        result["offload"] = part_offload(args)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    result["minutes"] = (time.time() - t0) / 60
    return publish(result, args.out)


def publish(result: dict, out: Path) -> dict:
    """Write the result file (atomically: a killed run never leaves half of one) and print its tables."""
    from sieve_edge.stages import write_json_atomic

    write_json_atomic(out, result)
    print(tables(result))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
