"""Thin click layer: parse, call one library function, print, exit code.

Exit codes: 0 ok, 1 error (a SieveEdgeError or bad usage), 3 a validation gate failed,
4 accuracy-only (``validate --emulate``: accuracy gates passed, latency and memory not measured).
Each command lives in its own function below; heavy modules are imported inside them so
that ``sieve-edge --help`` stays fast.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .errors import SieveEdgeError


def handle_errors(fn):
    """Turn library errors into one clear line on stderr and the error's exit code.

    A ``SieveEdgeError`` is the library saying what is wrong: ``error: <message>``, its exit
    code. Anything else is a bug or an input nothing checked: one line ``internal error:
    <type>: <message> (details in LOG)``, exit 1, and the traceback goes to LOG (never to
    the terminal). Click's own exceptions (usage errors, --help) and SystemExit pass through.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _terminate_like_ctrl_c()
        try:
            return fn(*args, **kwargs)
        except SieveEdgeError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except Terminated:
            click.echo("terminated (SIGTERM): rerun the same command to resume", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("interrupted: rerun the same command to resume", err=True)
            sys.exit(130)
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except Exception as e:  # noqa: BLE001 - the last line of defence: no traceback on the terminal
            log = write_error_log(e, fn.__name__)
            message = " ".join(str(e).split())
            message = message if len(message) <= 300 else message[:300] + " ..."
            where = f"details in {log}" if isinstance(log, str) else f"no log written: {log.args[0]}"
            click.echo(f"internal error: {type(e).__name__}: {message} ({where})", err=True)
            sys.exit(1)

    return wrapper


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler, ``make`` stopped): unwound like Ctrl-C, so that the
    running stage is recorded as interrupted and its partial output is removed."""


def _terminate_like_ctrl_c() -> None:
    import signal
    import threading

    def raise_terminated(signum, frame):
        raise Terminated()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)


def write_error_log(exc: BaseException, command: str):
    """Write ``exc``'s traceback (and the command line) to a new file under the cache's ``logs/``
    folder (``$SIEVE_EDGE_CACHE/logs``, else ``~/.cache/sieve-edge/logs``; the temp folder when
    neither is writable). Returns the path as a string, or an OSError when no file could be written."""
    import datetime as _dt
    import os
    import tempfile
    import traceback

    from . import __version__
    from .outputs import cache_dir

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = (f"sieve-edge {__version__}, command '{command}', pid {os.getpid()}, {stamp}\n"
            f"argv: {sys.argv!r}\n\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    error = OSError("no writable log folder")
    for folder in (cache_dir() / "logs", Path(tempfile.gettempdir()) / "sieve-edge-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"error-{stamp}-{os.getpid()}.log"
            path.write_text(text, encoding="utf-8")
            return str(path)
        except OSError as e:
            error = e
    return error


def print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))



_TRUST_REMOTE_CODE = click.option(
    "--trust-remote-code", is_flag=True,
    help="DANGEROUS: let transformers run Python code that the model folder names (auto_map); "
         "without it such a folder is refused.")

# rows held out of the search to confirm its plan: shared by search and run
_HOLDOUT = click.option("--holdout", type=click.IntRange(min=0), default=0, show_default=True,
                        help="Validation rows beyond --val-limit that the search never scores, held out to confirm "
                             "its plan: the largest plan within the tolerance on them too is kept. A search that "
                             "measures many plans near the tolerance keeps one that validation favoured by chance; "
                             "these rows score it afresh (0 = no holdout).")
# larger plans refit after the search: shared by search and run
_REFIT_TRIES = click.option("--refit-tries", type=click.IntRange(min=0), default=0, show_default=True,
                            help="After the search, refit up to N larger plans it measured (or plans made halfway "
                                 "between a try that passed and one that failed) with --method and keep "
                                 "the largest whose refit stays within the tolerance on validation. The search "
                                 "scores 'output' factors; the sequential 'sieve' refit often keeps more accuracy at "
                                 "the same ranks, which leaves tolerance unused. Each try is one refit (a calibration "
                                 "pass and a sequential fit). With --holdout, a try holds the tolerance on the "
                                 "held-out rows too; with --heal-steps, each try is healed before it is judged. "
                                 "--objective params only.")
# healing after the refit: shared by search and run
_HEAL_SLACK = click.option("--heal-slack", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
                           help="Let the search accept plans up to the tolerance + this slack (same units), then "
                                "heal them (--heal-steps, on their searched factors) and keep the largest that "
                                "heals back within the tolerance; the largest plan within it unhealed otherwise. "
                                "A rerun with another slack resumes a finished search at that tolerance.")
_HEAL_STEPS = click.option("--heal-steps", type=click.IntRange(min=0), default=0, show_default=True,
                           help="Fine-tune the factors this many steps on the train split after the refit.")
_HEAL_LR = click.option("--heal-lr", type=float, default=1e-4, show_default=True)
_HEAL_RANK = click.option(
    "--heal-rank", type=click.IntRange(min=0), default=0, show_default=True,
    help="0 = healing trains the factors themselves; R > 0 = it trains rank-R LoRA adapters on the factors and "
         "merges them in after: the same plan and shapes, R x (rows + cols) trainable parameters per factor, "
         "optimizer state to match (for a model whose factors' AdamW state does not fit). Adapters want a "
         "higher --heal-lr (3e-4 at rank 16 on sst2).")
_HEAL = click.option("--heal", "heal", type=click.Choice(["ce", "kl"]), default="ce", show_default=True,
                     help="Healing loss: ce = the answers' cross-entropy on the train split; kl = distil the dense "
                          "model's label distribution on the train prompts (single-token labels). Kept only if "
                          "validation improves.")

_DEVICE = click.option(
    "--device", default="auto", show_default=True, metavar="auto|cpu|cuda",
    help="Where the model runs: calibration statistics, eigendecompositions, candidate scoring, training. "
         "auto = CUDA when torch sees it, else the CPU; cuda:N picks one GPU.")
_WORKERS = click.option(
    "--workers", type=click.IntRange(min=1), default=None,
    help="Score search candidates on N Ray actors (a local Ray cluster unless --ray names one); each loads the "
         "model once and gets cores/N threads. Same seed, same plan. Needs: pip install 'sieve-edge[ray]'.")
_RAY = click.option(
    "--ray", "ray_address", default=None, metavar="auto|ADDRESS",
    help="Score search candidates on a running Ray cluster ('auto', or the head's HOST:PORT); one actor per node "
         "unless --workers says how many. Nodes need sieve-edge and the model and stage files at the same paths.")

_OFFLOAD = click.option(
    "--offload", default=None, type=click.Path(file_okay=False), metavar="DIR",
    help="Score search candidates with the matrices and their search bases on disk in DIR (scratch: created, "
         "then emptied after the search; a non-empty folder sieve-edge did not make is refused), read one at a "
         "time during the forward pass: for models larger than memory. Slower, the same plan. Not with "
         "--workers/--ray. On glibc, MALLOC_MMAP_THRESHOLD_=131072 in the environment keeps freed tensors from "
         "staying in the heap (docs/SCALE.md).")


def check_device(device: str | None) -> None:
    """--device fails now, before minutes of loading, when it names a device that is not here."""
    from .models import pick_device

    pick_device(device)


def check_offload(offload: str | None, workers: int | None, ray_address: str | None) -> None:
    """--offload fails now, before anything loads: with --workers/--ray, or on a folder it may not use."""
    if offload is None:
        return
    from .search.stage import check_offload as check

    check(offload, workers if workers is not None else ray_address)


def ray_workers(ray_address: str | None, workers: int | None):
    """The RayWorkers of --ray / --workers (None when neither is given); ray must be installed."""
    if ray_address is None and workers is None:
        return None
    from .search.distributed import RayWorkers, require_ray

    spec = RayWorkers(address=ray_address, workers=workers)
    require_ray()
    return spec


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sieve-edge")
def main():
    """Make a language model small and fast for one task, and ship it to CPU edge boxes."""


# ---- commands are added below, one function each ----


@main.command("eval")
@click.option("--model", "model_spec", required=True, help="Folder, checkpoint, GGUF file, alias or hub id.")
@click.option("--task", "task_spec", required=True, help="Task TOML path, or a sample task name (sst2, sms_spam, snips).")
@click.option("--split", default="test", show_default=True,
              help="train, calibration, validation, test, or extra:NAME for an [[extra_test]] of the task.")
@click.option("--extra", "with_extra", is_flag=True, help="Also score every [[extra_test]] of the task.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Score N rows of each set, drawn as the task's [data] sample says (default: the first N).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help='Print {"task","split","metric","value","n","truncated","max_prompt_tokens","sample"} as JSON '
                   "(a list with --extra).")
@_TRUST_REMOTE_CODE
@handle_errors
def eval_command(model_spec, task_spec, split, with_extra, limit, batch_size, as_json, trust_remote_code):
    """Score a model on one split of a task (accuracy, exact match or perplexity)."""
    from .evaluate import evaluate, score_extra_tests
    from .models import load_model, load_tokenizer
    from .tasks import load_task

    task = load_task(task_spec)
    task.split_path(split)  # an unknown split or extra test fails before the model loads
    tokenizer = load_tokenizer(model_spec, trust_remote_code=trust_remote_code)
    model = load_model(model_spec, trust_remote_code=trust_remote_code)
    results = [evaluate(model, tokenizer, task, split=split, limit=limit, batch_size=batch_size)]
    if with_extra:
        results += [r for r in score_extra_tests(model, tokenizer, task, limit=limit, batch_size=batch_size).values()
                    if r.split != split]
    if as_json:
        print_json([r.to_dict() for r in results] if with_extra else results[0].to_dict())
        return
    for result in results:
        value = f"{result.value:.4f}" if result.metric != "accuracy" else f"{100 * result.value:.2f}%"
        cut = f" ({result.truncated} prompts truncated to {result.max_prompt_tokens} tokens)" if result.truncated else ""
        click.echo(f"{result.task} {result.split}: {result.metric} {value} on {result.n} examples{cut}")


@main.command("tune")
@click.option("--model", "model_spec", required=True, help="Folder, checkpoint, GGUF file, alias or hub id.")
@click.option("--task", "task_spec", required=True, help="Task TOML path, or a sample task name.")
@click.option("--out", required=True, help="Output checkpoint folder.")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate [default: 5e-5, or 5e-4 with --lora].")
@click.option("--lora", is_flag=True, help="Train LoRA adapters (rank 8) and merge them into the weights.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Train on N rows of the train split, drawn as the task's [data] sample says.")
@click.option("--force", is_flag=True, help="Replace an existing checkpoint in --out.")
@_DEVICE
@_TRUST_REMOTE_CODE
@handle_errors
def tune_command(model_spec, task_spec, out, steps, batch_size, lr, lora, seed, limit, force, device,
                 trust_remote_code):
    """Fine-tune a model on a task's train split (loss on answer tokens) and save it."""
    from .checkpoint import model_bytes
    from .models import load_model, load_tokenizer
    from .outputs import check_room
    from .tasks import load_task
    from .tune import DEFAULT_LR, check_output, save_tuned, tune

    check_output(out, force)  # before the long part
    check_device(device)
    task = load_task(task_spec)
    tokenizer = load_tokenizer(model_spec, trust_remote_code=trust_remote_code)
    model = load_model(model_spec, device=device, trust_remote_code=trust_remote_code)
    check_room(out, model_bytes(model))  # the disk must hold the tuned copy: known now, before the steps
    lr = DEFAULT_LR[lora] if lr is None else lr
    model = tune(model, tokenizer, task, steps=steps, batch_size=batch_size, lr=lr, lora=lora, seed=seed, limit=limit)
    path = save_tuned(model, tokenizer, out, base_model=str(model_spec), task=task.name, steps=steps, lora=lora,
                      lr=lr, batch_size=batch_size, seed=seed, force=force)
    click.echo(f"saved tuned model to {path}")


@main.command()
@click.option("--model", required=True, help="Model: HF folder, checkpoint, GGUF file, alias or hub id.")
@click.option("--task", required=True, help="Task TOML path or sample name (sst2, sms_spam, snips).")
@click.option("--method", type=click.Choice(["svd", "input-pca", "output", "sieve"]), default="sieve",
              show_default=True)
@click.option("--keep", type=float, help="One keep fraction of the dense parameters for every matrix.")
@click.option("--plan", "plan_file", help="A plan.json (per-matrix ranks).")
@click.option("--calibration", "n_calibration", type=int, default=512, show_default=True,
              help="Calibration examples from the task's calibration split.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, metavar="auto|cpu|cuda",
              help="auto, cpu, cuda, cuda:1, mps (default auto: CUDA when torch sees it, else the CPU).")
@click.option("--decompositions", type=click.Path(file_okay=False, exists=True), default=None,
              help="A calibrate stage's folder of this model and task (OUT.work/calibrate of `run`, "
                   "OUT/.stages/calibrate of `search`): reuse its factors instead of calibrating "
                   "(methods output, input-pca, svd).")
@click.option("--out", required=True, help="Output checkpoint folder.")
@click.option("--force", is_flag=True, help="Replace an existing checkpoint in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the checkpoint manifest as JSON.")
@_TRUST_REMOTE_CODE
@handle_errors
def prune(model, task, method, keep, plan_file, n_calibration, batch_size, seed, device, decompositions, out, force,
          as_json, trust_remote_code):
    """Factorize every linear matrix to low rank, calibrated on the task; write a checkpoint."""
    from .prune import prune_checkpoint

    check_device(device)
    manifest = prune_checkpoint(model, task, out, method=method, keep=keep, plan_file=plan_file,
                                n_calibration=n_calibration, batch_size=batch_size, seed=seed, device=device,
                                force=force, decompositions=decompositions, trust_remote_code=trust_remote_code)
    if as_json:
        print_json({k: v for k, v in manifest.items() if k not in ("ranks", "shapes")})
    else:
        click.echo(f"wrote {out}: {method}, {len(manifest['ranks'])} of {len(manifest['shapes'])} matrices "
                   f"factorized, linear parameters -{manifest['linear_param_reduction']:.1%} "
                   f"({manifest['linear_params_dense']:,} -> {manifest['linear_params']:,})")


@main.command("search")
@click.option("--model", "model_spec", required=True, help="Folder, checkpoint, GGUF file, alias or hub id.")
@click.option("--task", "task_spec", required=True, help="Task TOML path, or a sample task name.")
@click.option("--tolerance", type=float, default=0.01, show_default=True,
              help="Allowed validation-metric drop, in (0, 1): 0.01 = one point (or 1%% with --relative).")
@click.option("--relative", is_flag=True, help="Tolerance as a fraction of the dense model's metric.")
@click.option("--method", type=click.Choice(["svd", "input-pca", "output", "sieve"]), default="sieve",
              show_default=True, help="Refit method of the final checkpoint (the search scores 'output' factors).")
@click.option("--strategy", type=click.Choice(["ga", "uniform"]), default="ga", show_default=True,
              help="Genetic algorithm per matrix, or bisection on one keep fraction for all.")
@click.option("--objective", type=click.Choice(["params", "time", "latency"]), default="params", show_default=True,
              help="What the plan minimises: linear parameters, or time per example on --target's runtime and "
                   "workload (a cost table measured once, then cached; latency = time).")
@click.option("--target", default=None,
              help="Target profile (name or TOML) whose runtime, threads and [workload] the time objective measures.")
@click.option("--budget-minutes", type=float, default=None,
              help="Time for the search proper: scoring candidates and breeding (not loading, calibration, "
                   "decomposition, the sensitivity pass or the dense model's scores). When it ends, the best plan "
                   "scored so far is kept and the command succeeds.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--population", type=click.IntRange(min=2), default=16, show_default=True)
@click.option("--generations", type=click.IntRange(min=0), default=12, show_default=True)
@click.option("--ladder", default=None, help="Keep levels, comma separated, from 1.0 down (default 1.0,0.9,...,0.1).")
@click.option("--calibration", "n_calibration", type=click.IntRange(min=1), default=512, show_default=True,
              help="Calibration examples for the decompositions and the refit.")
@click.option("--val-limit", type=click.IntRange(min=1), default=300, show_default=True,
              help="Validation examples each candidate is scored on.")
@click.option("--race", "race_size", type=click.IntRange(min=0), default=64, show_default=True,
              help="First racing subset: a candidate is scored on this many validation rows, then twice as many, "
                   "..., and stops as soon as a one-sided test puts it clearly within or beyond the tolerance "
                   "(0 = score every candidate on the whole validation set). The chosen plan is always confirmed "
                   "on the whole set.")
@click.option("--race-z", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="z of the racing tests: each early decision errs with probability about Φ(-z) (2.3%% at 2).")
@click.option("--surrogate/--no-surrogate", default=True, show_default=True,
              help="GA: screen thousands of plans per generation on a surrogate of the metric drop (label-Fisher "
                   "costs refit on every measured plan) and score only the most promising on the model.")
@click.option("--test-limit", type=click.IntRange(min=1), default=None, help="Score only the first N test rows.")
@_HOLDOUT
@_REFIT_TRIES
@_HEAL_STEPS
@_HEAL_SLACK
@_HEAL_LR
@_HEAL_RANK
@_HEAL
@click.option("--weights", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="Score candidates as the export will compute: int8 simulates int8 weights (NNCF INT8_ASYM).")
@click.option("--out", required=True, help="Output folder: the refit checkpoint and the search's reports.")
@click.option("--force", is_flag=True,
              help="Start the search over even if --out holds an unfinished or finished one (also one of another "
                   "model, task or settings); a calibration that matches is reused.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (search.json) as JSON.")
@_DEVICE
@_WORKERS
@_RAY
@_OFFLOAD
@_TRUST_REMOTE_CODE
@handle_errors
def search_command(model_spec, task_spec, tolerance, relative, method, strategy, objective, target, budget_minutes,
                   seed, population, generations, ladder, n_calibration, val_limit, race_size, race_z, surrogate,
                   test_limit, holdout, refit_tries, heal_steps, heal_slack, heal_lr, heal_rank, heal, weights, out,
                   force, as_json, device, workers, ray_address, offload, trust_remote_code):
    """Search a keep level per matrix within an accuracy tolerance; write the refit checkpoint.

    Stages: calibrate → sensitivity → search → reference → refit, kept in OUT/.stages.
    Rerunning the same command after an interruption resumes the search from its last
    generation and reuses a finished calibration.
    """
    from .errors import InputError
    from .progress import log
    from .search import DEFAULT_LADDER, SearchConfig, run_search

    check_device(device)
    check_offload(offload, workers, ray_address)
    pool = ray_workers(ray_address, workers)
    if objective != "params" and target is None:
        click.echo(f"note: --objective {objective} without --target times torch matmuls on this CPU", err=True)
    try:
        levels = DEFAULT_LADDER if ladder is None else tuple(float(x) for x in ladder.split(","))
    except ValueError:
        raise InputError(f"--ladder must be comma-separated numbers, got {ladder!r}") from None
    config = SearchConfig(tolerance=tolerance, relative=relative, method=method, strategy=strategy,
                          objective=objective, target=target, seed=seed, population=population,
                          generations=generations, ladder=levels, n_calibration=n_calibration, val_limit=val_limit,
                          race_size=race_size, race_z=race_z, surrogate=surrogate, heal_steps=heal_steps,
                          heal_lr=heal_lr, heal=heal, heal_rank=heal_rank, weights=weights, holdout=holdout,
                          heal_slack=heal_slack, refit_tries=refit_tries)
    summary = run_search(model_spec, task_spec, out, config, budget_minutes=budget_minutes, force=force,
                         test_limit=test_limit, log=log, trust_remote_code=trust_remote_code, workers=pool,
                         device=device, offload=offload)
    if as_json:
        print_json(summary)
    else:
        t = summary.get("time")
        ms = (f", {t['dense']['example_ms']:.2f} -> {t['plan']['example_ms']:.2f} ms per example in the matrices"
              if t else "")
        click.echo(f"wrote {out}: {strategy} plan, linear parameters -{summary['linear_param_reduction']:.1%}{ms}, "
                   f"validation {summary['metric']} {summary['validation']['final']:.4f} "
                   f"(dense {summary['validation']['dense']:.4f}), test {summary['test']['pruned']:.4f} "
                   f"(dense {summary['test']['dense']:.4f}), {summary['evaluations']} evaluations, "
                   f"{summary['search_seconds'] / 60:.1f} min")


@main.command("export")
@click.option("--model", "model_dir", required=True,
              help="Factorized checkpoint folder, Hugging Face folder, or model alias.")
@click.option("--format", "fmt", required=True, type=click.Choice(["onnx", "openvino"]))
@click.option("--weights", default="fp32", show_default=True, type=click.Choice(["fp32", "int8"]))
@click.option("--int4", is_flag=True, help="4-bit weights (MatMulNBits / NNCF int4) instead of --weights.")
@click.option("--task", default=None, help="Task name or TOML: its prompts drive the checks, its metric is reported.")
@click.option("--task-head/--no-task-head", default=None,
              help="Restrict the LM head to the task's label tokens. Default: on for a classification "
                   "--task whose label answers are single tokens (the same predictions, a fraction of the cost).")
@click.option("--no-fuse", is_flag=True,
              help="Keep one MatMul per matrix (default: matrices reading one input, q/k/v and gate/up, "
                   "run their first factors / dense rows as one MatMul).")
@click.option("--densify", default=None,
              help="'auto' (keep dense every pair the micro-benchmark finds not faster) or comma-separated module names.")
@click.option("--densify-tokens", default=20, show_default=True, help="Tokens per forward pass --densify auto times.")
@click.option("--limit", default=100, show_default=True, help="Task examples scored for the int8/int4 metric.")
@click.option("--no-check", is_flag=True, help="Skip the fidelity check (not recommended).")
@click.option("--out", required=True, help="Output folder (written atomically).")
@click.option("--force", is_flag=True, help="Replace an existing export at --out.")
@_TRUST_REMOTE_CODE
@handle_errors
def export_cmd(model_dir, fmt, weights, int4, task, task_head, no_fuse, densify, densify_tokens, limit, no_check, out,
               force, trust_remote_code):
    """Export a model to ONNX or OpenVINO (KV cache), optionally int8/int4, checked against torch."""
    from .export import export_model

    if densify and densify != "auto":
        densify = [n.strip() for n in densify.split(",") if n.strip()]
    result = export_model(model_dir, fmt, weights, out, int4=int4, task=task, task_head=task_head,
                          fuse=not no_fuse, check=not no_check, force=force, densify=densify,
                          densify_tokens=densify_tokens, metric_limit=limit, trust_remote_code=trust_remote_code,
                          log=lambda m: click.echo(m, err=True))
    m = result.manifest
    fid = m["fidelity"]
    summary = {"out": str(result.path), "format": m["format"], "weights": m["weights"],
               "fp32_max_abs_logit_diff": (fid.get("fp32") or {}).get("max_abs_diff"),
               "size_bytes": sum(m["files"].values())}
    if m["weights"] in fid:
        q = fid[m["weights"]]
        summary.update({"metric": q.get("metric"), "torch": q.get("torch"), "exported": q.get("exported"),
                        "prediction_agreement": q.get("prediction_agreement")})
    if "quantization" in m:
        summary["quantization"] = m["quantization"]["chosen"]
    summary["task_head"] = m["task_head_choice"]
    if m.get("fusion"):
        summary["matmuls_per_layer"] = {"unfused": m["fusion"]["matmuls_per_layer_before"][:1],
                                        "exported": m["graph_matmuls_per_layer"][:1]}
    if "tokenizer_conversion" in m and not m["tokenizer_conversion"]["ok"]:
        summary["tokenizer_conversion"] = m["tokenizer_conversion"]["error"]
    print_json(summary)


@main.command("validate")
@click.option("--bundle", "bundle_dir", required=True, help="Bundle folder (from `sieve-edge bundle`).")
@click.option("--target", required=True, help="Target profile: a name in targets/ or a .toml path.")
@click.option("--task", default=None, help="Score this task TOML instead of the bundle's (no metric gate then).")
@click.option("--out", default=None, help="Report folder (default: BUNDLE/reports/<target>).")
@click.option("--limit", type=int, default=None, help="Score only the first N test examples.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the summary.")
@click.option("--emulate", is_flag=True,
              help="Run the runner under QEMU's emulation of the target's CPU architecture (aarch64 on an x86_64 "
                   "host; set up once with `sieve-edge emulator setup`) and natively, and compare: accuracy only.")
@click.option("--emulate-cpu", default=None, metavar="MODEL",
              help="QEMU CPU model for --emulate (default cortex-a72; e.g. cortex-a76, neoverse-n1, max): its "
                   "features decide which runtime kernels run.")
@handle_errors
def validate_command(bundle_dir, target, task, out, limit, as_json, emulate, emulate_cpu):
    """Run a bundle's runner for a target in a child process and apply every gate.

    Exit codes: 0 every gate passed; 3 a gate failed or could not be checked; 4 accuracy-only
    (--emulate: the accuracy gates and the arm64-vs-x86 comparison passed, latency and memory
    are not measured under emulation, so this is never a pass); 1 an error (e.g. a target of
    another CPU architecture without --emulate, or --emulate without the emulator set up).
    """
    from .errors import InputError
    from .validate import validate

    if emulate_cpu and not emulate:
        raise InputError("--emulate-cpu needs --emulate")
    report = validate(bundle_dir, target, task=task, out=out, limit=limit, log=lambda m: click.echo(m, err=True),
                      emulate=emulate, emulate_cpu=emulate_cpu)
    if as_json:
        print_json(report.to_dict())
    else:
        click.echo(report.paths["md"].read_text(encoding="utf-8"))
        click.echo(f"reports: {report.paths['md'].parent}", err=True)
    if report.status == "accuracy-only":  # not an error, and not a pass: its own exit code
        from .errors import AccuracyOnly

        click.echo(report.message(), err=True)
        sys.exit(AccuracyOnly.exit_code)
    report.check()


@main.command("bundle")
@click.option("--export", "export_dir", required=True, help="Export folder (from `sieve-edge export`).")
@click.option("--task", required=True, help="Task name in samples/tasks/ or a .toml path.")
@click.option("--target", required=True, help="Target profile: a name in targets/ or a .toml path.")
@click.option("--out", required=True, help="Bundle folder to write (atomically).")
@click.option("--reference", default=None,
              help="JSON with the dense model's test metric ({\"metric\", \"value\", ...}).")
@click.option("--reference-model", default=None,
              help="Measure the dense reference now with torch on this model (folder, GGUF or alias).")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@_TRUST_REMOTE_CODE
@handle_errors
def bundle_command(export_dir, task, target, out, reference, reference_model, force, trust_remote_code):
    """Assemble a deployable bundle: model, tokenizer, task, profile, reference, card, torch-free runner."""
    from .bundle import dense_reference, make_bundle
    from .errors import InputError
    from .outputs import check_output
    from .runtime import file_sha256

    if reference and reference_model:
        raise InputError("give --reference or --reference-model, not both")
    if reference_model:
        check_output(out, "bundle", force=force)  # before minutes of measuring
        reference = dense_reference(reference_model, task, trust_remote_code=trust_remote_code)
    path = make_bundle(export_dir, task, target, out, reference=reference, force=force,
                       trust_remote_code=trust_remote_code, log=lambda m: click.echo(m, err=True))
    # bundle.json lists the sha256 of every file; its own sha256, kept apart, vouches for it
    print_json({"bundle": str(path), "runner": str(path / "runner.py"),
                "check_on_device": f"python {path / 'runner.py'}",
                "bundle_json_sha256": file_sha256(path / "bundle.json")})


@main.command()
@click.option("--model", required=True, help="Model: HF folder, GGUF file, alias (smollm2-135m) or hub id.")
@click.option("--task", required=True, help="Task TOML path or sample name (sst2, sms_spam, snips).")
@click.option("--target", required=True, help="Target profile TOML path or name (factory-pc, kiosk, ...).")
@click.option("--out", required=True, help="The bundle folder to write.")
@click.option("--tune-steps", type=int, default=0, show_default=True,
              help="Fine-tune on the train split first (small models are weak zero-shot).")
@click.option("--tolerance", type=float, default=None,
              help="Allowed validation metric drop for the search (default: half the target's max_metric_drop).")
@click.option("--strategy", type=click.Choice(["ga", "uniform"]), default="ga", show_default=True)
@click.option("--objective", type=click.Choice(["time", "params", "latency"]), default=None,
              help="What the plan minimises. Default: time, the target's measured milliseconds per example "
                   "(its runtime, weights, threads and [workload]; a cost table measured once per target, then "
                   "cached), or params for a target whose CPU this host cannot time (another architecture). "
                   "params: linear parameters. latency = time.")
@click.option("--method", type=click.Choice(["svd", "input-pca", "output", "sieve"]), default="sieve",
              show_default=True)
@click.option("--budget-minutes", type=float, default=None,
              help="Time for the search stage proper: scoring candidates and breeding (not tuning, loading, "
                   "calibration, decomposition, the sensitivity pass or the dense scores). When it ends, the best "
                   "plan scored so far is kept; rerunning with a larger budget continues the search.")
@click.option("--calibration", "n_calibration", type=int, default=512, show_default=True)
@click.option("--val-limit", type=int, default=300, show_default=True,
              help="Validation examples the search scores per candidate.")
@click.option("--test-limit", type=int, default=None, help="Test examples for the reference and validation.")
@_HOLDOUT
@_REFIT_TRIES
@_HEAL_STEPS
@_HEAL_SLACK
@_HEAL_LR
@_HEAL_RANK
@_HEAL
@click.option("--task-head/--no-task-head", default=None,
              help="Export an LM head restricted to the label tokens. Default: on for a classification task "
                   "whose label answers are single tokens (the same predictions, a fraction of the cost).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Redo every stage, even those already done (the search starts over).")
@click.option("--work", type=click.Path(file_okay=False), default=None,
              help="Stage folder (default: OUT.work). Share it between targets to tune and calibrate once "
                   "(and search once with --objective params).")
@_DEVICE
@_WORKERS
@_RAY
@_OFFLOAD
@_TRUST_REMOTE_CODE
@handle_errors
def run(model, task, target, out, tune_steps, tolerance, strategy, objective, method, budget_minutes, n_calibration,
        val_limit, test_limit, holdout, refit_tries, heal_steps, heal_slack, heal_lr, heal_rank, heal, task_head, seed,
        force, work, device, workers, ray_address, offload, trust_remote_code):
    """tune? → calibrate → sensitivity → search → refit → export → reference → bundle → validate.

    Every stage has a key made of its settings, the content of what it reads (model, task
    TOML and data files, profile) and the keys of the stages it consumes. A rerun skips the
    stages whose key matches and whose output verifies, reruns the others and what follows
    them (OUT.work/run.json says which and why); a killed run resumes. validate always runs.
    """
    from .errors import GateFailure
    from .pipeline import run as run_pipeline
    from .progress import log

    check_device(device)
    check_offload(offload, workers, ray_address)
    pool = ray_workers(ray_address, workers)
    summary = run_pipeline(model, task, target, out, tune_steps=tune_steps, tolerance=tolerance,
                           strategy=strategy, objective=objective, method=method, budget_minutes=budget_minutes,
                           seed=seed, n_calibration=n_calibration, val_limit=val_limit, test_limit=test_limit,
                           holdout=holdout, refit_tries=refit_tries, heal_steps=heal_steps, heal_slack=heal_slack,
                           heal_lr=heal_lr, heal=heal, heal_rank=heal_rank,
                           task_head=task_head,
                           force=force, work=work, log=log,
                           trust_remote_code=trust_remote_code, workers=pool, device=device, offload=offload)
    click.echo(summary.table())
    report = summary.report or {}
    md = (report.get("paths") or {}).get("markdown")
    if md:
        click.echo(f"\nreport: {md}")
    if report.get("status") != "pass":
        raise GateFailure(summary.stages[-1].detail)


@main.group("task")
def task_group():
    """Look at a task file before a long run."""


@task_group.command("show")
@click.argument("task_spec", metavar="TASK")
@click.option("--model", "model_spec", default=None,
              help="Model whose tokenizer (and context window) to use [default: the smollm2-135m alias].")
@click.option("--n", "n_examples", type=click.IntRange(min=0), default=3, show_default=True,
              help="Formatted prompts to print.")
@click.option("--split", default=None, help="Split whose prompts to print (default: test).")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@handle_errors
def task_show(task_spec, model_spec, n_examples, split, as_json):
    """The formatted prompts, answer token ids per label, split sizes, label balance and
    prompt-length percentiles of TASK (a TOML path or a sample name)."""
    from .errors import ModelLoadError
    from .models import load_tokenizer
    from .tasks import describe_task, format_task_summary, load_task, model_context

    task = load_task(task_spec)
    if split is not None:
        task.split_path(split)
    if model_spec is None:
        try:
            model_spec = "smollm2-135m"
            context = model_context(model_spec)
        except ModelLoadError as e:
            raise ModelLoadError(f"task show needs a tokenizer: pass --model (a folder, GGUF file, alias or hub "
                                 f"id); the default alias is not usable here: {e}") from None
    else:
        context = model_context(model_spec)
    tokenizer = load_tokenizer(model_spec)
    summary = describe_task(task, tokenizer, context=context, n=n_examples, split=split)
    summary["model"] = model_spec
    if as_json:
        print_json(summary)
    else:
        click.echo(f"tokenizer and context window of {model_spec}")
        click.echo(format_task_summary(summary))


@main.group("emulator")
def emulator_group():
    """The ARM64 emulator behind `validate --emulate`: QEMU user mode + an ARM64 Python + the runtimes' wheels."""


_ARCH_OPTION = click.option("--arch", default="aarch64", show_default=True, type=click.Choice(["aarch64"]),
                            help="Architecture to emulate.")


@emulator_group.command("setup")
@_ARCH_OPTION
@click.option("--suite", default=None, help="Debian suite of the ARM64 Python and QEMU [default: trixie].")
@click.option("--mirror", default=None, help="Debian mirror URL [default: https://deb.debian.org/debian].")
@click.option("--runtime", "runtimes", multiple=True, type=click.Choice(["onnxruntime", "openvino"]),
              help="Runtime wheels to install (repeatable; default: those installed here).")
@click.option("--force", is_flag=True, help="Rebuild even if the emulator is already set up.")
@click.option("--json", "as_json", is_flag=True, help="Print emulator.json.")
@handle_errors
def emulator_setup(arch, suite, mirror, runtimes, force, as_json):
    """Download and cache QEMU, an ARM64 Python and the runtimes' ARM64 wheels (the only step that uses the network)."""
    from .emulate import DEFAULT_MIRROR, DEFAULT_SUITE, setup_emulator
    from .progress import log

    info = setup_emulator(arch, suite or DEFAULT_SUITE, mirror or DEFAULT_MIRROR, runtimes or None, force, log=log)
    if as_json:
        print_json(info)
    else:
        click.echo(f"{arch} emulator in {info['dir']}: {info['bytes'] / 2**20:.0f} MB on disk; Python "
                   f"{info['python_version']}, {info['qemu_version']}, "
                   + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))


@emulator_group.command("status")
@_ARCH_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@handle_errors
def emulator_status_command(arch, as_json):
    """Show whether the emulator is set up, where, its size and versions (exit 1 if it is not)."""
    from .emulate import emulator_status

    st = emulator_status(arch)
    if as_json:
        print_json(st)
    elif st["installed"]:
        click.echo(f"{arch} emulator: {st['dir']} ({st['bytes'] / 2**20:.0f} MB), Debian {st['suite']}, Python "
                   f"{st['python']}, {st['qemu_version']}")
        click.echo("  " + ", ".join(f"{k} {v}" for k, v in st["versions"].items()))
        click.echo(f"  CPU models (--emulate-cpu, default {st['default_cpu']}): {', '.join(st['cpus'] or [])}")
        for name, v in st["stale"].items():
            click.echo(f"  warning: {name} {v['emulator']} here vs {v['host']} on the host: "
                       "rerun `sieve-edge emulator setup --force`", err=True)
    else:
        click.echo(st["problem"], err=True)
    if not st["installed"]:
        sys.exit(1)


@emulator_group.command("remove")
@_ARCH_OPTION
@handle_errors
def emulator_remove(arch):
    """Delete the cached emulator."""
    from .emulate import emulator_dir, remove_emulator

    freed = remove_emulator(arch)
    click.echo(f"removed {emulator_dir(arch)} ({freed / 2**20:.0f} MB freed)" if freed else
               f"nothing to remove at {emulator_dir(arch)}")

