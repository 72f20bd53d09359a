"""Score a model on one split of a task.

``evaluate`` is the one-shot verb. ``Scorer`` is what the search reuses: the split is
tokenized once, and every call only runs the model. For classification with single-token
answers (the usual case, see docs/TASKS.md) one forward pass per batch suffices: the
hidden state at the last prompt position times the label rows of the LM head, nothing
else of the vocabulary. Multi-token answers take the shared-prefix path: the prompt runs
once, then the labels' continuations run from its KV cache in a few batches of similar
length, and each distinct answer prefix is scored once. Batches are bounded by padded
tokens, not rows.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import TaskSpecError
from .runtime import BATCH_TOKENS, continuation_rows, row_groups
from .tasks import TaskSpec, encode_answers, encode_examples, example_sequences, load_examples, load_task, \
    pad_id, prompt_limit, right_pad, token_batches

_HEAD_CHUNK = 1024  # positions per full-vocabulary LM-head call: (1024, V) float32 logits


@dataclass
class EvalResult:
    task: str
    split: str
    metric: str
    value: float
    n: int
    truncated: int = 0                    # prompts cut to max_prompt_tokens
    max_prompt_tokens: int | None = None
    sample: dict = field(default_factory=dict)  # how the rows were drawn: mode, seed, limit, rows, of

    def to_dict(self) -> dict:
        return {"task": self.task, "split": self.split, "metric": self.metric, "value": self.value, "n": self.n,
                "truncated": self.truncated, "max_prompt_tokens": self.max_prompt_tokens, "sample": self.sample}


# ---------------------------------------------------------------- model plumbing

def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _decoder(model):
    """The model without its LM head (returns hidden states), or None if not found."""
    base = getattr(model, "base_model", model)
    if base is not model:
        return base
    get = getattr(model, "get_decoder", None)
    if get is not None:
        decoder = get()
        if decoder is not model:
            return decoder
    return None


def _hidden_states(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states (B, T, H) after the last norm, without computing any logits."""
    decoder = _decoder(model)
    if decoder is None:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        return out.hidden_states[-1]
    return decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def _softcap(model, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def head_logits(model, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """LM-head logits (K, V) for hidden states (K, H), or (K, len(token_ids)) for those rows only."""
    head = model.get_output_embeddings()
    if token_ids is not None and isinstance(head, torch.nn.Linear):
        bias = head.bias[token_ids] if head.bias is not None else None
        logits = F.linear(hidden, head.weight[token_ids], bias)
    else:
        logits = head(hidden)
        if token_ids is not None:
            logits = logits[..., token_ids]
    return _softcap(model, logits.float())


def _token_logprobs(model, hidden: torch.Tensor, positions: torch.Tensor | None,
                    targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i] | hidden[positions[i]]) (P,) with the full vocabulary. Each row of
    ``hidden`` (K, H) runs through the LM head once, however many targets read it
    (``positions`` None: row i for target i), in chunks of at most (_HEAD_CHUNK, V) logits."""
    rows = torch.arange(len(targets), device=targets.device) if positions is None else positions
    out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], _HEAD_CHUNK):
        logits = head_logits(model, hidden[start:start + _HEAD_CHUNK])            # (k, V)
        norm = torch.logsumexp(logits, dim=-1)                                   # (k,)
        here = (rows >= start) & (rows < start + logits.shape[0])
        at = rows[here] - start
        out[here] = logits[at, targets[here]] - norm[at]
    return out


def _run_cached(model, decoder, ids: torch.Tensor, cache):
    """Final hidden states (B, T, H) of ``ids`` after the tokens in ``cache`` (None: none),
    and the cache that now holds them too."""
    if decoder is None:
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, output_hidden_states=True)
        return out.hidden_states[-1], out.past_key_values
    out = decoder(input_ids=ids, past_key_values=cache, use_cache=True)
    return out.last_hidden_state, out.past_key_values


class _Eval:
    """inference_mode + eval mode for the duration, restoring the training flag after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.inference = torch.inference_mode()
        self.inference.__enter__()

    def __exit__(self, *exc):
        self.inference.__exit__(*exc)
        self.model.train(self.was_training)


# ---------------------------------------------------------------- metrics

def accuracy_from_logprobs(logprobs: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose highest label log-prob is the gold label. logprobs (N, L), labels (N,)."""
    if logprobs.shape[0] == 0:
        return float("nan")
    return (logprobs.argmax(dim=-1).cpu() == labels.cpu()).double().mean().item()


def normalize_answer(text: str) -> str:
    return text.strip().casefold()


def normalize_prediction(text: str) -> str:
    """First non-empty line of a generation, stripped and casefolded."""
    for line in text.strip().splitlines():
        if line.strip():
            return normalize_answer(line)
    return ""


# ---------------------------------------------------------------- the scorer

class Scorer:
    """One split of one task, tokenized once, scored against any number of models.

    ``subset`` (indices into the split) lets a caller race candidates on a few rows first.
    Prompts are held to ``max_prompt_tokens`` (default: ``tasks.prompt_limit`` of ``model``,
    the model whose context decides it, when given); ``truncated`` counts the cut ones and
    ``sample`` records how ``limit`` drew the rows. A forward pass holds at most
    ``max_batch_tokens`` padded tokens. ``scoring`` is how classification is scored:
    "single-token" (the fast path), "shared-prefix", or "pairs" (one full sequence per
    example and label: the reference the other two are tested against); default: the
    fastest that applies.
    """

    def __init__(self, tokenizer, task: TaskSpec, split: str, limit: int | None = None,
                 batch_size: int = 32, max_prompt_tokens: int | None = None, model=None,
                 max_batch_tokens: int = BATCH_TOKENS, scoring: str | None = None):
        if batch_size < 1:
            raise TaskSpecError(f"batch_size must be >= 1, got {batch_size}")
        if max_batch_tokens < 1:
            raise TaskSpecError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.task = task
        self.split = split
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.tokenizer = tokenizer
        self.pad = pad_id(tokenizer)
        self.examples = load_examples(task, split, limit)
        self.sample = dict(self.examples.sample)
        self.n = len(self.examples)
        self.max_prompt_tokens = prompt_limit(task, tokenizer, model) if max_prompt_tokens is None \
            else max_prompt_tokens
        self.truncated = 0
        self.labels: torch.Tensor | None = None
        self.label_token_ids: torch.Tensor | None = None  # (L,) when the fast path applies
        self._scoring = scoring
        self._cache: dict = {}
        if task.kind == "classification":
            self._init_classification()
        elif task.kind == "generation":
            self._init_generation()
        else:
            self._init_perplexity()

    # -- setup

    def _prompts(self) -> list[str]:
        prompts = encode_examples(self.task, self.tokenizer, self.examples, self.max_prompt_tokens)
        self.prompt_ids, self.truncated = prompts.ids, prompts.truncated
        return prompts.texts

    def _init_classification(self) -> None:
        prompts = self._prompts()
        # answer ids per label, per example: (L, N, len)
        self.answer_ids = [encode_answers(self.tokenizer, prompts, [answer] * self.n) for answer in self.task.answers]
        self.labels = torch.tensor([ex.label_index for ex in self.examples], dtype=torch.long)
        single = all(len(ids) == 1 for per_label in self.answer_ids for ids in per_label)
        if single:
            firsts = [{ids[0] for ids in per_label} for per_label in self.answer_ids]
            if all(len(f) == 1 for f in firsts):
                tokens = [next(iter(f)) for f in firsts]
                if len(set(tokens)) == len(tokens):
                    self.label_token_ids = torch.tensor(tokens, dtype=torch.long)
        allowed = ("single-token", "shared-prefix", "pairs")
        if self._scoring not in (None, *allowed):
            raise TaskSpecError(f"scoring {self._scoring!r}; allowed: {', '.join(allowed)}")
        if self._scoring == "single-token" and not self.fast:
            raise TaskSpecError(f"task '{self.task.name}': single-token scoring needs every label's answer to be "
                                "one distinct token")

    def _init_generation(self) -> None:
        self._prompts()
        missing = [ex.line for ex in self.examples if ex.answer is None]
        if missing:
            raise TaskSpecError(
                f"{self.task.split_path(self.split)}: generation needs a '{self.task.label_field}' answer on every row; "
                f"missing on line(s) {', '.join(map(str, missing[:10]))}"
            )
        self.gold = [normalize_answer(ex.answer) for ex in self.examples]

    def _init_perplexity(self) -> None:
        seqs = example_sequences(self.task, self.tokenizer, self.examples, self.max_prompt_tokens)
        self.sequences = [prefix + ids for prefix, ids in seqs]
        self.truncated = seqs.truncated

    @property
    def fast(self) -> bool:
        """True when classification runs one forward per batch on the prompts alone."""
        return self.label_token_ids is not None and self._scoring in (None, "single-token")

    @property
    def scoring(self) -> str | None:
        """How classification is scored: single-token, shared-prefix or pairs (None otherwise)."""
        if self.task.kind != "classification":
            return None
        if self.fast:
            return "single-token"
        return self._scoring or "shared-prefix"

    def record(self) -> dict:
        """What a report says about these rows: how many, how drawn, how many prompts were cut."""
        return {"split": self.split, "n": self.n, "sample": self.sample, "truncated": self.truncated,
                "max_prompt_tokens": self.max_prompt_tokens, "scoring": self.scoring}

    def _indices(self, subset) -> list[int]:
        if subset is None:
            return list(range(self.n))
        if isinstance(subset, torch.Tensor):
            subset = subset.tolist()
        out = [int(i) for i in subset]
        bad = [i for i in out if not 0 <= i < self.n]
        if bad:
            raise IndexError(f"subset indices out of range 0..{self.n - 1}: {bad[:5]}")
        return out

    def _batches(self, rows: list[int], lengths: list[int], key, extra: int = 0) -> list[list[int]]:
        """Positions into ``rows``, grouped by similar length (longest first) to limit padding,
        at most ``batch_size`` rows and ``max_batch_tokens`` padded tokens (length + ``extra``) each."""
        cache_key = ("order", key, extra)
        if cache_key not in self._cache:
            order = sorted(range(len(rows)), key=lambda j: -lengths[rows[j]])
            groups = token_batches([lengths[rows[j]] + extra for j in order], self.batch_size, self.max_batch_tokens)
            self._cache[cache_key] = [[order[g] for g in group] for group in groups]
            if len(self._cache) > 16:
                self._cache.pop(next(iter(self._cache)))
        return self._cache[cache_key]

    # -- classification

    def label_logprobs(self, model, subset: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """(N, L) float32 log-probabilities normalized over the label set, per example (CPU)."""
        if self.task.kind != "classification":
            raise TaskSpecError(f"label_logprobs needs a classification task; '{self.task.name}' is {self.task.kind}")
        rows = self._indices(subset)
        with _Eval(model):
            if self.fast:
                scores = self._fast_scores(model, rows)
            elif self.scoring == "pairs":
                scores = self._pair_scores(model, rows)
            else:
                scores = self._prefix_scores(model, rows)
        if self.task.label_score == "mean":  # per (example, label): its answer's token count
            lengths = torch.tensor([[len(self.answer_ids[l][r]) for l in range(len(self.answer_ids))] for r in rows],
                                   dtype=scores.dtype)
            scores = scores / lengths
        return torch.log_softmax(scores, dim=-1)

    def _fast_scores(self, model, rows: list[int]) -> torch.Tensor:
        device = model_device(model)
        token_ids = self.label_token_ids.to(device)
        lengths = [len(p) for p in self.prompt_ids]
        key = None if len(rows) == self.n else tuple(rows)
        scores = torch.empty(len(rows), len(token_ids))
        for batch in self._batches(rows, lengths, key):
            seqs = [self.prompt_ids[rows[j]] for j in batch]
            ids, mask = right_pad(seqs, self.pad)
            hidden = _hidden_states(model, ids.to(device), mask.to(device))               # (B, T, H)
            last = torch.tensor([len(s) - 1 for s in seqs], device=device)
            h_last = hidden[torch.arange(len(seqs), device=device), last]                 # (B, H)
            scores[batch] = head_logits(model, h_last, token_ids).cpu()                   # (B, L)
        return scores

    def _prefix_scores(self, model, rows: list[int]) -> torch.Tensor:
        """Sum log-likelihood of each label's answer tokens after the prompt: (N, L).

        Per example the prompt runs once (batch 1, no padding) and keeps its KV cache; the
        answers' continuations (``runtime.continuation_rows``: each distinct prefix once) then
        run in a few batches of similar length (``runtime.row_groups``) from copies of that
        cache, right padded (padding only follows a row's tokens, so causal attention keeps
        it out of them). The LM head runs on the distinct prefixes only, each giving the
        next-token distribution of every answer that shares it.
        """
        device = model_device(model)
        n_labels = len(self.answer_ids)
        scores = torch.zeros(len(rows), n_labels, dtype=torch.float64)
        decoder = _decoder(model)
        for out_row, r in enumerate(rows):
            prompt = self.prompt_ids[r]
            answers = [self.answer_ids[l][r] for l in range(n_labels)]
            hidden, cache = _run_cached(model, decoder, torch.tensor([prompt], device=device), None)
            h_keys = {(): hidden[0, -1]}                                                   # prefix -> (H,)
            conts = continuation_rows([a[:-1] for a in answers if len(a) > 1])
            if conts:
                groups = row_groups([len(c) for c in conts], len(prompt), self.max_batch_tokens)
                for g, group in enumerate(groups):
                    chunk = [conts[i] for i in group]
                    chunk_cache = cache if g == len(groups) - 1 else copy.deepcopy(cache)
                    chunk_cache.batch_repeat_interleave(len(chunk))                        # (R, heads, T, d)
                    ids, _ = right_pad(chunk, self.pad)                                     # (R, A)
                    h, _ = _run_cached(model, decoder, ids.to(device), chunk_cache)         # (R, A, H)
                    for i, row in enumerate(chunk):
                        for t in range(len(row)):
                            h_keys.setdefault(tuple(row[:t + 1]), h[i, t])
            keys = list(h_keys)
            where = {k: i for i, k in enumerate(keys)}
            stacked = torch.stack([h_keys[k] for k in keys])                               # (K, H)
            pos, tgt = [], []
            for a in answers:
                for j, token in enumerate(a):
                    pos.append(where[tuple(a[:j])])
                    tgt.append(token)
            logp = _token_logprobs(model, stacked, torch.tensor(pos, device=device),
                                   torch.tensor(tgt, device=device)).double().cpu()
            owner = torch.tensor([l for l, a in enumerate(answers) for _ in a])
            scores[out_row].index_add_(0, owner, logp)
        return scores.float()

    def _pair_scores(self, model, rows: list[int]) -> torch.Tensor:
        """The reference: one full sequence per (example, label), batched; (N, L)."""
        device = model_device(model)
        n_labels = len(self.answer_ids)
        pairs = [(r, l) for r in rows for l in range(n_labels)]  # flat (example, label)
        seq_len = [len(self.prompt_ids[r]) + len(self.answer_ids[l][r]) for r, l in pairs]
        scores = torch.zeros(len(pairs), dtype=torch.float64)
        order = sorted(range(len(pairs)), key=lambda j: -seq_len[j])
        for group in token_batches([seq_len[j] for j in order], self.batch_size, self.max_batch_tokens):
            batch = [order[g] for g in group]
            seqs, rows_sel, pos_sel, tgt_sel, owner = [], [], [], [], []
            for b, j in enumerate(batch):
                r, l = pairs[j]
                prompt, answer = self.prompt_ids[r], self.answer_ids[l][r]
                seqs.append(prompt + answer)
                for t, token in enumerate(answer):
                    rows_sel.append(b)
                    pos_sel.append(len(prompt) - 1 + t)   # the position that predicts this token
                    tgt_sel.append(token)
                    owner.append(j)
            ids, mask = right_pad(seqs, self.pad)
            hidden = _hidden_states(model, ids.to(device), mask.to(device))                # (B, T, H)
            h = hidden[torch.tensor(rows_sel, device=device), torch.tensor(pos_sel, device=device)]  # (K, H)
            logp = _token_logprobs(model, h, None, torch.tensor(tgt_sel, device=device)).double().cpu()
            scores.index_add_(0, torch.tensor(owner), logp)
        return scores.view(len(rows), n_labels).float()

    # -- generation

    def generate(self, model, subset=None) -> list[str]:
        """Greedy completions (decoded, special tokens skipped) for the rows of ``subset``."""
        rows = self._indices(subset)
        device = model_device(model)
        lengths = [len(p) for p in self.prompt_ids]
        out: list[str] = [""] * len(rows)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        with _Eval(model):
            key = None if len(rows) == self.n else tuple(rows)
            for batch in self._batches(rows, lengths, key, extra=self.task.max_new_tokens):
                seqs = [self.prompt_ids[rows[j]] for j in batch]
                width = max(len(s) for s in seqs)
                ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
                mask = torch.zeros((len(seqs), width), dtype=torch.long)
                for b, s in enumerate(seqs):                     # left padding for generation
                    ids[b, width - len(s):] = torch.tensor(s)
                    mask[b, width - len(s):] = 1
                gen = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                    max_new_tokens=self.task.max_new_tokens, pad_token_id=self.pad, eos_token_id=eos,
                    temperature=None, top_p=None, top_k=None,
                )
                texts = self.tokenizer.batch_decode(gen[:, width:].cpu(), skip_special_tokens=True)
                for j, text in zip(batch, texts):
                    out[j] = text
        return out

    # -- perplexity

    def _nll(self, model, rows: list[int]) -> tuple[float, int]:
        device = model_device(model)
        lengths = [len(s) for s in self.sequences]
        total, count = 0.0, 0
        with _Eval(model):
            for batch in self._batches(rows, lengths, None if len(rows) == self.n else tuple(rows)):
                seqs = [self.sequences[rows[j]] for j in batch]
                ids, mask = right_pad(seqs, self.pad)
                hidden = _hidden_states(model, ids.to(device), mask.to(device))            # (B, T, H)
                b_idx = [b for b, s in enumerate(seqs) for _ in range(len(s) - 1)]
                p_idx = [t for s in seqs for t in range(len(s) - 1)]
                targets = torch.tensor([s[t + 1] for s in seqs for t in range(len(s) - 1)], device=device)
                if not p_idx:
                    continue
                h = hidden[torch.tensor(b_idx, device=device), torch.tensor(p_idx, device=device)]
                logp = _token_logprobs(model, h, None, targets)
                total -= logp.double().sum().item()
                count += len(p_idx)
        return total, count

    # -- the metric

    def metric(self, model, subset: Sequence[int] | torch.Tensor | None = None) -> float:
        """accuracy (classification), exact match (generation) or perplexity, on ``subset``."""
        rows = self._indices(subset)
        if self.task.kind == "classification":
            return accuracy_from_logprobs(self.label_logprobs(model, rows), self.labels[rows])
        if self.task.kind == "generation":
            predictions = self.generate(model, rows)
            hits = sum(normalize_prediction(p) == self.gold[r] for p, r in zip(predictions, rows))
            return hits / len(rows) if rows else float("nan")
        total, count = self._nll(model, rows)
        if count == 0:
            raise TaskSpecError(f"task '{self.task.name}' split '{self.split}': no tokens to score for perplexity")
        return math.exp(total / count)

    def result(self, model) -> EvalResult:
        """The metric on every row, with what a report needs to say about them."""
        return EvalResult(task=self.task.name, split=self.split, metric=self.task.metric,
                          value=float(self.metric(model)), n=self.n, truncated=self.truncated,
                          max_prompt_tokens=self.max_prompt_tokens, sample=self.sample)


def make_scorer(tokenizer, task: TaskSpec | str | Path, split: str, limit: int | None = None,
                batch_size: int = 32, model=None, **options) -> Scorer:
    """A ``Scorer``; pass ``model`` so that the default prompt limit is its context window."""
    if not isinstance(task, TaskSpec):
        task = load_task(task)
    return Scorer(tokenizer, task, split, limit=limit, batch_size=batch_size, model=model, **options)


def evaluate(model, tokenizer, task: TaskSpec | str | Path, split: str = "test", limit: int | None = None,
             batch_size: int = 16) -> EvalResult:
    """The task's metric on one split (``limit`` rows drawn per its [data] sample), batched, on
    the model's device. ``split`` may name an extra test: ``extra:NAME``."""
    if not isinstance(task, TaskSpec):
        task = load_task(task)
    return make_scorer(tokenizer, task, split, limit=limit, batch_size=batch_size, model=model).result(model)


def score_extra_tests(model, tokenizer, task: TaskSpec | str | Path, limit: int | None = None,
                      batch_size: int = 16) -> dict[str, EvalResult]:
    """The task's metric on each of its ``[[extra_test]]`` sets ({} when it has none)."""
    if not isinstance(task, TaskSpec):
        task = load_task(task)
    return {name: evaluate(model, tokenizer, task, f"extra:{name}", limit=limit, batch_size=batch_size)
            for name in task.extra_tests}
