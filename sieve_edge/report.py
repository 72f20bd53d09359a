"""Human-readable reports from plain dicts: Markdown summary, HTML with plots, model card.

A ground module: imports nothing of sieve_edge (it works on the dicts that ``validate``
writes as ``report.json``); matplotlib is imported only to draw the HTML page's plots.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _lat(m: dict | None, key: str) -> str:
    s = ((m or {}).get("latency") or {}).get(key) or {}
    return "-" if s.get("p50") is None else f"{s['p50']:.1f} / {s['p90']:.1f}"


def summary_rows(report: dict) -> list[tuple[str, str]]:
    m = report.get("measurement") or {}
    ref = report.get("reference") or {}
    prof = report.get("profile") or {}
    emu = report.get("emulation")
    rows = [
        ("target", f"{report['target']} ({prof.get('runtime')}, {prof.get('device')}, {prof.get('weights')} weights, "
                   f"{prof.get('threads')} threads)"),
        ("status", f"**{report['status'].upper()}**"),
    ]
    if m:
        rows += [
            ("measured with", f"{m.get('runtime')} {m.get('runtime_version')}, precision hint "
                              f"{m.get('inference_precision')}, {m.get('threads')} threads"),
            ("host", f"{m['host'].get('processor')} ({m['host'].get('machine')}, {m['host'].get('cpu_count')} CPUs)"),
            ("task", f"{m.get('task')} ({m.get('kind')}), {m.get('n_examples')} test examples"),
            (m.get("metric", "metric"), f"{m['value']:.4f} (dense reference {_fmt(ref.get('value'), 4)})"),
            *_task_rows(m, ref),
        ]
        if emu:  # QEMU's time and memory are not the device's: none is shown as a measurement
            c = emu["comparison"]
            rows += [
                ("emulated", f"{emu['arch']}, QEMU -cpu {emu['cpu']} ({emu.get('qemu')}), Python {emu.get('python')}"),
                ("x86 run (same runner, same examples)",
                 f"{c['metric']} {c['x86']:.4f}; arm64 {c['arm64']:.4f}"
                 + ("" if c["agreement"] is None else f"; predictions agree on {c['n'] - len(c['disagreements'])}"
                    f" of {c['n']}")),
                ("latency, peak RSS", "not measured (emulated)"),
            ]
        else:
            rows += [
                ("first token ms p50 / p90", _lat(m, "first_token_ms")),
                ("per token ms p50 / p90", _lat(m, "token_ms")),
                ("per example ms p50 / p90", _lat(m, "example_ms")),
                ("peak RSS MB", _fmt(m.get("peak_rss_mb"))),
            ]
        rows.append(("model size MB", _fmt(m.get("size_mb"))))
    if report.get("reduction") is not None:
        rows.append(("linear parameters removed", f"{100 * report['reduction']:.1f}%"))
    return rows


def _task_rows(m: dict, ref: dict) -> list[tuple[str, str]]:
    """Which test rows were scored, prompts cut, and each [[extra_test]] beside the test split."""
    rows = []
    sample = m.get("sample") or {}
    if sample and sample.get("rows") != sample.get("of"):
        how = "first rows" if sample.get("mode") == "head" else f"{sample.get('mode')}, seed {sample.get('seed')}"
        rows.append(("test rows", f"{sample.get('rows')} of {sample.get('of')} ({how})"))
    if m.get("truncated"):
        rows.append(("prompts truncated", f"{m['truncated']} of {m.get('n_examples')} to "
                                          f"{m.get('max_prompt_tokens')} tokens ({m.get('truncation')} side)"))
    for name, x in (m.get("extra_tests") or {}).items():
        dense = ((ref.get("extra_tests") or {}).get(name) or {}).get("value")
        cut = f", {x['truncated']} prompts truncated" if x.get("truncated") else ""
        rows.append((f"extra test {name}", f"{x['metric']} {x['value']:.4f} on {x['n_examples']} examples "
                                           f"(dense reference {_fmt(dense, 4)}){cut}"))
    return rows


def render_markdown(report: dict) -> str:
    lines = [f"# Validation: {report['bundle_name']} on {report['target']}", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary_rows(report)]
    lines += ["", "## Gates", "", "| gate | budget | measured | status | detail |", "|---|---|---|---|---|"]
    for g in report["gates"]:
        unit = g["unit"] if g["unit"] in ("ms", "MB") else ""
        measured = "-" if g["measured"] is None else f"{g['measured']:.4g} {unit}".strip()
        lines.append(f"| {g['gate']} | {g['limit']:g} {unit} | {measured} | {g['status'].upper()} | {g['detail']} |")
    if report.get("emulation"):
        lines += [""] + emulation_markdown(report["emulation"])
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", f"Latency gates apply to p90. MB = 2^20 bytes. Created {report.get('created_at')} "
              f"by {report.get('created_by')}.", ""]
    return "\n".join(lines)


def emulation_markdown(emu: dict, max_rows: int = 50) -> list[str]:
    """The arm64-vs-x86 section: summary, then the examples whose predictions differ."""
    c = emu["comparison"]
    score = c.get("score", "label log-prob")
    lines = [f"## {emu['arch']} under emulation vs x86", "",
             f"Both runs: this bundle's runner, same {c['n']} examples, {emu.get('runtime')}. {emu['arch']}: QEMU "
             f"-cpu {emu['cpu']} (CPU features seen by the runtime: {' '.join(emu.get('features') or ['?'])}).", "",
             "| | x86 | " + emu["arch"] + " |", "|---|---|---|",
             f"| {c['metric']} | {c['x86']:.4f} | {c['arm64']:.4f} |",
             f"| wall time per example (s) | {_fmt(emu.get('x86_s_per_example'), 3)} | "
             f"{_fmt(emu.get('arm64_s_per_example'), 3)} (emulated: not the device's speed) |", ""]
    if c.get("max_logprob_diff") is not None:
        lines.append(f"Largest {score} difference over all examples: {c['max_logprob_diff']:.3g} "
                     f"(mean of the per-example maxima {c['mean_logprob_diff']:.3g}).")
    if c.get("agreement") is not None:
        d = c["disagreements"]
        lines.append(f"Predictions agree on {c['n'] - len(d)} of {c['n']} examples ({100 * c['agreement']:.1f}%).")
        if d:
            lines += ["", f"| example | x86 | {emu['arch']} | max {score} diff |", "|---|---|---|---|"]
            lines += [f"| {r['index']} | {r['x86']} | {r['arm64']} | {_fmt(r['max_logprob_diff'], 3)} |"
                      for r in d[:max_rows]]
            if len(d) > max_rows:
                lines.append(f"| ... | {len(d) - max_rows} more in report.json | | |")
    return lines


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plots(report: dict, others: list[dict]) -> dict[str, str]:
    """Base64 PNGs: metric vs reduction, and latency per profile (this report and ``others``)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    m, ref = report.get("measurement") or {}, report.get("reference") or {}
    fig, ax = plt.subplots(figsize=(5, 3.2))
    curve = ref.get("curve") or []  # optional: [{"reduction": r, "value": v, "label": ...}] from a search
    if curve:
        ax.plot([100 * p["reduction"] for p in curve], [p["value"] for p in curve], "o-", color="0.6",
                label="candidates (search)")
    if ref.get("value") is not None:
        ax.plot([0], [ref["value"]], "s", color="black", label="dense reference")
    if m:
        ax.plot([100 * (report.get("reduction") or 0.0)], [m["value"]], "*", ms=14, color="tab:red",
                label=f"this bundle on {report['target']}")
    budget = (report.get("profile") or {}).get("budget") or {}
    if ref.get("value") is not None and budget.get("max_metric_drop") is not None:
        sign = -1 if (m or {}).get("higher_is_better", True) else 1
        ax.axhline(ref["value"] + sign * budget["max_metric_drop"], ls="--", color="tab:orange", label="budget")
    xs = [100 * p["reduction"] for p in curve] + [100 * (report.get("reduction") or 0.0)]
    ax.set_xlim(-2, max(50.0, max(xs) + 10))
    ax.set_xlabel("linear parameters removed (%)")
    ax.set_ylabel(m.get("metric") or ref.get("metric") or "metric")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    out["metric_vs_reduction"] = _png(fig)
    plt.close(fig)

    runs = [r for r in [report, *others] if r.get("measurement") and not r.get("emulation")]  # no emulated times
    if runs:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        keys = [("first_token_ms", "first token"), ("token_ms", "per token"), ("example_ms", "per example")]
        width = 0.8 / len(keys)
        for k, (key, label) in enumerate(keys):
            vals = [((r["measurement"]["latency"].get(key) or {}).get("p90") or 0.0) for r in runs]
            ax.bar([i + k * width for i in range(len(runs))], vals, width, label=f"{label} p90")
        ax.set_xticks([i + width for i in range(len(runs))])
        ax.set_xticklabels([r["target"] for r in runs], fontsize=8)
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        out["latency_per_profile"] = _png(fig)
        plt.close(fig)
    return out


def render_html(report: dict, others: list[dict] = ()) -> str:
    images = plots(report, list(others))
    esc = html.escape
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v.replace('**', ''))}</td></tr>" for k, v in summary_rows(report))
    colour = {"pass": "#2e7d32", "fail": "#c62828", "not run": "#8d6e00"}
    def measured(g: dict) -> str:
        return "-" if g["measured"] is None else f"{g['measured']:.4g}"

    gates = "".join(
        f"<tr><td>{esc(g['gate'])}</td><td>{g['limit']:g} {esc(g['unit'])}</td><td>{measured(g)}</td>"
        f"<td style='color:{colour.get(g['status'], 'black')}'><b>{esc(g['status'].upper())}</b></td>"
        f"<td>{esc(g['detail'])}</td></tr>" for g in report["gates"])
    notes = "".join(f"<li>{esc(n)}</li>" for n in report.get("notes") or [])
    emulation = ""
    if report.get("emulation"):  # the Markdown section, as preformatted text
        emulation = f"<pre>{esc(chr(10).join(emulation_markdown(report['emulation'])))}</pre>"
    figs = "".join(f"<figure><img src='data:image/png;base64,{b64}' alt='{esc(name)}'>"
                   f"<figcaption>{esc(name.replace('_', ' '))}</figcaption></figure>" for name, b64 in images.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Validation: {esc(report['bundle_name'])} on {esc(report['target'])}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}figure{{display:inline-block;margin:1em}}</style>
</head><body>
<h1>Validation: {esc(report['bundle_name'])} on {esc(report['target'])}</h1>
<table>{rows}</table>
<h2>Gates</h2>
<table><tr><th>gate</th><th>budget</th><th>measured</th><th>status</th><th>detail</th></tr>{gates}</table>
{emulation}
{f'<h2>Notes</h2><ul>{notes}</ul>' if notes else ''}
<h2>Plots</h2>{figs}
<p><small>Latency gates apply to p90. MB = 2^20 bytes. Created {esc(str(report.get('created_at')))}.</small></p>
</body></html>
"""


def write_reports(report: dict, out, others: list[dict] = ()) -> dict[str, Path]:
    """Write report.json, report.md and report.html into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    texts = {"json": json.dumps(report, indent=2, default=str) + "\n", "md": render_markdown(report),
             "html": render_html(report, others)}
    for key, path in paths.items():
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        tmp.write_text(texts[key], encoding="utf-8")
        os.replace(tmp, path)
    return paths


def model_card(manifest: dict, export: dict, reference: dict | None, reports: list[dict],
               task_data: dict | None = None) -> str:
    """MODEL_CARD.md: what was pruned and how much, on what data, measured where."""
    src = export.get("source") or {}
    fid = export.get("fidelity") or {}
    lines = [f"# Model card: {manifest.get('task_name')} bundle for {manifest.get('target_name')}", ""]
    lines += ["## Model", ""]
    lines.append(f"- base model: {src.get('base_model') or 'unknown (dense export without a sieve-edge manifest)'}"
                 + (f" ({src.get('architecture')})" if src.get("architecture") else ""))
    if src.get("ranks"):
        red = src.get("linear_param_reduction")
        lines.append(f"- pruning: LLM-Sieve low-rank factorization, method `{src.get('method')}`, "
                     f"{len(src['ranks'])} linear matrices factorized"
                     + (f" of {len(src['shapes'])}" if src.get("shapes") else ""))
        if red is not None:
            lines.append(f"- linear parameters removed: {100 * red:.1f}% "
                         f"({src.get('linear_params_dense', '?')} -> {src.get('linear_params', '?')})")
        ranks = sorted(src["ranks"].values())
        lines.append(f"- ranks: min {ranks[0]}, median {ranks[len(ranks) // 2]}, max {ranks[-1]}")
    else:
        lines.append("- pruning: none (dense model)")
    if export.get("densified"):
        lines.append(f"- kept dense at export (pair not faster): {len(export['densified'])} matrices")
    lines.append(f"- exported as: {export.get('format')} with {export.get('weights')} weights"
                 + (", task-sized LM head (labels only)" if export.get("task_head") else ""))
    if fid:
        lines.append(f"- export fidelity: `{json.dumps(fid, default=str)[:300]}`")
    lines += ["", "## Task and data", ""]
    lines.append(f"- task: {manifest.get('task_name')} (`{manifest.get('task')}`), test split "
                 f"`{manifest.get('test_data')}` ({manifest.get('n_test')} examples)")
    if src.get("task"):
        lines.append(f"- pruned for task: {src['task']}")
    for split, path in (task_data or manifest.get("task_data") or {}).items():
        lines.append(f"- {split} data: `{path}`")
    for key, value in (manifest.get("card_info") or {}).items():
        lines.append(f"- {key}: {value}")
    lines += ["", "## Measured", ""]
    if reference and reference.get("value") is not None:
        lines.append(f"- dense reference: {reference['metric']} {reference['value']:.4f} on {reference.get('n', '?')} "
                     f"test examples, measured with {reference.get('measured_with', '?')}")
    else:
        lines.append("- dense reference: none given (the metric-drop gate cannot be checked)")
    if reports:
        lines += ["", "| target | status | metric | first token p90 ms | example p90 ms | peak RSS MB | host |",
                  "|---|---|---|---|---|---|---|"]
        for r in reports:
            m = r.get("measurement") or {}
            lat = m.get("latency") or {}
            lines.append(
                f"| {r['target']} | {r['status']} | {_fmt(m.get('value'), 4)} | "
                f"{_fmt((lat.get('first_token_ms') or {}).get('p90'))} | {_fmt((lat.get('example_ms') or {}).get('p90'))} | "
                f"{_fmt(m.get('peak_rss_mb'))} | {(m.get('host') or {}).get('processor', '-')} |")
    else:
        lines.append("- not validated yet: run `sieve-edge validate --bundle . --target "
                     f"{manifest.get('target_name')}` (or `python runner.py` on the device)")
    lines += ["", f"Made by {manifest.get('created_by')} on {manifest.get('created_at')}.", ""]
    return "\n".join(lines)
