"""Matplotlib PNGs for a sweep: tokens/s/GPU and MFU vs GPU count (measured solid, predicted
dashed, one colour per scaling study), and predicted vs measured step time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster login nodes or CI
import matplotlib.pyplot as plt  # noqa: E402

from hcx_megatron.perf.sweep import RunResult  # noqa: E402


def _series(results: list[RunResult]) -> dict[str, list[RunResult]]:
    out: dict[str, list[RunResult]] = {}
    for r in results:
        out.setdefault(r.run.scaling, []).append(r)
    return out


def _best_per_count(rs: list[RunResult], key) -> list[tuple[int, float]]:
    """Per GPU count, the best value among that count's layouts (a scaling curve shows the best)."""
    best: dict[int, float] = {}
    for r in rs:
        v = key(r)
        if v is not None:
            best[r.run.gpus] = max(best.get(r.run.gpus, v), v)
    return sorted(best.items())


def scaling_plot(results: list[RunResult], metric: str, path: str | Path, title: str) -> Path:
    """metric: 'tokens' (tokens/s/GPU) or 'mfu' (percent)."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if metric == "tokens":
        meas = lambda r: r.measured_tokens_per_sec_per_gpu  # noqa: E731
        pred = lambda r: r.predicted_tokens_per_sec_per_gpu  # noqa: E731
        ylabel = "tokens / s / GPU"
    else:
        meas = lambda r: None if r.measured_mfu is None else 100 * r.measured_mfu  # noqa: E731
        pred = lambda r: 100 * r.predicted_mfu  # noqa: E731
        ylabel = "MFU (%)"
    counts = sorted({r.run.gpus for r in results})
    for i, (scaling, rs) in enumerate(sorted(_series(results).items())):
        c = colors[i % len(colors)]
        m = _best_per_count(rs, meas)
        p = _best_per_count(rs, pred)
        if m:
            ax.plot([x for x, _ in m], [y for _, y in m], "o-", color=c,
                    label=f"{scaling}: measured (best layout per count)")
            for x, y in m:
                text = f"{y:,.0f}" if metric == "tokens" and y >= 100 else f"{y:.3g}"
                # alternate series label above / below so that equal points at one count stay legible
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(0, 8 if i % 2 == 0 else -14),
                            ha="center", fontsize=8, color=c)
        if p:
            ax.plot([x for x, _ in p], [y for _, y in p], "s--", color=c, alpha=0.6, mfc="none",
                    label=f"{scaling}: predicted (best per count)")
    if len(counts) > 1 and max(counts) / min(counts) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(counts)
    ax.set_xticklabels([str(c) for c in counts])
    ax.set_xlabel("GPUs (processes)")
    ax.set_ylabel(ylabel)
    top = max([v for rs in _series(results).values() for f in (meas, pred) for _, v in _best_per_count(rs, f)],
              default=1.0)
    ax.set_ylim(0, top * 1.18)  # head room for the value labels
    ax.set_xlim(min(counts) / 1.3, max(counts) * 1.3) if len(counts) > 1 and ax.get_xscale() == "log" else None
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def predicted_vs_measured_plot(results: list[RunResult], path: str | Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=110)
    pts = [(r.measured.step_time_s, r.predicted_step_s, r) for r in results if r.measured]
    if pts:
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        lo, hi = min(xs + ys) / 1.5, max(xs + ys) * 1.5
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (scaling, rs) in enumerate(sorted(_series([p[2] for p in pts]).items())):
            c = colors[i % len(colors)]
            ax.scatter([r.measured.step_time_s for r in rs], [r.predicted_step_s for r in rs], color=c, zorder=3,
                       label=scaling)
            for r in rs:
                # short tags (S16 = strong scaling at 16 GPUs; the table has the full layout)
                ax.annotate(f"{scaling[0].upper()}{r.run.gpus}", (r.measured.step_time_s, r.predicted_step_s),
                            textcoords="offset points", xytext=(5, -4 - 9 * (i % 2)), fontsize=7, color=c)
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="predicted = measured")
        ax.fill_between([lo, hi], [lo / 1.2, hi / 1.2], [lo * 1.2, hi * 1.2], color="grey", alpha=0.15,
                        label="±20 %")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no measured runs yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("measured step time (s)")
    ax.set_ylabel("predicted step time (s)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


__all__ = ["scaling_plot", "predicted_vs_measured_plot"]
