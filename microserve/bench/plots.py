"""One PNG per metric against request rate, one line per configuration."""

from __future__ import annotations

from pathlib import Path

# file suffix -> (how to read it from a summary, y-axis label)
METRICS = {
    "jct_mean": (("jct_ms", "mean"), "mean JCT (ms)"),
    "jct_p99": (("jct_ms", "p99"), "P99 JCT (ms)"),
    "ttft_mean": (("ttft_ms", "mean"), "mean TTFT (ms)"),
    "ttft_p99": (("ttft_ms", "p99"), "P99 TTFT (ms)"),
    "tpot_mean": (("tpot_ms", "mean"), "mean TPOT (ms)"),
    "tpot_p99": (("tpot_ms", "p99"), "P99 TPOT (ms)"),
    "throughput": (("request_throughput",), "throughput (requests/s)"),
    "goodput": (("goodput",), "goodput (requests/s meeting the SLOs)"),
}


def metric_value(summary: dict, path: tuple[str, ...]):
    value = summary
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def draw(points: list[dict], prefix: str | Path, title: str = "") -> list[Path]:
    """points: dicts with label, rate and summary. Writes <prefix>_<metric>.png; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(p["label"] for p in points))
    paths = []
    for name, (path, ylabel) in METRICS.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in labels:
            xy = sorted((p["rate"], metric_value(p["summary"], path)) for p in points if p["label"] == label)
            xy = [(x, y) for x, y in xy if y is not None]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=label)
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out = Path(f"{prefix}_{name}.png")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        paths.append(out)
    return paths
