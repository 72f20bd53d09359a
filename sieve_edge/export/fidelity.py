"""Post-export fidelity: does the exported model compute what the torch model computes?

Two kinds of check, both run after every export (a miss is an error, never a warning):

- fp32 exports: the logits of every prompt (every position) and of a few KV-cache decode
  steps against torch, within the named tolerance ``FP32_LOGITS_ATOL``; any miss raises
  ``FidelityError`` listing every prompt / step that missed.
- quantized exports (int8 / int4): the task metric against torch's, reported (the gate
  on it belongs to ``validate`` and its target profile); the logit error is reported too.

The exported model is run through the wrappers a user loads it with (optimum's
``ORTModelForCausalLM``, optimum-intel's ``OVModelForCausalLM``); OpenVINO always with
``INFERENCE_PRECISION_HINT=f32``, because its CPU plugin silently runs bf16 on CPUs with
avx512_bf16 (a max logit error of 1.2 instead of 1.6e-4 on SmolLM2, DESIGN §5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import FidelityError, InputError

# fp32 tolerance, per prompt: max |logit_exported - logit_torch| over every position and
# vocabulary entry must be <= FP32_LOGITS_ATOL + FP32_LOGITS_RTOL * max |logit_torch|.
# Measured on dense SmolLM2-135M: 9.5e-5 (onnxruntime), 1.2e-4 (OpenVINO, f32); tiny random
# models ~1e-6. A factorized SmolLM2 (SVD, keep 0.6; max |logit| 34.9) reached 4.0e-3
# (OpenVINO) and 2.6e-3 (onnxruntime): fp32 rounding grows with the logits' scale, hence the
# relative term. 2e-4 relative leaves ~2x margin there and is still ~200x below a bf16 run
# (about 4e-2 relative: a max error of 1.2 on SmolLM2's logits).
FP32_LOGITS_ATOL = 2e-3
FP32_LOGITS_RTOL = 2e-4
# KV-cache decode steps compared after the first DECODE_PROMPTS prompts (greedy, while both
# pick the same token).
DECODE_STEPS = 3
DECODE_PROMPTS = 2
# Prompts whose full logits are compared (the metric uses up to ``metric_limit`` examples).
LOGIT_PROMPTS = 6

FIXED_PROMPTS = [
    "The capital of France is",
    "Review: a charming and often affecting journey.\nSentiment:",
    "def add(a, b):\n    return",
    "Once upon a time, in a small village by the sea,",
]


@dataclass
class Prompts:
    """What the fidelity check feeds the models: token ids, one prompt each (no padding)."""

    ids: list[list[int]]
    source: str                                   # "task:NAME/SPLIT" or "fixed"
    labels: list[str] | None = None               # classification: label names, in order
    gold: list[int] | None = None                 # index into labels, per prompt
    label_token_ids: list[int] | None = None      # first answer token of each label
    metric_name: str | None = None
    # every label answer is one token after every prompt, the same token each time: a head
    # restricted to label_token_ids then predicts exactly what the full head scores (None:
    # not a classification task, or the first tokens collide)
    single_token_labels: bool | None = None


# ---------------------------------------------------------------------------- prompts


def first_answer_tokens(tokenizer, prompt: str, answers: list[str]) -> list[int]:
    """The first token of each answer as it follows ``prompt`` (merges at the seam included)."""
    from ..tasks import encode_answers

    ids = [seq[0] for seq in encode_answers(tokenizer, [prompt] * len(answers), list(answers))]
    if len(set(ids)) != len(ids):
        raise InputError(
            f"answers {list(answers)} share a first token ({ids}); a label-token head cannot tell them apart"
        )
    return [int(i) for i in ids]


def task_prompts(task, tokenizer, limit: int | None, split: str | None = None) -> Prompts:
    """Prompt ids, gold labels and label tokens of a task's own examples (``sieve_edge.tasks``).

    ``split`` defaults to the first of validation, test, calibration the task declares.
    """
    from .. import tasks as T

    spec = T.load_task(task) if isinstance(task, (str, bytes)) or hasattr(task, "__fspath__") else task
    if split is None:
        split = next((s for s in ("validation", "test", "calibration") if s in spec.data), None)
        if split is None:
            raise InputError(f"{spec.path}: task '{spec.name}' has no validation, test or calibration split "
                             "to check the export on")
    examples = T.load_examples(spec, split, limit)
    encoded = T.encode_examples(spec, tokenizer, examples, T.prompt_limit(spec, tokenizer))  # long rows cut
    texts = encoded.texts
    prompts = Prompts(ids=encoded.ids, source=f"task:{spec.name}/{split}")
    if spec.kind == "classification" and spec.labels:
        prompts.labels = spec.label_names
        prompts.gold = [ex.label_index for ex in examples]
        prompts.label_token_ids = first_answer_tokens(tokenizer, texts[0], spec.answers)
        prompts.metric_name = "accuracy (first answer token of each label at the last position)"
        answers = list(spec.answers)
        seqs = T.encode_answers(tokenizer, [t for t in texts for _ in answers], answers * len(texts))
        prompts.single_token_labels = all(
            list(s) == [prompts.label_token_ids[i % len(answers)]] for i, s in enumerate(seqs))
    return prompts


def fixed_prompts(tokenizer) -> Prompts:
    return Prompts(ids=[list(tokenizer(t)["input_ids"]) for t in FIXED_PROMPTS], source="fixed")


# ---------------------------------------------------------------------------- running


def _tensor(ids: list[int]):
    import torch

    return torch.tensor([ids], dtype=torch.long)  # (1, T)


def prompt_logits(model, input_ids):
    """Logits (T, V) of one prompt (batch 1, no padding), float64 on CPU."""
    import torch

    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    logits = out.logits if hasattr(out, "logits") else out[0]
    return torch.as_tensor(logits)[0].to(torch.float64)


def decode_logits(model, input_ids, steps: int):
    """Greedy decode ``steps`` tokens through the KV cache: (tokens, [logits (V,) per step])."""
    import torch

    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=steps,
            min_new_tokens=steps, do_sample=False, num_beams=1, output_logits=True,
            return_dict_in_generate=True, use_cache=True, pad_token_id=0,
        )
    tokens = out.sequences[0, input_ids.shape[1]:].tolist()
    return tokens, [torch.as_tensor(l)[0].to(torch.float64) for l in out.logits]


def compare(reference, exported, prompts: Prompts, *, head_ids: list[int] | None = None,
            atol: float = FP32_LOGITS_ATOL, rtol: float = FP32_LOGITS_RTOL, decode_steps: int = DECODE_STEPS,
            n_prompts: int = LOGIT_PROMPTS) -> dict:
    """Max logit error of ``exported`` against ``reference`` (torch) on the prompts.

    ``head_ids``: the exported model has a task-sized head whose k-th logit is the
    reference's logit ``head_ids[k]``; it is compared on those columns, without decoding.
    Returns a report with ``misses`` (empty when every output is within
    ``atol + rtol * max|reference logit|`` of that prompt / step).
    """
    misses, per_prompt, decode_diffs, scales = [], [], [], []
    for i, seq in enumerate(prompts.ids[:n_prompts]):
        ids = _tensor(seq)
        ref = prompt_logits(reference, ids)
        got = prompt_logits(exported, ids)
        if head_ids is not None:
            ref = ref[:, head_ids]
        if ref.shape != got.shape:
            misses.append(f"prompt {i}: logits shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
            continue
        diff = float((ref - got).abs().max())
        scale = float(ref.abs().max())
        allowed = atol + rtol * scale
        per_prompt.append(diff)
        scales.append(scale)
        if not diff <= allowed:  # also catches NaN
            misses.append(f"prompt {i} ({ids.shape[1]} tokens): max |logit diff| {diff:.3g} > {allowed:.3g} "
                          f"(atol {atol:g} + rtol {rtol:g} x max|logit| {scale:.3g})")
        if head_ids is None and decode_steps > 0 and i < DECODE_PROMPTS:
            ref_tokens, ref_steps = decode_logits(reference, ids, decode_steps)
            got_tokens, got_steps = decode_logits(exported, ids, decode_steps)
            for s, (r, g) in enumerate(zip(ref_steps, got_steps)):
                d = float((r - g).abs().max())
                allowed = atol + rtol * float(r.abs().max())
                decode_diffs.append(d)
                if not d <= allowed:
                    misses.append(f"prompt {i} decode step {s + 1} (KV cache): max |logit diff| {d:.3g} > {allowed:.3g}")
                if ref_tokens[s] != got_tokens[s]:
                    break  # different continuations: later steps are not comparable
    return {
        "atol": atol, "rtol": rtol,
        "max_abs_reference_logit": max(scales, default=None),
        "prompts_compared": len(per_prompt),
        "max_abs_diff": max(per_prompt, default=None),
        "decode_steps_compared": len(decode_diffs),
        "decode_max_abs_diff": max(decode_diffs, default=None),
        "misses": misses,
    }


def metric(model, prompts: Prompts, *, head_ids: list[int] | None = None,
           limit: int | None = None) -> dict:
    """Label-token accuracy (classification tasks) and the predictions it came from.

    Scores each prompt by the logits of the labels' first answer tokens at the last position
    (what the task-sized head computes). ``head_ids``: the model already returns only those
    logits. Returns accuracy (None without gold labels) and the per-example predictions.
    """
    import torch

    if prompts.label_token_ids is None:
        return _next_token_stats(model, prompts, limit)
    preds, label_logprobs = [], []
    for seq in prompts.ids[:limit]:
        logits = prompt_logits(model, _tensor(seq))[-1]
        if head_ids is None:
            logits = logits[prompts.label_token_ids]
        label_logprobs.append(torch.log_softmax(logits, -1))
        preds.append(int(logits.argmax()))
    acc = None
    if prompts.gold:
        gold = prompts.gold[: len(preds)]
        acc = sum(p == g for p, g in zip(preds, gold)) / len(preds)
    return {"name": prompts.metric_name, "examples": len(preds), "accuracy": acc,
            "predictions": preds, "label_logprobs": [lp.tolist() for lp in label_logprobs]}


def _next_token_stats(model, prompts: Prompts, limit):
    """Without labels: next-token predictions and distributions at the last position."""
    import torch

    preds, logprobs = [], []
    for seq in prompts.ids[:limit]:
        logits = prompt_logits(model, _tensor(seq))[-1]
        logprobs.append(torch.log_softmax(logits, -1))
        preds.append(int(logits.argmax()))
    return {"name": "next-token prediction at the last position", "examples": len(preds), "accuracy": None,
            "predictions": preds, "logprobs": logprobs}


def agreement(reference: dict, candidate: dict) -> dict:
    """How a quantized model's metric compares with torch's: delta, agreement, mean KL."""
    import torch

    n = min(reference["examples"], candidate["examples"])
    agree = sum(a == b for a, b in zip(reference["predictions"][:n], candidate["predictions"][:n])) / max(n, 1)
    key = "label_logprobs" if "label_logprobs" in reference else "logprobs"
    kls = []
    for p, q in zip(reference[key][:n], candidate[key][:n]):
        p, q = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64)
        kls.append(float((p.exp() * (p - q)).sum()))
    out = {
        "metric": reference["name"], "examples": n,
        "torch": reference["accuracy"], "exported": candidate["accuracy"],
        "delta": None if reference["accuracy"] is None or candidate["accuracy"] is None
        else candidate["accuracy"] - reference["accuracy"],
        "prediction_agreement": agree,
        "mean_kl_vs_torch": sum(kls) / max(len(kls), 1),
    }
    if any(math.isnan(k) for k in kls):
        out["mean_kl_vs_torch"] = float("nan")
    return out


def raise_on_misses(what: str, report: dict) -> None:
    if report["misses"]:
        raise FidelityError(what, report["misses"])


def summary(report: dict) -> dict:
    """The JSON-safe part of a report (no tensors, no per-example lists)."""
    drop = {"predictions", "label_logprobs", "logprobs"}
    return {k: v for k, v in report.items() if k not in drop}
