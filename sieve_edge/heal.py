"""Healing: a short fine-tune of a factorized model's low-rank factors on the train split.

Two losses (``loss``): "ce", the answer tokens' cross-entropy (as in ``tune``), or "kl",
distillation of the dense model's label distribution on the train prompts (KL(dense ||
healed) over the label tokens; ``teacher`` holds the dense log-probs, computed before the
cut). KL asks the factors to give back what the cut took, not to learn the task anew: it
cannot overfit the train labels beyond what the dense model believed.

Only the factors of the ``LowRankLinear`` modules train (everything else stays frozen):
they are the part the cut changed, and full fine-tuning of a pruned SmolLM2-135M was seen to
swing by ten points from one checkpoint to the next. ``rank=0`` trains the factors
themselves (with AdamW, three copies of them in memory). ``rank=R`` trains a rank-R adapter
beside each factor instead (LoRA: ``first(x) + up(down(x))``, ``up`` starting at zero so the
model starts unchanged) and adds ``up @ down`` into the factor afterwards: the shapes, the
parameter count and the export stay those of the plan, and the trainable parameters are
``R * (rows + cols)`` per factor, a small share of the factors' own on a large model.

``heal_`` scores the validation split before and after and keeps the healed weights only if
they did not score worse, so healing can never cost accuracy on the split the search was held
to (an adapter that scored worse is dropped unmerged; trained factors are restored from a copy).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .errors import InputError
from .factorize import LowRankLinear
from .tune import train_step


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


class _Adapters:
    """Rank-``rank`` adapters on the two factors of every ``LowRankLinear`` of ``model``: a
    forward hook adds ``up(down(x))`` to each factor's output, so no factor weight is copied
    or changed until ``merge_()`` adds ``up @ down`` into it; ``remove()`` drops the hooks.
    The adapters are float32 on a half-precision model (AdamW on half weights loses the step)."""

    def __init__(self, model, rank: int):
        self.pairs: list[tuple[torch.nn.Linear, torch.nn.Parameter, torch.nn.Parameter]] = []
        self.hooks = []
        for m in model.modules():
            if not isinstance(m, LowRankLinear):
                continue
            for layer in (m.first, m.second):
                rows, cols = layer.weight.shape
                r = min(rank, rows, cols)
                dtype = torch.float32 if layer.weight.dtype in (torch.float16, torch.bfloat16) else layer.weight.dtype
                down = torch.nn.Parameter(torch.empty(r, cols, device=layer.weight.device, dtype=dtype))
                torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5))
                up = torch.nn.Parameter(torch.zeros(rows, r, device=layer.weight.device, dtype=dtype))
                self.pairs.append((layer, down, up))
                self.hooks.append(layer.register_forward_hook(self._hook(down, up)))

    @staticmethod
    def _hook(down, up):
        def add(_module, inputs, output):
            x = inputs[0]
            return output + torch.nn.functional.linear(torch.nn.functional.linear(x.to(down.dtype), down), up
                                                       ).to(output.dtype)
        return add

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, down, up in self.pairs for p in (down, up)]

    @torch.no_grad()
    def merge_(self) -> None:
        for layer, down, up in self.pairs:
            layer.weight += (up @ down).to(layer.weight.dtype)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


def heal_(model, tokenizer, task, steps: int, *, lr: float = 1e-4, batch_size: int = 16, seed: int = 0,
          val_scorer=None, higher_is_better: bool = True, log=None, max_length: int = 256, loss: str = "ce",
          teacher=None, train_scorer=None, rank: int = 0) -> HealResult:
    """Fine-tune the low-rank factors in place for ``steps`` steps (``rank`` > 0: through
    rank-``rank`` adapters merged into them); see the module docstring. ``loss="kl"`` needs
    ``train_scorer`` (a classification ``Scorer`` of the train split on its single-token path)
    and ``teacher`` (N, L), the dense model's label log-probs on its rows."""
    from .tasks import pad_id, right_pad
    from .tune import training_sequences

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
    adapters = None
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            order = torch.Generator().manual_seed(seed)
            for p in model.parameters():
                p.requires_grad_(False)
            if rank:
                adapters = _Adapters(model, rank)
                params = adapters.parameters()
            for p in params:
                p.requires_grad_(True)
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            warm = max(1, steps // 10)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
            perm, cursor = torch.randperm(len(data), generator=order), 0
            model.train()
            try:
                for step in range(1, steps + 1):
                    if cursor + batch_size > len(data) and cursor > 0:
                        perm, cursor = torch.randperm(len(data), generator=order), 0
                    batch = [data[i] for i in perm[cursor:cursor + batch_size].tolist()]
                    cursor += batch_size
                    if loss == "kl":
                        value = _kl_loss(model, train_scorer, teacher, batch, device)
                    else:
                        ids, mask = right_pad([b[0] for b in batch], pad)
                        labels = torch.full_like(ids, -100)
                        for row, (_, lab) in enumerate(batch):
                            labels[row, :len(lab)] = torch.tensor(lab, dtype=torch.long)
                        value = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      labels=labels.to(device), use_cache=False).loss
                    train_step(value, optimizer, schedule, params,
                               f"healing diverged at step {step} (loss {{loss}}); lower --heal-lr")
                    losses.append(value.item())
                    if log and (step == 1 or step == steps or step % max(1, steps // 5) == 0):
                        log(f"heal step {step}/{steps}  {loss} loss {value.item():.4f}")
            finally:
                optimizer.zero_grad(set_to_none=True)
                for n, p in model.named_parameters():
                    p.requires_grad_(flags.get(n, False))
                model.eval()
        after = float(val_scorer.metric(model)) if val_scorer is not None else math.nan
    finally:  # the adapters' hooks never outlive the heal: merged below if kept, else dropped
        if adapters is not None:
            adapters.remove()
    sign = 1.0 if higher_is_better else -1.0
    kept = val_scorer is None or sign * (after - before) >= 0
    if adapters is not None:
        if kept:
            adapters.merge_()
    elif not kept:
        with torch.no_grad():
            for p in params:
                p.copy_(saved[id(p)])
    return HealResult(steps, lr, sum(p.numel() for p in params), before, after, kept,
                      time.perf_counter() - t0, losses[0], losses[-1], loss, rank)


def _kl_loss(model, scorer, teacher, rows: list[int], device) -> torch.Tensor:
    """KL(dense || model) of the label distributions at the prompts' last position, mean over rows."""
    from .evaluate import _hidden_states, head_logits
    from .tasks import right_pad

    seqs = [scorer.prompt_ids[i] for i in rows]
    ids, mask = right_pad(seqs, scorer.pad)
    hidden = _hidden_states(model, ids.to(device), mask.to(device))                     # (B, T, H)
    last = torch.tensor([len(s) - 1 for s in seqs], device=device)
    z = head_logits(model, hidden[torch.arange(len(seqs), device=device), last],
                    scorer.label_token_ids.to(device))                                 # (B, L)
    q = torch.log_softmax(z, -1)
    p = teacher[rows].to(device=device, dtype=q.dtype)                                  # (B, L) log-probs
    return (p.exp() * (p - q)).sum(-1).mean()
