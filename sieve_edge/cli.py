"""Thin click layer: parse, call one library function, print, exit code.

Exit codes: 0 ok, 1 error (a SieveEdgeError or bad usage), 3 a validation gate failed.
Each command lives in its own function below; heavy modules are imported inside them so
that ``sieve-edge --help`` stays fast.
"""
from __future__ import annotations

import functools
import json
import sys

import click

from .errors import SieveEdgeError


def handle_errors(fn):
    """Turn library errors into one clear line on stderr and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SieveEdgeError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: rerun the same command to resume", err=True)
            sys.exit(130)

    return wrapper


def print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sieve-edge")
def main():
    """Make a language model small and fast for one task, and ship it to CPU edge boxes."""


# ---- commands are added below, one function each ----


@main.command("eval")
@click.option("--model", "model_spec", required=True, help="Folder, checkpoint, GGUF file, alias or hub id.")
@click.option("--task", "task_spec", required=True, help="Task TOML path, or a sample task name (sst2, sms_spam, snips).")
@click.option("--split", default="test", show_default=True,
              type=click.Choice(["train", "calibration", "validation", "test"]))
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N rows.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--json", "as_json", is_flag=True, help='Print {"task","split","metric","value","n"} as JSON.')
@handle_errors
def eval_command(model_spec, task_spec, split, limit, batch_size, as_json):
    """Score a model on one split of a task (accuracy, exact match or perplexity)."""
    from .evaluate import evaluate
    from .models import load_model, load_tokenizer
    from .tasks import load_task

    task = load_task(task_spec)
    tokenizer = load_tokenizer(model_spec)
    model = load_model(model_spec)
    result = evaluate(model, tokenizer, task, split=split, limit=limit, batch_size=batch_size)
    if as_json:
        print_json(result.to_dict())
    else:
        value = f"{result.value:.4f}" if result.metric != "accuracy" else f"{100 * result.value:.2f}%"
        click.echo(f"{result.task} {result.split}: {result.metric} {value} on {result.n} examples")


@main.command("tune")
@click.option("--model", "model_spec", required=True, help="Folder, checkpoint, GGUF file, alias or hub id.")
@click.option("--task", "task_spec", required=True, help="Task TOML path, or a sample task name.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output checkpoint folder.")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate [default: 5e-5, or 5e-4 with --lora].")
@click.option("--lora", is_flag=True, help="Train LoRA adapters (rank 8) and merge them into the weights.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing checkpoint in --out.")
@handle_errors
def tune_command(model_spec, task_spec, out, steps, batch_size, lr, lora, seed, force):
    """Fine-tune a model on a task's train split (loss on answer tokens) and save it."""
    from .models import load_model, load_tokenizer
    from .tasks import load_task
    from .tune import DEFAULT_LR, check_output, save_tuned, tune

    check_output(out, force)  # before the long part
    task = load_task(task_spec)
    tokenizer = load_tokenizer(model_spec)
    model = load_model(model_spec)
    lr = DEFAULT_LR[lora] if lr is None else lr
    model = tune(model, tokenizer, task, steps=steps, batch_size=batch_size, lr=lr, lora=lora, seed=seed)
    path = save_tuned(model, tokenizer, out, base_model=str(model_spec), task=task.name, steps=steps, lora=lora,
                      lr=lr, batch_size=batch_size, seed=seed, force=force)
    click.echo(f"saved tuned model to {path}")
