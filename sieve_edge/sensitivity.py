"""Per-matrix, per-rank task sensitivity from the Fisher information of the label distribution.

What the genetic search needs to start well is, for every matrix and every ladder rank, how
much cutting that one matrix moves the task's answer. The spectrum error (calibration output
error) says how much a cut changes the matrix's output, not whether the task cares. This
module estimates the task's own cost in one pass of a few dozen examples:

    KL(dense || cut) ≈ ½ Δwᵀ F Δw,   F = Σ_c p_c g_c g_cᵀ,   g_c = ∇_w log p_c

(F is the Fisher information of the label distribution p over the task's label tokens, exact
in the labels: one backward per label, weighted by p_c.) For a linear layer y = W x cut to
rank r, Δw = B_r A_r − W, and per example

    g_c · Δw = Σ_t δ_tᵀ (B_r A_r − W) x_t = cumsum_j(Σ_t (δ_t·b_j)(a_j·x_t))[r] − Σ_t δ_tᵀ W x_t

with δ_t = ∂(e_c − p)·z / ∂y_t: two small matmuls give the value for every rank at once, no
weight gradient is ever formed, and only what a normal backward keeps is held. Summing the
estimates of several matrices assumes they act independently; the search verifies every
candidate on the validation split, so the estimate only orders the candidates.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import architectures as arch
from .errors import TaskSpecError


def label_fisher_kl(model, scorer, ranks: dict[str, Sequence[int | None]], subset: Sequence[int],
                    batch_size: int = 8, progress: Callable[[int, int], None] | None = None
                    ) -> dict[str, list[float]]:
    """Estimated KL(dense || cut) of the label distribution, per matrix and per listed rank.

    ``model`` carries ``SearchLinear`` modules (``factorize.attach_search_``), all dense;
    ``ranks[name]`` lists the ranks to estimate (None = dense, estimate 0). ``scorer`` is a
    classification ``Scorer`` on its fast path (one token per label); ``subset`` the rows
    of its split to average over. Returns name -> [estimate per listed rank].
    """
    from .evaluate import _hidden_states, head_logits, model_device
    from .factorize import SearchLinear, dense_weight, materialized
    from .tasks import right_pad

    if not getattr(scorer, "fast", False):
        raise TaskSpecError("Fisher sensitivity needs a classification task whose labels are single tokens")
    modules = {}
    for name in ranks:
        module = arch.get_module(model, name)
        if not isinstance(module, SearchLinear) or module.rank is not None:
            raise ValueError(f"{name}: expected a dense SearchLinear (attach_search_ first)")
        modules[name] = module
    # per matrix: the cumsum positions of the wanted ranks
    want = {name: list(rs) for name, rs in ranks.items()}
    totals = {name: torch.zeros(len(rs), dtype=torch.float64) for name, rs in want.items()}
    weight = {"p": None}  # (B,) weight of the current backward: p_c of each example
    hooks = []

    def on_forward(name):
        def hook(module, args, output):
            x = args[0].detach()  # held by the gradient hook below, freed with the graph

            def on_grad(delta, name=name, module=module, x=x):
                _accumulate(name, module, x, delta.detach())

            if output.requires_grad:
                output.register_hook(on_grad)
        return hook

    def _accumulate(name, module, x, delta):
        rs = want[name]
        k = max((r for r in rs if r is not None), default=0)
        out = torch.zeros(x.shape[0], len(rs), dtype=torch.float64, device=x.device)
        with materialized(module):  # a backward hook runs outside forward: offloaded tensors are read back
            w = dense_weight(module.dense)
            d = delta.to(w.dtype)
            c = (d * (x @ w.T)).sum(dim=tuple(range(1, d.dim())))                  # (B,)  Σ_t δᵀ W x
            if k:
                p = d @ module.Bt[:k].T                                              # (B, T, k)
                q = x @ module.A[:k].T                                               # (B, T, k)
                cum = (p * q).sum(dim=tuple(range(1, p.dim() - 1))).double().cumsum(-1)  # (B, k)
        if k:
            for i, r in enumerate(rs):
                if r is not None:
                    out[:, i] = cum[:, r - 1] - c.double()
        pw = weight["p"].to(out.device, torch.float64)
        totals[name] += (pw[:, None] * out.square()).sum(0).cpu()

    for name, module in modules.items():
        hooks.append(module.register_forward_hook(on_forward(name)))
    embed = model.get_input_embeddings()
    hooks.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    # by name: an offloaded module's parameters are new objects after every forward
    frozen = [n for n, p in model.named_parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    device = model_device(model)
    token_ids = scorer.label_token_ids.to(device)
    rows = [int(i) for i in subset]
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            seqs = [scorer.prompt_ids[i] for i in batch]
            ids, mask = right_pad(seqs, scorer.pad)
            with torch.enable_grad():
                hidden = _hidden_states(model, ids.to(device), mask.to(device))
                last = torch.tensor([len(s) - 1 for s in seqs], device=device)
                z = head_logits(model, hidden[torch.arange(len(seqs), device=device), last], token_ids)  # (B, L)
                prob = torch.softmax(z.detach().double(), -1)
                n_labels = z.shape[1]
                for cls in range(n_labels):
                    direction = -prob.clone()
                    direction[:, cls] += 1.0                                        # e_c - p
                    weight["p"] = prob[:, cls]
                    (direction.to(z.dtype) * z).sum().backward(retain_graph=cls + 1 < n_labels)
            if progress is not None:
                progress(min(start + batch_size, len(rows)), len(rows))
    finally:
        for h in hooks:
            h.remove()
        params = dict(model.named_parameters())
        for n in frozen:
            params[n].requires_grad_(True)
        model.train(was_training)
    n = max(len(rows), 1)
    return {name: [0.5 * float(v) / n for v in totals[name]] for name in want}


def lagrangian_genomes(costs: dict[str, Sequence[float]], gains: dict[str, Sequence[float]],
                       names: Sequence[str], n: int = 24) -> list[tuple[int, ...]]:
    """Genomes that best trade estimated cost for gain: per matrix, the level maximizing
    ``gain - λ·cost``, for λ from large (all dense) to small (all cut deepest); distinct,
    ordered from least to most gain. ``costs[name][level]`` and ``gains[name][level]`` are
    per-matrix and additive; level 0 is dense (cost 0, gain 0)."""
    ratios = []
    for name in names:
        for c, g in zip(costs[name][1:], gains[name][1:]):
            if g > 0:
                ratios.append(max(c, 1e-30) / g)
    if not ratios:
        return [tuple(0 for _ in names)]
    lo, hi = min(ratios), max(ratios)
    # a cut pays when λ < gain/cost: above 1/lo nothing is cut, below 1/hi every matrix is
    lam_hi, lam_lo = 2.0 / lo, 0.5 / hi
    out: list[tuple[int, ...]] = []
    steps = max(n - 1, 1)
    for i in range(n):
        lam = lam_hi * (lam_lo / lam_hi) ** (i / steps)
        genome = []
        for name in names:
            vals = [g - lam * c for c, g in zip(costs[name], gains[name])]
            genome.append(max(range(len(vals)), key=lambda j: (vals[j], -j)))
        g = tuple(genome)
        if g not in out:
            out.append(g)
    return out


def task_costs(model, scorer, ranks: dict[str, Sequence[int | None]], examples: int,
               log: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """``label_fisher_kl`` on ``examples`` validation rows spread evenly over the scorer's split
    (file order may be sorted by label): the seed costs of the genetic search."""
    import time

    t0 = time.perf_counter()
    n = min(examples, scorer.n)
    subset = sorted({round(i * (scorer.n - 1) / max(n - 1, 1)) for i in range(n)})
    costs = label_fisher_kl(model, scorer, ranks, subset)
    if log:
        log(f"task sensitivity (label Fisher) of {len(costs)} matrices on {len(subset)} validation examples "
            f"in {time.perf_counter() - t0:.0f} s")
    return costs
