"""A run's picture from its ``metrics.jsonl``: loss, held-out accuracy and throughput over iterations.

``plot_run(run_dir)`` writes ``metrics.png`` beside the metrics: the training (and held-out) loss;
the held-out answer accuracy, per question type when the data names types, with the chance level
(dotted) and the accuracy with every frame blanked (dashed) when the run measured them; tokens/s,
and MFU when the device has a known peak. ``tools/plot_metrics.py RUN_DIR`` draws it for any run.
"""

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a resumed run's repeated iterations keep their last record."""
    latest: dict[tuple[str, int], dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                latest[(record["kind"], record["iteration"])] = record
    return sorted(latest.values(), key=lambda r: (r["iteration"], r["kind"]))


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["iteration"], r[key]) for r in records if isinstance(r.get(key), int | float)]
    return [p[0] for p in points], [p[1] for p in points]


def accuracy_keys(record: dict) -> list[str]:
    """``accuracy`` and its per-type ``accuracy/<type>`` keys of an eval record."""
    return ["accuracy", *sorted(k for k in record if k.startswith("accuracy/"))]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run in ``run_dir`` (its ``metrics.jsonl``) into ``out`` (default ``run_dir/metrics.png``)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no metrics of a run there")
    records = read_metrics(metrics)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    chance = next((r for r in reversed(records) if r["kind"] == "data"), {})
    fig, (loss_ax, acc_ax, rate_ax) = plt.subplots(1, 3, figsize=(16, 4.6))
    loss_ax.plot(*_series(train, "loss"), label="training", lw=1)
    if evals:
        loss_ax.plot(*_series(evals, "loss"), "o-", label="held-out", lw=1.5)
    loss_ax.set(title="loss", xlabel="iteration", yscale="log")
    loss_ax.legend()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, key in enumerate(accuracy_keys(evals[-1]) if evals else []):
        color = colors[i % len(colors)]
        name = "all" if key == "accuracy" else key.split("/", 1)[1]
        acc_ax.plot(*_series(evals, key), "o-", color=color, lw=2 if key == "accuracy" else 1.2, label=name)
        if f"novision_{key}" in evals[-1]:
            acc_ax.plot(*_series(evals, f"novision_{key}"), "--", color=color, lw=1, alpha=0.8)
        if key.replace("accuracy", "chance") in chance:
            acc_ax.axhline(chance[key.replace("accuracy", "chance")], ls=":", color=color, lw=1)
    acc_ax.set(title="held-out accuracy (dashed: frames blanked; dotted: chance)", xlabel="iteration", ylim=(0, 1))
    if evals:
        acc_ax.legend(loc="lower right")
    steps, rates = _series(train, "text_tokens_per_s")
    rate_ax.plot(steps, rates, lw=1, label="text tokens/s")
    rate_ax.set(title="throughput", xlabel="iteration", ylabel="text tokens/s")
    mfu_steps, mfu = _series(train, "mfu")
    if mfu:
        twin = rate_ax.twinx()
        twin.plot(mfu_steps, [100 * m for m in mfu], color=colors[1], lw=1)
        twin.set_ylabel("MFU (%)")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "metrics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
