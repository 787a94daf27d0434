"""`pagedserve bench --plot`: latency CDFs per run and throughput against request rate, drawn
with matplotlib (the optional `plot` extra)."""
from __future__ import annotations

import math

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "end-to-end latency"))


def require_matplotlib() -> None:
    """Fail with one actionable line before a run whose plot could not be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'pagedserve[plot]' "
                         "(or pip install matplotlib)") from None


def draw(outcomes, summaries: list[dict], path: str) -> None:
    """A 2x2 figure: CDFs of TTFT, TPOT and E2E latency (one line per run), and request and
    output-token throughput for each run's request rate."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (metric, title) in zip(axes.flat, LATENCIES):
        for outcome, summary in zip(outcomes, summaries):
            values = _latencies_ms(outcome, metric)
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))],
                        where="post", label=f"rate {_rate_label(summary)}")
        ax.set(title=f"{title} CDF", xlabel="ms", ylabel="fraction of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    _draw_throughput(axes.flat[3], summaries)
    fig.suptitle("pagedserve bench")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _latencies_ms(outcome, metric: str) -> list[float]:
    values = (getattr(r, metric) for r in outcome.results if r.ok)
    return sorted(v * 1e3 for v in values if v is not None)


def _draw_throughput(ax, summaries: list[dict]) -> None:
    """One bar per run; rates are categories so that inf gets a place of its own. Request
    throughput is written on the bars (on one workload it is proportional to token throughput,
    so a second line would only hide the first)."""
    labels = [_rate_label(s) for s in summaries]
    heights = [s["output_throughput"] for s in summaries]
    bars = ax.bar(range(len(summaries)), heights, color="tab:blue", width=0.6)
    ax.bar_label(bars, [f"{s['request_throughput']:.2f} req/s" for s in summaries],
                 fontsize="small")
    ax.set(title="throughput vs offered request rate", xlabel="request rate (req/s)",
           ylabel="output tokens/s", ylim=(0, max(heights, default=1) * 1.15 or 1))
    ax.set_xticks(range(len(summaries)), labels)
    ax.grid(alpha=0.3, axis="y")


def _rate_label(summary: dict) -> str:
    rate = summary["request_rate"]
    return "inf" if rate == "inf" or (isinstance(rate, float) and math.isinf(rate)) else f"{rate:g}"
