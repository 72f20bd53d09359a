"""Search plots (matplotlib, headless): the metric-vs-reduction frontier and a keep heat map."""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def frontier_png(points: list[dict], chosen: dict, dense_metric: float, tolerance_abs: float, path: Path,
                 metric: str = "accuracy", objective: str = "params", title: str = "",
                 higher_is_better: bool = True) -> Path:
    """Every fully scored candidate (gain vs validation metric), the tolerance line, the pick."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    full = [p for p in points if p.get("full", True)]
    for feasible, color, label in ((True, "tab:green", "within tolerance"), (False, "tab:gray", "beyond tolerance")):
        xs = [100 * p["gain"] for p in full if bool(p["feasible"]) == feasible]
        ys = [p["metric"] for p in full if bool(p["feasible"]) == feasible]
        if xs:
            ax.scatter(xs, ys, s=14, alpha=0.6, color=color, label=label)
    # the frontier: best metric seen at each gain or more
    pts = sorted(((100 * p["gain"], p["metric"]) for p in full), key=lambda t: -t[0])
    front, best = [], None
    for x, y in pts:
        better = best is None or (y > best if higher_is_better else y < best)
        if better:
            best = y
            front.append((x, y))
    if front:
        ax.plot([x for x, _ in front], [y for _, y in front], color="tab:blue", lw=1, label="frontier")
    limit = dense_metric - tolerance_abs if higher_is_better else dense_metric + tolerance_abs
    ax.axhline(dense_metric, color="black", lw=0.8, ls=":", label=f"dense {dense_metric:.3f}")
    ax.axhline(limit, color="tab:red", lw=0.8, ls="--", label="tolerance")
    ax.scatter([100 * chosen["gain"]], [chosen["metric"]], marker="*", s=160, color="tab:orange",
               zorder=5, label="chosen plan")
    ax.set_xlabel("parameters removed (% of linear)" if objective == "params" else "time per example saved (%, cost table)")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(title or "search frontier", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def heatmap_png(levels: dict[str, float], path: Path, title: str = "") -> Path:
    """Layers (rows) × matrix types (columns), colour = keep fraction (1.0 = dense)."""
    from .architectures import layer_index, matrix_type, relative_name

    plt = _plt()
    types = list(dict.fromkeys(matrix_type(relative_name(n)) for n in levels))
    layers = sorted({layer_index(n) for n in levels})
    grid = [[float("nan")] * len(types) for _ in layers]
    row = {l: i for i, l in enumerate(layers)}
    col = {t: j for j, t in enumerate(types)}
    for name, keep in levels.items():
        grid[row[layer_index(name)]][col[matrix_type(relative_name(name))]] = keep
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(types), 1.2 + 0.22 * len(layers)), dpi=110)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(len(types)), types, rotation=30, ha="right", fontsize=8)
    step = max(1, len(layers) // 15)
    ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)], fontsize=8)
    ax.set_ylabel("layer")
    ax.set_title(title or "keep level per matrix (1 = dense)", fontsize=10)
    fig.colorbar(im, ax=ax, label="keep")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
