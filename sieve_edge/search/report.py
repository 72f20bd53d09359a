"""The search's files for people: ``search_report.md``, ``frontier.png`` and ``heatmap.png``."""
from __future__ import annotations

from pathlib import Path

from .config import BEFORE_FIRST_GENERATION

CONTINUE = ("`sieve-edge run` with a larger --budget-minutes continues from the saved state "
            "(`sieve-edge search --force` starts over)")


def bottlenecks(levels: dict[str, float], sensitivity: dict[str, float], n: int = 8
                ) -> tuple[list[tuple[str, float, float]], list[tuple[str, float, float]]]:
    """(kept densest, cut most): (name, keep, sensitivity at keep 0.5), ties broken by sensitivity."""
    rows = [(name, keep, sensitivity.get(name, 0.0)) for name, keep in levels.items()]
    densest = sorted(rows, key=lambda r: (-r[1], -r[2], r[0]))[:n]
    cut = sorted(rows, key=lambda r: (r[1], r[2], r[0]))[:n]
    return densest, cut


def stop_reason(summary: dict) -> str:
    """Why the search ended, in words."""
    stopped = summary.get("stopped", "done")
    steps = "generation" if summary["strategy"] == "ga" else "bisection step"
    budget = summary.get("budget_minutes")
    if stopped == BEFORE_FIRST_GENERATION:
        return (f"**{BEFORE_FIRST_GENERATION}** ({budget:g} min of searching): the plan is the best candidate "
                f"fully scored while seeding (at worst the dense model); {CONTINUE}")
    if stopped == "budget":
        return f"the budget ({budget:g} min of searching) ended after {summary['generations']} {steps}s; {CONTINUE}"
    if stopped == "stalled":
        return "no better plan for several generations"
    return f"finished ({summary['generations']} {steps}s)"


def time_table(t: dict, reduction: float) -> list[str]:
    """Milliseconds per example of the dense model and the plan, next to their parameters."""
    steps = t["new_tokens"] - 1
    lines = ["## Time per example", "",
             f"What the time objective priced: a prompt pass over {t['prompt_tokens']} tokens"
             + (f" and {steps} decode step(s) (one token each)" if steps else " (the answer is read from it)")
             + f", every registry matrix as the export runs it (q/k/v and gate/up first factors fused into one "
             f"MatMul per group), MatMul times from {t['cost_table']}. Attention, norms, embeddings and the head "
             "are not in it: they cost every plan the same.", "",
             "| | linear parameters | prompt pass ms | decode ms per token | **ms per example** |",
             "|---|---|---|---|---|"]
    for label, row, kept in (("dense", t["dense"], 1.0), ("plan", t["plan"], 1.0 - reduction)):
        lines.append(f"| {label} | {100 * kept:.1f}% | {row['prompt_ms']:.3f} | {row['token_ms']:.3f} | "
                     f"**{row['example_ms']:.3f}** |")
    return lines + [""]


def search_report(summary: dict, result: dict) -> str:
    """Markdown report. ``result`` is ``SearchResult.to_dict()``; ``summary`` the search.json
    summary, whose refit, heal and test parts are absent before the refit."""
    from ..architectures import layer_index, matrix_type, relative_name

    s = summary
    val = s["validation"]
    budget = "" if s.get("budget_minutes") is None else f" of a {s['budget_minutes']:g} min budget"
    lines = [
        f"# Search report: {s['task']} on {s['model']}", "",
        f"- strategy **{s['strategy']}**, objective **{s['objective']}**, refit method **{s['method']}**, "
        f"seed {s['seed']}",
        f"- tolerance {s['tolerance']:g}{' (relative)' if s['relative'] else ''} = {s['tolerance_abs']:.4f} "
        f"{s['metric']} on the validation split ({val['n']} examples)",
        f"- **linear parameters removed: {100 * s['linear_param_reduction']:.1f}%**"
        + (f"; **time per example saved: {100 * s['time']['saved']:.1f}%** (cost table, below)" if s.get("time") else ""),
        f"- {s['evaluations']} candidate evaluations ({s['full_evaluations']} on the full validation split, "
        f"the rest rejected by racing), {s['generations']} generations/steps, "
        f"{s['search_seconds'] / 60:.1f} min searching{budget}"
        + (f", {s['total_seconds'] / 60:.1f} min with calibration, refit and scoring" if "total_seconds" in s else "")
        + (f"; resumed after step {s['resumed_from']}" if s.get("resumed_from") is not None else ""),
        f"- search stopped: {stop_reason(s)}",
    ]
    if s.get("weights") == "int8":
        lines += [f"- candidates were scored with **simulated int8 weights** (as the int8 export computes): the dense "
                  f"model alone scores {val['dense_int8']:.4f} that way; the *search* column is int8, "
                  "the others float32"]
    refit = val.get("refit") is not None
    lines += ["", "| | dense | search (output factors) |" + (" refit | final |" if refit else ""),
              "|---|---|---|" + ("---|---|" if refit else ""),
              f"| validation {s['metric']} | {val['dense']:.4f} | "
              + ("never searched |" if val["search"] is None else f"{val['search']:.4f} |")
              + (f" {val['refit']:.4f} | {val['final']:.4f} |" if refit else "")]
    if s.get("test"):
        lines.append(f"| test {s['metric']} ({s['test']['n']} examples, never seen by the search) | "
                     f"{s['test']['dense']:.4f} | |" + (f" | {s['test']['pruned']:.4f} |" if refit else ""))
    elif refit:
        lines += ["", "The test split, never seen by the search, is scored on the exported bundle by `validate` "
                  "(its report: `OUT/reports/TARGET/`)."]
    lines.append("")
    if s.get("time"):
        lines += time_table(s["time"], s["linear_param_reduction"])
    if s.get("holdout"):
        h = s["holdout"]
        lines += [f"Holdout: {h['rows']} validation rows the search never scored (dense {h['dense']:.4f}) scored "
                  f"the plans tried: " + ", ".join(f"{100 * t['gain']:.1f}% → {t['metric']:.4f} (drop {t['drop']:+.4f}, "
                                            f"{'within' if t['passed'] else 'beyond'})" for t in h["tries"])
                  + ("" if h["passed"] else "; none held, so the dense model is kept") + ".", ""]
    if s.get("healing"):
        h = s["healing"]

        def predicted(t):
            return "" if t.get("predicted_drop") is None else f", predicted {t['predicted_drop']:+.4f}"

        tries = ", ".join(f"{100 * t['gain']:.1f}% (drop {t['search_drop']:+.4f}{predicted(t)}) → {t['metric']:.4f} "
                          f"(drop {t['drop']:+.4f}, {'within' if t['passed'] else 'beyond'})" for t in h["tries"])
        confirmed = ", ".join(f"{100 * c['gain']:.1f}% (estimated {c['estimate']:.4f}) → {c['metric']:.4f}"
                              for c in h.get("confirmed") or [])
        kept = ("the largest healed plan within the tolerance" if h["healed"] else
                "the largest plan within the tolerance unhealed" if h["fallback_gain"] > 0 else "the dense model")
        lines += [f"Healed choice: the search accepted plans up to the tolerance + {h['slack']:g} (slack). "
                  + (f"Racing estimates scored in full: {confirmed}. " if confirmed else "")
                  + f"Plans beyond the tolerance healed {h['steps']} {h['loss']} steps on their searched factors "
                  f"and scored on validation: " + (tries or "none to try") + f". Kept {kept}: "
                  f"{100 * h['gain']:.1f}% removed.", ""]

    if s.get("refit_tries"):
        c = s["refit_tries"]

        def searched(t: dict) -> str:
            if t.get("made"):
                return "made halfway between a passed and a failed try, never searched"
            return (f"searched drop {t['search_drop']:+.4f}{'' if t['search_full'] else ' estimated'}, expected "
                    f"{t['predicted_drop']:+.4f}{', best bet' if t.get('best_bet') else ''}")

        tries = ", ".join(f"{100 * t['gain']:.1f}% ({searched(t)}) → drop {t['drop']:+.4f} "
                          f"({'within' if t['passed'] else 'beyond'})" for t in c["tries"])
        method = c.get("method", s["method"])
        start = (f"the searched plan ({100 * c['searched_gain']:.1f}%) refit with '{method}' dropped "
                 f"{c['start_gap']:+.4f} less than its searched factors (the refit gap)"
                 if c.get("start", method) == method else
                 f"the searched plan ({100 * c['searched_gain']:.1f}%) started as the fit kept it, its searched "
                 f"'{c['start']}' factors (its refit missed the tolerance unhealed)")
        lines += [f"Refit tries: {start}; larger plans the "
                  f"search measured (or the climb made between a passed and a failed try), refit and scored on "
                  f"validation ({c['tries_allowed']} at most; expected drop: "
                  f"searched drop minus the mean gap): " + (tries or "no larger plan measured") + ". "
                  + (f"Each try's drop is the larger of its drops on the search's rows and on the {c['holdout']['rows']} "
                     "held-out rows (" + ", ".join(f"{100 * t['gain']:.1f}%: {t['validation_drop']:+.4f} and "
                                                   f"{t['holdout_drop']:+.4f}" for t in c["holdout"]["tries"])
                     + "). " if c.get("holdout") else "")
                  + (f"Each try was healed ({c['healing']['loss']}, {c['healing']['steps']} steps) before it was "
                     "judged; drop refit → healed: " + ", ".join(
                         f"{100 * t['gain']:.1f}%: {t['refit_drop']:+.4f} → {t['drop']:+.4f}"
                         for t in c["healing"]["tries"]) + ". " if c.get("healing") else "")
                  + (f"Kept the largest within the tolerance: {100 * c['gain']:.1f}% of the objective; the *search* "
                     "column is its searched score" + (" (a plan made between two tries has none)"
                                                       if val["search"] is None else "") + "."
                     if c["kept"] else "Kept the searched plan."), ""]

    def healed(h: dict) -> str:
        return (f"validation {h['metric_before']:.4f} → {h['metric_after']:.4f}, loss {h['loss_first']:.3f} → "
                f"{h['loss_last']:.3f}")

    if s.get("heal"):
        h = s["heal"]
        on = (f"rank-{h['rank']} adapters ({h['trainable_params']:,} parameters, merged into the factors)"
              if h.get("rank") else f"{h['trainable_params']:,} factor parameters")
        lines += [f"Healing: {h['steps']} steps at lr {h['lr']:g} on {on}, "
                  f"{healed(h)}; {'kept' if h['kept'] else 'discarded (it scored worse)'}.", ""]
    if s.get("heal_searched"):
        lines += [f"Healing the searched factors instead (the healed refit missed the tolerance): "
                  f"{healed(s['heal_searched'])}; the model kept is the '{s['method']}' one.", ""]
    for note in s.get("notes", []):
        lines += [f"Note: {note}", ""]
    task, spec = result.get("task_sensitivity") or {}, result.get("sensitivity") or {}
    levels = result["levels"]
    densest, cut = bottlenecks(levels, task or spec)
    lines += ["## Bottlenecks", "", "Matrices kept densest (the task's knowledge sits there) and cut most. "
              + ("*Task KL* is the label-Fisher estimate of KL(dense ‖ cut) of the label distribution with the "
                 "matrix alone at keep 0.5 (`sensitivity.py`); " if task else "")
              + "*spectrum error* is the relative calibration output error the matrix alone would show at keep 0.5.", ""]
    if task:
        lines += ["| kept densest | keep | task KL | spectrum error | | cut most | keep | task KL | spectrum error |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for (a, ka, ea), (b, kb, eb) in zip(densest, cut):
            lines.append(f"| `{a}` | {ka:.2f} | {ea:.3g} | {spec.get(a, 0.0):.3f} | | `{b}` | {kb:.2f} | {eb:.3g} | "
                         f"{spec.get(b, 0.0):.3f} |")
    else:
        lines += ["| kept densest | keep | spectrum error | | cut most | keep | spectrum error |",
                  "|---|---|---|---|---|---|---|"]
        for (a, ka, ea), (b, kb, eb) in zip(densest, cut):
            lines.append(f"| `{a}` | {ka:.2f} | {ea:.3f} | | `{b}` | {kb:.2f} | {eb:.3f} |")
    by_type: dict[str, list[float]] = {}
    by_layer: dict[int, list[float]] = {}
    for name, keep in levels.items():
        by_type.setdefault(matrix_type(relative_name(name)), []).append(keep)
        by_layer.setdefault(layer_index(name), []).append(keep)
    lines += ["", "Mean keep per matrix type: " + ", ".join(f"{t} {sum(v) / len(v):.2f}" for t, v in by_type.items()),
              "", "Mean keep per layer: " + ", ".join(f"{l}: {sum(v) / len(v):.2f}" for l, v in sorted(by_layer.items())),
              "", "![frontier](frontier.png)", "", "![keep per matrix](heatmap.png)", "",
              "## Check it on another dataset of the same task", "",
              "A plan searched on one dataset should hold on another of the same task (the LLM-Sieve paper "
              "reports that its pruning generalises across datasets of one task domain), e.g. "
              "sst2 → uci_yelp / uci_amazon / uci_imdb:", "",
              "```", "sieve-edge eval --model OUT --task TASK_FILE_OF_THE_OTHER_DATASET --split test", "```", ""]
    return "\n".join(lines)


def write_plots(folder: Path, summary: dict, result: dict) -> None:
    """frontier.png (metric vs gain of every candidate) and heatmap.png (keep per matrix)."""
    from ..plots import frontier_png, heatmap_png

    s = summary
    frontier_png(result["frontier"], {"gain": result["gain"], "metric": result["metric"]}, result["dense_metric"],
                 result["tolerance_abs"], folder / "frontier.png", s["metric"], s["objective"],
                 f"{s['task']}: {s['strategy']} search, tolerance {s['tolerance']:g}"
                 f"{' relative' if s['relative'] else ''}", s["metric"] != "perplexity")
    heatmap_png(result["levels"], folder / "heatmap.png",
                f"{s['task']}: keep per matrix ({100 * s['linear_param_reduction']:.1f}% removed)")
