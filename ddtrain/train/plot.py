"""`ddtrain plot RUN_DIR`: the curves of a run from its metrics.jsonl, as one PNG.

Four panels: training loss per logged step (with test loss per epoch), train and test accuracy
per epoch, throughput (samples/s), and the per-step time breakdown (mean over ranks, with the
slowest rank's total as a line) so a straggler or a communication stall is visible.
matplotlib is an optional extra (`pip install 'ddtrain[plot]'`).
"""

from __future__ import annotations

from pathlib import Path

from ddtrain.errors import ConfigError, DDTrainError
from ddtrain.train.metrics import read_metrics

PHASE_COLORS = {"data": "#8c8c8c", "forward": "#1f77b4", "backward": "#ff7f0e",
                "stats_sync": "#9467bd", "comm_wait": "#d62728", "optimizer": "#2ca02c"}


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write the figure (default RUN_DIR/metrics.png) and return its path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("ddtrain plot needs matplotlib: pip install 'ddtrain[plot]'") from None
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise DDTrainError(f"{run_dir}: no metrics.jsonl (is it a ddtrain run directory?)")
    records = read_metrics(run_dir)
    steps = [r for r in records if r.get("event") == "step"]
    epochs = [r for r in records if r.get("event") == "epoch"]
    if not steps:
        raise DDTrainError(f"{run_dir}/metrics.jsonl has no step records yet")

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="train (step)")
    if epochs:
        ax.plot([r["step"] for r in epochs], [r["test_loss"] for r in epochs], "o-", label="test (epoch)")
        ax.plot([r["step"] for r in epochs], [r["train_loss"] for r in epochs], "s--", label="train (epoch mean)")
    ax.set(title="loss", xlabel="step", ylabel="cross-entropy / loss")
    ax.set_yscale("log")
    ax.legend()

    ax = axes[0][1]
    if epochs:
        x = [r["epoch"] + 1 for r in epochs]
        ax.plot(x, [100 * r["train_accuracy"] for r in epochs], "s--", label="train")
        ax.plot(x, [100 * r["test_accuracy"] for r in epochs], "o-", label="test")
        best = max(epochs, key=lambda r: r["test_accuracy"])
        ax.annotate(f"{100 * best['test_accuracy']:.2f}%", (best["epoch"] + 1, 100 * best["test_accuracy"]),
                    textcoords="offset points", xytext=(0, 8), ha="center")
        ax.legend()
    ax.set(title="accuracy", xlabel="epoch", ylabel="%")

    ax = axes[1][0]
    sps = [(r["step"], r["samples_per_second"]) for r in steps if r.get("samples_per_second")]
    if sps:
        ax.plot(*zip(*sps), lw=0.8)
    ax.set(title="throughput", xlabel="step", ylabel="samples/s (whole job)")

    ax = axes[1][1]
    timed = [r for r in steps if r.get("timing_ms")]
    if timed:
        x = [r["step"] for r in timed]
        bottom = [0.0] * len(timed)
        for phase, color in PHASE_COLORS.items():
            values = [r["timing_ms"].get(phase, {}).get("mean", 0.0) for r in timed]
            ax.fill_between(x, bottom, [b + v for b, v in zip(bottom, values)], color=color, alpha=0.8,
                            label=phase, step="mid")
            bottom = [b + v for b, v in zip(bottom, values)]
        slowest = [sum(r["timing_ms"].get(p, {}).get("max", 0.0) for p in PHASE_COLORS) for r in timed]
        ax.plot(x, slowest, "k:", lw=0.8, label="sum of per-phase max over ranks")
        ax.legend(fontsize=8)
    ax.set(title="time per step (mean over ranks)", xlabel="step", ylabel="ms")

    start = next((r for r in records if r.get("event") == "start"), {})
    fig.suptitle(f"{run_dir.name}: {start.get('world_size', '?')} rank(s), {start.get('device', '?')}")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
