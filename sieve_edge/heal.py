"""Healing: a short fine-tune of a factorized model's low-rank factors on the train split.

Two losses (``loss``): "ce", the answer tokens' cross-entropy (as in ``tune``), or "kl",
distillation of the dense model's label distribution on the train prompts (KL(dense ||
healed) over the label tokens; ``teacher`` holds the dense log-probs, computed before the
cut). KL asks the factors to give back what the cut took, not to learn the task anew: it
cannot overfit the train labels beyond what the dense model believed.

Only the factors of the ``LowRankLinear`` modules train (everything else stays frozen):
they are the part the cut changed, and full fine-tuning of a pruned SmolLM2-135M was seen to
swing by ten points from one checkpoint to the next. ``rank=0`` trains the factors
themselves (AdamW keeps two more copies of them). ``rank=R`` trains rank-R LoRA adapters on
the two factors of each pair instead (peft, as ``tune --lora``: the update starts at zero, so
healing starts from the cut model) and merges them into the factors afterwards: the shapes,
the parameter count and the export stay those of the plan, and the trainable parameters are
``R * (rows + cols)`` per factor, a small share of the factors' own on a large model.

A step's batch is split into micro-batches of at most ``max_batch_tokens`` padded tokens
whose gradients add up to the batch's (as in ``tune``), so long prompts bound memory, not the
batch size. ``heal_`` scores the validation split before and after and keeps the healed
weights only if they did not score worse, so healing can never cost accuracy on the split the
search was held to (adapters that scored worse are dropped unmerged; trained factors are
restored from a copy).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .errors import InputError, TrainingError
from .factorize import LowRankLinear
from .tasks import BATCH_TOKENS


@dataclass
class HealResult:
    steps: int
    lr: float
    trainable_params: int
    metric_before: float
    metric_after: float
    kept: bool            # the healed weights were kept (they scored no worse on validation)
    seconds: float
    loss_first: float
    loss_last: float
    loss: str = "ce"      # ce | kl
    rank: int = 0         # 0: the factors trained; R: rank-R adapters on them, merged

    @property
    def metric(self) -> float:
        """The validation score the model ends with: after healing if kept, else before."""
        return self.metric_after if self.kept else self.metric_before

    def outcome(self) -> str:
        """``validation B -> A (kept)`` (or ``(discarded: it scored worse)``), for a log line."""
        return (f"validation {self.metric_before:.4f} -> {self.metric_after:.4f} "
                f"({'kept' if self.kept else 'discarded: it scored worse'})")


def factor_parameters(model) -> list[torch.nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LowRankLinear) for p in m.parameters()]


def factor_module_names(model) -> list[str]:
    """Qualified names of the two ``nn.Linear`` of every ``LowRankLinear``: what adapters train."""
    return [f"{name}.{part}" for name, m in model.named_modules() if isinstance(m, LowRankLinear)
            for part in ("first", "second")]


def heal_(model, tokenizer, task, steps: int, *, lr: float = 1e-4, batch_size: int = 16, seed: int = 0,
          val_scorer=None, higher_is_better: bool = True, log=None, max_length: int = 256, loss: str = "ce",
          teacher=None, train_scorer=None, rank: int = 0, max_batch_tokens: int = BATCH_TOKENS) -> HealResult:
    """Fine-tune the low-rank factors in place for ``steps`` steps (``rank`` > 0: through
    rank-``rank`` LoRA adapters merged into them); see the module docstring. ``loss="kl"`` needs
    ``train_scorer`` (a classification ``Scorer`` of the train split on its single-token path)
    and ``teacher`` (N, L), the dense model's label log-probs on its rows."""
    from .tasks import pad_id
    from .tune import _accumulate, training_sequences, warmup_then_decay

    if steps < 1:
        raise InputError(f"heal steps (--heal-steps) must be >= 1, got {steps}")
    if rank < 0:
        raise InputError(f"heal adapter rank (--heal-rank) must be >= 0 (0 trains the factors), got {rank}")
    params = factor_parameters(model)
    if not params:
        raise InputError("healing needs a factorized model: it has no LowRankLinear module to train")
    if loss not in ("ce", "kl"):
        raise InputError(f"heal loss '{loss}' is not allowed; choose ce or kl")
    if loss == "kl":
        if train_scorer is None or teacher is None or not getattr(train_scorer, "fast", False):
            raise InputError(f"--heal kl distils the label distribution: task '{task.name}' needs single-token "
                             "labels (see `sieve-edge task show`); use --heal ce")
        data = list(range(train_scorer.n))
    else:
        data = training_sequences(task, tokenizer, "train", None, max_length)
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    before = float(val_scorer.metric(model)) if val_scorer is not None else math.nan
    # kept only to undo a healing that scored worse: nothing to undo without a validation score,
    # nor with adapters (they are dropped unmerged)
    saved = {id(p): p.detach().clone() for p in params} if val_scorer is not None and not rank else {}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    t0 = time.perf_counter()
    losses = []
    adapted = None
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            order = torch.Generator().manual_seed(seed)
            for p in model.parameters():
                p.requires_grad_(False)
            if rank:
                from peft import LoraConfig, get_peft_model

                config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
                                    target_modules=factor_module_names(model))
                adapted = get_peft_model(model, config)   # the adapters are injected into ``model`` itself
                params = [p for p in adapted.parameters() if p.requires_grad]
            for p in params:
                p.requires_grad_(True)
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            schedule = warmup_then_decay(optimizer, steps, max(1, steps // 10))
            perm, cursor = torch.randperm(len(data), generator=order), 0
            model.train()
            try:
                for step in range(1, steps + 1):
                    if cursor + batch_size > len(data) and cursor > 0:
                        perm, cursor = torch.randperm(len(data), generator=order), 0
                    batch = [data[i] for i in perm[cursor:cursor + batch_size].tolist()]
                    cursor += batch_size
                    optimizer.zero_grad(set_to_none=True)
                    diverged = f"healing diverged at step {step} (loss {{loss}}); lower --heal-lr (was {lr:g})"
                    if loss == "kl":
                        value = _kl_backward(model, train_scorer, teacher, batch, device, max_batch_tokens, diverged)
                    else:
                        value = _accumulate(batch, model, pad, device, max_batch_tokens, diverged)
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    schedule.step()
                    losses.append(value)
                    if log and (step == 1 or step == steps or step % max(1, steps // 5) == 0):
                        log(f"heal step {step}/{steps}  {loss} loss {value:.4f}")
            finally:
                optimizer.zero_grad(set_to_none=True)
                model.eval()
        after = float(val_scorer.metric(model)) if val_scorer is not None else math.nan
    except BaseException:
        if adapted is not None:  # leave the model as it came: the adapters dropped unmerged
            adapted.unload()
        _set_requires_grad(model, flags)
        raise
    sign = 1.0 if higher_is_better else -1.0
    kept = val_scorer is None or sign * (after - before) >= 0
    if adapted is not None:
        adapted.merge_and_unload() if kept else adapted.unload()
    elif not kept:
        with torch.no_grad():
            for p in params:
                p.copy_(saved[id(p)])
    _set_requires_grad(model, flags)   # after the adapters are gone: the names are the model's own again
    return HealResult(steps, lr, sum(p.numel() for p in params), before, after, kept,
                      time.perf_counter() - t0, losses[0], losses[-1], loss, rank)


def _set_requires_grad(model, flags: dict[str, bool]) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, False))


def _kl_backward(model, scorer, teacher, rows: list[int], device, max_batch_tokens: int,
                 diverged: str) -> float:
    """Backward of KL(dense || model) of the label distributions at the prompts' last position,
    mean over ``rows``, in micro-batches of at most ``max_batch_tokens`` padded tokens (each
    weighted by its share of the rows). Returns the loss."""
    from .evaluate import _hidden_states, head_logits
    from .tasks import right_pad, token_batches

    order = sorted(rows, key=lambda i: -len(scorer.prompt_ids[i]))
    value = 0.0
    for group in token_batches([len(scorer.prompt_ids[i]) for i in order], len(order), max_batch_tokens):
        part = [order[g] for g in group]
        seqs = [scorer.prompt_ids[i] for i in part]
        ids, mask = right_pad(seqs, scorer.pad)
        hidden = _hidden_states(model, ids.to(device), mask.to(device))                 # (B, T, H)
        last = torch.tensor([len(s) - 1 for s in seqs], device=device)
        z = head_logits(model, hidden[torch.arange(len(seqs), device=device), last],
                        scorer.label_token_ids.to(device))                             # (B, L)
        q = torch.log_softmax(z, -1)
        p = teacher[part].to(device=device, dtype=q.dtype)                              # (B, L) log-probs
        kl = (p.exp() * (p - q)).sum(-1).mean()
        if not math.isfinite(kl.item()):
            raise TrainingError(diverged.format(loss=kl.item()))
        share = len(part) / len(rows)
        (kl * share).backward()
        value += kl.item() * share
    return value
