"""What a finished sweep leaves behind: the trial table (CSV and printed), the plot, the best trial.

Pure functions of the trial rows, so they are tested without Ray or MLflow.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COMPLETED = "completed"
STOPPED = "stopped early"
ERROR = "error"
PENDING = "not started"
INTERRUPTED = "interrupted"  # running when the sweep was stopped; continues on resume


@dataclass
class TrialRow:
    trial_id: str
    status: str  # COMPLETED | STOPPED | ERROR, or PENDING | INTERRUPTED in an interrupted sweep
    ratios: dict[str, float]
    lr: float
    objective: float | None  # the last validation objective the trial reported
    step: int | None  # the last training step the trial reported
    mlflow_run_id: str = ""
    error: str = ""


def best_trial(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """Best objective among trials that reported one (errored trials included if they did)."""
    scored = [r for r in rows if r.objective is not None and math.isfinite(r.objective)]
    if not scored:
        return None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda r: r.objective)


def trials_csv(rows: list[TrialRow], sources: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [
            "trial_id",
            "status",
            *[f"ratio_{k}" for k in sources],
            "lr",
            "objective",
            "step",
            "mlflow_run_id",
            "error",
        ]
    )
    for r in rows:
        writer.writerow(
            [
                r.trial_id,
                r.status,
                *[f"{r.ratios.get(k, 0.0):.6g}" for k in sources],
                f"{r.lr:.6g}",
                "" if r.objective is None else f"{r.objective:.6g}",
                "" if r.step is None else r.step,
                r.mlflow_run_id,
                r.error,
            ]
        )
    return out.getvalue()


def summary_table(rows: list[TrialRow], sources: list[str], objective_name: str) -> str:
    """Fixed-width table, one line per trial, in trial order."""
    header = ["trial", *sources, "lr", objective_name, "step", "status"]
    body = [
        [
            r.trial_id,
            *[f"{r.ratios[k]:.3f}" if k in r.ratios else "-" for k in sources],
            f"{r.lr:.2e}",
            "-" if r.objective is None else f"{r.objective:.4f}",
            "-" if r.step is None else str(r.step),
            r.status + (f": {r.error}" if r.error else ""),
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=False)]
    lines = [
        "  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ternary_xy(ratios: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Barycentric (a, b, c) -> the plane: corners a=(0,0), b=(1,0), c=(0.5, sqrt(3)/2)."""
    total = ratios.sum(axis=1, keepdims=True)
    b, c = (ratios / np.where(total > 0, total, 1))[:, 1:].T
    return b + 0.5 * c, c * math.sqrt(3) / 2


def _ternary_axes(sources: list[str]):
    fig, ax = plt.subplots(figsize=(7.2, 5.8))
    for level in (0.2, 0.4, 0.6, 0.8):  # iso-ratio lines of each source
        for i in range(3):
            ends = np.zeros((2, 3))
            ends[:, i] = level
            ends[0, (i + 1) % 3] = ends[1, (i + 2) % 3] = 1 - level
            ax.plot(*_ternary_xy(ends), color="0.88", lw=0.8, zorder=0)
    xs, ys = _ternary_xy(np.vstack([np.eye(3), np.eye(3)[:1]]))
    ax.plot(xs, ys, color="0.3", lw=1, zorder=0)
    for x, y, source, dy in zip(xs[:3], ys[:3], sources, (-0.04, -0.04, 0.03), strict=True):
        ax.text(x, y + dy, f"{source} = 1", ha="center", va="top" if dy < 0 else "bottom", fontsize=9)
    ax.set_xlim(-0.15, 1.15)
    ax.set_ylim(-0.12, 1.0)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig, [ax]


def objective_plot(rows: list[TrialRow], sources: list[str], objective_name: str, mode: str) -> bytes:
    """PNG: a ternary scatter for three sources, else the objective against each source's ratio.

    Colour is the objective (brighter = better); circles finished, crosses were stopped early or failed.
    """
    scored = [r for r in rows if r.objective is not None and math.isfinite(r.objective)]
    weights = np.array([[r.ratios.get(k, 0.0) for k in sources] for r in scored]).reshape(
        len(scored), len(sources)
    )
    values = np.array([r.objective for r in scored])
    finished = np.array([r.status == COMPLETED for r in scored], dtype=bool)
    best = best_trial(rows, mode)
    ternary = len(sources) == 3
    if ternary:
        fig, axes = _ternary_axes(sources)
    else:
        fig, grid = plt.subplots(1, len(sources), figsize=(4.0 * len(sources), 3.6), squeeze=False)
        axes = list(grid[0])
    low, high = (values.min(), values.max()) if len(values) else (0.0, 1.0)
    colour = {"cmap": "viridis_r" if mode == "min" else "viridis", "vmin": low, "vmax": high}
    scatter = None
    for i, ax in enumerate(axes):
        x, y = _ternary_xy(weights) if ternary else (weights[:, i], values)
        if not ternary:
            ax.set(xlabel=f"ratio of {sources[i]}", ylabel=objective_name, xlim=(-0.05, 1.05))
            ax.grid(alpha=0.3)
        for mask, marker in ((finished, "o"), (~finished, "X")):
            if mask.any():
                scatter = ax.scatter(
                    x[mask], y[mask], c=values[mask], marker=marker, s=60, edgecolors="k", **colour
                )
        if best is not None:
            j = scored.index(best)
            ax.scatter([x[j]], [y[j]], marker="*", s=340, facecolors="none", edgecolors="red", lw=1.5)
    legend = [
        plt.Line2D([], [], marker="o", ls="", color="0.6", mec="k", label=COMPLETED),
        plt.Line2D([], [], marker="X", ls="", color="0.6", mec="k", label=f"{STOPPED} / {ERROR}"),
        plt.Line2D([], [], marker="*", ls="", mfc="none", mec="red", ms=14, label="best"),
    ]
    axes[0].legend(handles=legend, loc="upper left", fontsize=8, frameon=False)
    if scatter is not None:
        fig.colorbar(scatter, ax=axes, label=f"{objective_name} ({mode})", shrink=0.8, pad=0.02)
    fig.suptitle(f"{objective_name} against the mixing ratios: {len(scored)} of {len(rows)} trials scored")
    return _png(fig)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def predicted_vs_actual_plot(actual: np.ndarray, predicted: np.ndarray, spearman: float, name: str) -> bytes:
    """PNG: each trial's leave-one-out prediction against its measured objective."""
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    ax.scatter(actual, predicted, s=40, edgecolors="k", color="tab:blue")
    low, high = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
    ax.plot([low, high], [low, high], color="0.5", lw=1, ls="--")
    ax.set(xlabel=f"measured {name}", ylabel=f"predicted {name} (leave-one-out)")
    ax.set_title(f"{len(actual)} trials, Spearman {spearman:.3f}")
    ax.grid(alpha=0.3)
    return _png(fig)


def mixture_surface_plot(
    sources: list[str],
    scored: np.ndarray,
    trials: np.ndarray,
    recommended: np.ndarray,
    name: str,
    mode: str,
    shown: int = 6000,
) -> bytes:
    """PNG: the predicted objective over the simplex (ternary for 3 sources, else its mean against each
    source's weight, a partial dependence), trials as black-edged dots, the recommendation as a red star."""
    k = len(sources)
    weights, predicted = scored[:, :k], scored[:, k]
    cmap = "viridis_r" if mode == "min" else "viridis"
    if k == 3:
        fig, (ax,) = _ternary_axes(sources)
        sample = np.random.default_rng(0).permutation(len(weights))[:shown]
        dots = ax.scatter(*_ternary_xy(weights[sample]), c=predicted[sample], s=6, cmap=cmap, zorder=1)
        ax.scatter(*_ternary_xy(trials), s=30, facecolors="none", edgecolors="k", zorder=2, label="trials")
        ax.scatter(
            *_ternary_xy(recommended[None]), marker="*", s=340, color="red", zorder=3, label="recommended"
        )
        ax.legend(loc="upper left", fontsize=8, frameon=False)
        fig.colorbar(dots, ax=ax, label=f"predicted {name}", shrink=0.8)
    else:
        fig, grid = plt.subplots(1, k, figsize=(3.6 * k, 3.4), squeeze=False, sharey=True)
        edges = np.linspace(0, 1, 21)
        for i, ax in enumerate(grid[0]):
            bins = np.clip(np.digitize(weights[:, i], edges) - 1, 0, len(edges) - 2)
            means = [
                predicted[bins == b].mean() if (bins == b).any() else np.nan for b in range(len(edges) - 1)
            ]
            ax.plot((edges[:-1] + edges[1:]) / 2, means, color="tab:blue")
            ax.axvline(recommended[i], color="red", lw=1.2)
            for w in trials[:, i]:
                ax.axvline(w, color="k", lw=0.3, alpha=0.4, ymax=0.05)
            ax.set(xlabel=f"weight of {sources[i]}", xlim=(0, 1))
            ax.grid(alpha=0.3)
        grid[0][0].set_ylabel(f"mean predicted {name}")
    fig.suptitle(f"predicted {name} over {len(weights)} mixtures ({mode})")
    return _png(fig)


def mixing_weights_plot(history: dict[str, list[tuple[int, float]]]) -> bytes:
    """PNG: the online mixing weights of each source over the training steps, stacked to 1."""
    steps = sorted({step for points in history.values() for step, _ in points})
    fig, ax = plt.subplots(figsize=(8, 4))
    logged = {source: sorted(points) for source, points in history.items() if points}
    if logged:
        series = [np.interp(steps, *zip(*points, strict=True)) for points in logged.values()]
        ax.stackplot(steps, series, labels=list(logged))
    ax.set(xlabel="step", ylabel="sampling weight", ylim=(0, 1))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    return _png(fig)
