"""Fine-tune a model on a task's train split: full fine-tuning or LoRA merged back.

A 135M model is weak zero-shot and strong once tuned, so tuning is the usual first step
before pruning. The loss is on the answer tokens only (prompt tokens are labelled -100);
for perplexity tasks it is on every token of the text. Runs are deterministic for a seed:
the data order comes from a private generator and the global RNG is forked, not touched.

Row order: the train split (or ``limit`` rows of it, drawn as the task's ``[data] sample``
says) is read in full, then each epoch draws its batches from a fresh seeded permutation,
so the file order never matters. A step whose batch holds more than ``max_batch_tokens``
padded tokens runs as several micro-batches whose gradients add up to the full batch's.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from . import architectures as arch
from .errors import InputError, TaskSpecError, TrainingError
from .progress import log
from .runtime import BATCH_TOKENS
from .tasks import TaskSpec, example_sequences, load_examples, load_task, pad_id, prompt_limit, right_pad, \
    special_prefix, token_batches

DEFAULT_LR = {False: 5e-5, True: 5e-4}  # full fine-tuning, LoRA
LORA_R = 8
LORA_ALPHA = 16


# ---------------------------------------------------------------- data

class TrainingData(list):
    """(input ids, labels) per example, with how many prompts were cut (``truncated``)."""

    truncated: int = 0


def training_sequences(task: TaskSpec, tokenizer, split: str = "train", limit: int | None = None,
                       max_length: int = 256, max_prompt_tokens: int | None = None) -> TrainingData:
    """(input ids, labels) per example; labels are -100 on the prompt (and the BOS).

    Generation answers end with EOS so that the model learns to stop. Prompts are held to
    ``max_prompt_tokens`` (default ``tasks.prompt_limit``) and to ``max_length`` with their
    answer: the prompt's longest field gives way (the task's truncation side), never the
    template or the answer; an answer longer than that keeps its end after the BOS.
    """
    examples = load_examples(task, split, limit)
    if task.kind != "perplexity" and any(ex.answer is None for ex in examples):
        line = next(ex.line for ex in examples if ex.answer is None)
        raise TaskSpecError(f"{task.split_path(split)}:{line}: no answer ('{task.label_field}') to train on")
    eos = tokenizer.eos_token_id
    stop = task.kind == "generation" and eos is not None
    head = len(special_prefix(tokenizer))
    pairs = example_sequences(task, tokenizer, examples, max_prompt_tokens, max_length=max_length - stop)
    out = TrainingData()
    out.truncated = pairs.truncated
    for prompt, answer in pairs:
        if stop:
            answer = answer + [eos]
        ids = prompt + answer
        labels = [-100] * len(prompt) + answer
        if len(ids) > max_length:
            cut = len(ids) - max_length
            keep = min(head, len(prompt))
            ids = ids[:keep] + ids[keep + cut:]
            labels = labels[:keep] + labels[keep + cut:]
        out.append((ids, labels))
    return out


def _collate(batch: list[tuple[list[int], list[int]]], pad: int, device):
    ids, mask = right_pad([b[0] for b in batch], pad)
    labels = torch.full_like(ids, -100)
    for row, (_, lab) in enumerate(batch):
        labels[row, :len(lab)] = torch.tensor(lab, dtype=torch.long)
    return ids.to(device), mask.to(device), labels.to(device)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _scored(labels: list[int]) -> int:
    """Tokens a sequence's loss averages over (labels are shifted by one position)."""
    return sum(1 for t in labels[1:] if t != -100)


@torch.no_grad()
def answer_loss(model, tokenizer, task: TaskSpec | str | Path, split: str = "train", limit: int | None = 64,
                batch_size: int = 16, max_length: int = 256, max_batch_tokens: int = BATCH_TOKENS) -> float:
    """Mean cross-entropy per answer token (the quantity ``tune`` minimises) on a split."""
    if not isinstance(task, TaskSpec):
        task = load_task(task)
    data = training_sequences(task, tokenizer, split, limit, max_length, prompt_limit(task, tokenizer, model))
    device = _device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for group in token_batches([len(ids) for ids, _ in data], batch_size, max_batch_tokens):
            ids, mask, labels = _collate([data[i] for i in group], pad_id(tokenizer), device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()  # (B, T, V)
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = labels[:, 1:]
            valid = target != -100
            picked = logp.gather(2, target.clamp(min=0)[..., None]).squeeze(-1)
            total -= picked[valid].double().sum().item()
            count += int(valid.sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------- LoRA

def lora_targets(model) -> list[str]:
    """Qualified names of the Linear / Conv1D modules of the registry's matrices.

    A matrix already factorized into a low-rank pair contributes its two inner Linears.
    """
    from transformers.pytorch_utils import Conv1D

    names = []
    for name in arch.linear_names(model):
        module = arch.get_module(model, name)
        if isinstance(module, (nn.Linear, Conv1D)):
            names.append(name)
        else:
            names.extend(f"{name}.{sub}" for sub, m in module.named_modules()
                         if sub and isinstance(m, (nn.Linear, Conv1D)))
    return names


# ---------------------------------------------------------------- the verb

def warmup_then_decay(optimizer, steps: int, warm: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The rate rises linearly over the first ``warm`` steps, then falls linearly to zero at ``steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))


def _accumulate(batch: list[tuple[list[int], list[int]]], model, pad: int, device, max_batch_tokens: int,
                diverged: str) -> float:
    """Backward of one batch's mean answer-token loss, in micro-batches of at most
    ``max_batch_tokens`` padded tokens when it holds more (each weighted by its share of the
    batch's scored tokens, so the gradients add up to the whole batch's). Returns the loss."""
    groups = [list(range(len(batch)))]
    if len(batch) * max(len(ids) for ids, _ in batch) > max_batch_tokens:
        order = sorted(range(len(batch)), key=lambda i: -len(batch[i][0]))
        groups = [[order[g] for g in group]
                  for group in token_batches([len(batch[i][0]) for i in order], len(batch), max_batch_tokens)]
    total = max(sum(_scored(labels) for _, labels in batch), 1)
    value = 0.0
    for group in groups:
        part = [batch[i] for i in group]
        ids, mask, labels = _collate(part, pad, device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        if not math.isfinite(loss.item()):
            raise TrainingError(diverged.format(loss=loss.item()))
        share = sum(_scored(lab) for _, lab in part) / total
        (loss * share).backward()
        value += loss.item() * share
    return value


def tune(model, tokenizer, task: TaskSpec | str | Path, steps: int = 100, batch_size: int = 16,
         lr: float | None = None, lora: bool = False, seed: int = 0, progress: bool = True,
         max_length: int = 256, weight_decay: float = 0.0, warmup: float = 0.1, limit: int | None = None,
         max_batch_tokens: int = BATCH_TOKENS):
    """Fine-tune on the train split and return the model (the same object, in eval mode).

    ``lr`` defaults to 5e-5 (full) or 5e-4 (LoRA, rank 8, alpha 16, on every registry
    matrix). The rate warms up linearly over ``warmup`` of the steps, then decays linearly
    to zero; gradients are clipped at norm 1. With ``lora`` the adapters are merged into
    the weights before returning, so the model has its original modules and names.
    ``limit`` trains on that many train rows (the task's [data] sample draws them); each
    sequence is at most ``max_length`` tokens (see ``training_sequences``).
    """
    if not isinstance(task, TaskSpec):
        task = load_task(task)
    if steps < 1 or batch_size < 1:
        raise InputError(f"tuning steps and batch size must be >= 1, got steps={steps}, batch_size={batch_size}")
    lr = DEFAULT_LR[bool(lora)] if lr is None else float(lr)
    if not lr > 0 or not math.isfinite(lr):
        raise InputError(f"tuning learning rate (--lr) must be a positive number, got {lr}")
    if max_batch_tokens < 1:
        raise InputError(f"tuning max_batch_tokens must be >= 1, got {max_batch_tokens}")
    data = training_sequences(task, tokenizer, "train", limit, max_length, prompt_limit(task, tokenizer, model))
    if progress and data.truncated:
        log(f"tune: {data.truncated} of {len(data)} train prompts cut to fit max_prompt_tokens "
            f"or {max_length} tokens with the answer (truncation = {task.truncation!r})")
    pad = pad_id(tokenizer)
    device = _device(model)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}

    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        order = torch.Generator().manual_seed(seed)
        trained = model
        if lora:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                                target_modules=lora_targets(model), fan_in_fan_out=arch.get_arch(model).conv1d)
            trained = get_peft_model(model, config)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        params = [p for p in trained.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        schedule = warmup_then_decay(optimizer, steps, max(1, int(round(steps * warmup))))
        every = max(1, steps // 20)
        start = time.monotonic()
        perm, cursor = torch.randperm(len(data), generator=order), 0
        trained.train()
        try:
            for step in range(1, steps + 1):
                if cursor + batch_size > len(data) and cursor > 0:      # new epoch, new order
                    perm, cursor = torch.randperm(len(data), generator=order), 0
                idx = perm[cursor:cursor + batch_size].tolist()
                cursor += batch_size
                loss = _accumulate([data[i] for i in idx], trained, pad, device, max_batch_tokens,
                                   f"tuning diverged at step {step} (loss {{loss}}); lower --lr (was {lr})")
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                if progress and (step % every == 0 or step == steps or step == 1):
                    log(f"tune step {step}/{steps}  loss {loss:.4f}  "
                        f"lr {optimizer.param_groups[0]['lr']:.2e}  elapsed {time.monotonic() - start:.1f}s")
        except BaseException:
            if lora:  # leave the model as it came: drop the adapters unmerged
                trained.unload()
            raise
        finally:
            optimizer.zero_grad(set_to_none=True)
        if lora:
            model = trained.merge_and_unload()
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(name, p.requires_grad))
    return model.eval()


# ---------------------------------------------------------------- saving

def check_output(out: str | Path, force: bool = False) -> None:
    """Fail before a long run if ``out`` cannot receive a checkpoint."""
    from .checkpoint import check_output as check

    check(out, "checkpoint", force)


def save_tuned(model, tokenizer, out: str | Path, *, base_model: str, task: str, steps: int, lora: bool,
               lr: float, batch_size: int | None = None, seed: int | None = None, force: bool = False) -> Path:
    """Write the tuned model as a dense sieve-edge checkpoint (atomic, safetensors)."""
    from .checkpoint import build_manifest, save_checkpoint

    tuned = {"steps": steps, "lora": bool(lora), "lr": lr, "batch_size": batch_size, "seed": seed}
    # kind is measured: "dense", or "factorized" when a pruned model was tuned (healing)
    manifest = build_manifest(model, base_model=base_model, method=None, task=task, tuned=tuned)
    return save_checkpoint(model, tokenizer, out, manifest, force=force)
