"""PNG plots of a loadtest.py result (also usable on its own to redraw from the JSON).

    python benchmarks/plots.py [benchmarks/results/loadtest.json]

Writes, next to the JSON and named after it (loadtest.json -> loadtest_*.png): *_cdf.png
(latency CDF per outcome, per workload), *_load.png (latency vs offered load, bare handler and
proxy exact hits), *_hits.png (outcome shares per workload) and *_cost.png (USD per 1k queries
with and without the cache).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

CDF_POINTS = np.concatenate([np.linspace(0, 99, 100), [99.5, 99.9, 100.0]])
COLORS = {"hit-exact": "tab:green", "hit-semantic": "tab:blue", "miss": "tab:red",
          "bypass": "tab:gray", "error": "black", "bare": "tab:orange", "direct": "tab:purple"}


def plot_cdf(res: dict[str, Any], path: Path) -> Path | None:
    """Latency CDF per outcome, one panel per workload (plus the fixed-rate bare runs)."""
    panels: list[tuple[str, dict[str, Any]]] = list(res.get("workloads", {}).items())
    rounds = res.get("rounds", {}).get("runs", {})
    if rounds.get("bare_exact_rate"):
        panels.insert(0, ("bare vs exact hit (round 1)", {"outcomes": {
            **rounds["bare_exact_rate"][0]["outcomes"], **rounds["proxy_exact"][0]["outcomes"]}}))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, run) in zip(axes[0], panels, strict=True):
        for outcome, d in run["outcomes"].items():
            cdf = d.get("cdf_ms")
            if not cdf:
                continue
            ax.plot(np.maximum(cdf, 1e-3), CDF_POINTS / 100, color=COLORS.get(outcome),
                    label=f"{outcome} (n={d['latency']['n']})")
        ax.set_xscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("latency from scheduled send, ms")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("fraction of requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_load(res: dict[str, Any], path: Path) -> Path | None:
    """P50 / P99 and achieved rate vs offered rate."""
    sweep = res.get("sweep")
    if not sweep:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, runs, color in (("bare handler", sweep["bare"], "tab:orange"),
                              ("proxy exact hits", sweep["proxy_repeats"], "tab:green")):
        x = [r["offered_rps"] for r in runs]
        ax.plot(x, [r["all"].get("p50_ms", np.nan) for r in runs], "o--", color=color,
                label=f"{name} P50")
        ax.plot(x, [r["all"].get("p99_ms", np.nan) for r in runs], "o-", color=color,
                label=f"{name} P99")
        ax2.plot(x, [r["achieved_rps"] for r in runs], "o-", color=color, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("offered load, req/s (open loop)")
    ax.set_ylabel("latency, ms")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    top = max(r["offered_rps"] for r in sweep["bare"])
    ax2.plot([0, top], [0, top], ":", color="gray", label="offered")
    ax2.set_xlabel("offered load, req/s")
    ax2.set_ylabel("completed, req/s")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_hits(res: dict[str, Any], path: Path) -> Path | None:
    """Share of each outcome per workload (stacked bars)."""
    w = res.get("workloads")
    if not w:
        return None
    names = list(w)
    outcomes = ["hit-exact", "hit-semantic", "miss", "bypass", "error"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bottom = np.zeros(len(names))
    for o in outcomes:
        vals = np.array([w[n]["hit_rate"].get(o, 0.0) if o != "error" else
                         w[n]["errors"] / max(w[n]["counted"], 1) for n in names])
        if vals.any():
            ax.bar(names, vals, bottom=bottom, label=o, color=COLORS.get(o))
            bottom += vals
    ax.set_ylabel("share of requests")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cost(res: dict[str, Any], path: Path) -> Path | None:
    """USD per 1k queries per workload, with the cache and without it."""
    w = res.get("workloads")
    if not w:
        return None
    names = list(w)
    x = np.arange(len(names))
    spent = [1000 * w[n]["cost"]["usd_per_query"] for n in names]
    without = [1000 * w[n]["cost"]["usd_per_query_without_cache"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(x - 0.2, without, 0.4, label="without cache", color="tab:gray")
    ax.bar(x + 0.2, spent, 0.4, label="with edge-proxy", color="tab:green")
    ax.set_xticks(x, names)
    ax.set_ylabel("USD per 1,000 queries")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(res: dict[str, Any], out_dir: Path, stem: str = "loadtest") -> list[Path]:
    """Every plot this result has data for (``<stem>_cdf.png`` ...); returns the files."""
    made = [plot_cdf(res, out_dir / f"{stem}_cdf.png"),
            plot_load(res, out_dir / f"{stem}_load.png"),
            plot_hits(res, out_dir / f"{stem}_hits.png"),
            plot_cost(res, out_dir / f"{stem}_cost.png")]
    return [p for p in made if p is not None]


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else
               Path(__file__).resolve().parent / "results" / "loadtest.json")
    for p in plot_all(json.loads(src.read_text()), src.parent, src.stem):
        print(p)
