"""PNG plots of a run: learning curves, adapted curves for sinusoid test tasks, and meta-RL
policies' curves over the steps of a trial."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from metalearn.data.gp import oracle_predictive  # noqa: E402
from metalearn.data.tasks import Split  # noqa: E402
from metalearn.run import Run


def plot_learning_curves(metrics: Path, path: Path) -> Path:
    """Training loss, training query score and validation score against the iteration."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    keys = sorted(
        {
            k
            for row in rows
            for k in row
            if k.startswith(("train/", "val/")) and not k.endswith(("_ci95", "outer_lr"))
        }
    )
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(row["step"], row[key]) for row in rows if key in row]
        ax.plot(*zip(*points, strict=True), marker="." if key.startswith("val/") else None)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    return save(fig, path)


def plot_sinusoid_tasks(run: Run, path: Path, tasks: int = 4) -> Path:
    """True sinusoid, the K support points and the prediction after 0, 1 and 10 inner steps."""
    ways, shots, query = run.test_shape
    batch = next(
        run.tasks.episodes(
            "test", tasks, ways, shots, query, seed=run.config.eval.seed, batch_size=tasks
        )
    )
    x = torch.linspace(-5, 5, 200, device=run.device)[:, None]
    fig, axes = plt.subplots(1, tasks, figsize=(4 * tasks, 3.2), squeeze=False)
    for t, ax in enumerate(axes[0]):
        amplitude, phase = batch.info["amplitude"][t], batch.info["phase"][t]
        frequency = batch.info["frequency"][t] if "frequency" in batch.info else 1.0
        ax.plot(x.cpu(), (amplitude * torch.sin(frequency * x - phase)).cpu(), "k", label="true")
        support = Split(batch.support.x[t], batch.support.y[t])
        for steps in sorted({0, 1, 10, run.test_steps}):
            ax.plot(
                x.cpu(), run.algo.predict(support, x, steps=steps).cpu(), label=f"{steps} steps"
            )
        if run.algo.predictive:  # the predictive's 90% band after the test's steps
            mean, std = run.algo.predict_distribution(support, x)
            band(ax, x, mean, std, "tab:purple", f"90% band, {run.test_steps} steps")
        ax.plot(support.x.cpu(), support.y.cpu(), "o", color="tab:red", label=f"K={shots}")
        title = f"A={amplitude:.2f}, phase={phase:.2f}"
        ax.set_title(title + (f", f={frequency:.2f}" if "frequency" in batch.info else ""))
    axes[0][0].legend(fontsize=7)
    return save(fig, path)


def plot_gp_tasks(run: Run, path: Path, tasks: int = 4) -> Path:
    """A few test functions: their context points and targets, the exact GP posterior's mean and
    90% band, and the learner's (a neural process's band; another learner's mean)."""
    ways, shots, query = run.test_shape
    batch = next(
        run.tasks.episodes(
            "test", tasks, ways, shots, query, seed=run.config.eval.seed, batch_size=tasks
        )
    )
    low, high = run.config.data.x_range
    x = torch.linspace(low, high, 200, device=run.device)[:, None]
    fig, axes = plt.subplots(1, tasks, figsize=(4 * tasks, 3.2), squeeze=False)
    for t, ax in enumerate(axes[0]):
        count = int(batch.info["context"][t])
        support = Split(batch.support.x[t, :count], batch.support.y[t, :count])
        info = {k: v[t : t + 1] for k, v in batch.info.items()}
        mean, var = oracle_predictive(
            Split(support.x[None], support.y[None]),
            x[None],
            info,  # its "context" is the count of the unpadded support above
        )
        band(ax, x, mean[0], var[0].sqrt(), "k", "GP oracle")
        if run.algo.predictive:
            m, sd = run.algo.predict_distribution(support, x)
            band(ax, x, m, sd, "tab:blue", run.config.algo.name)
        elif count:
            ax.plot(
                x.cpu(),
                run.algo.predict(support, x).cpu(),
                color="tab:blue",
                label=run.config.algo.name,
            )
        ax.plot(
            batch.query.x[t].cpu(), batch.query.y[t].cpu(), ".", color="0.6", ms=3, label="targets"
        )
        ax.plot(
            support.x.cpu(), support.y.cpu(), "o", color="tab:red", ms=4, label=f"{count} context"
        )
    axes[0][0].legend(fontsize=7)
    return save(fig, path)


def plot_completions(run: Run, path: Path, tasks: int = 4) -> Path:
    """Image completion: for a few test images, the context pixels (grey: unseen), the
    predictive mean and std at every pixel, and the image."""
    ways, shots, query = run.test_shape
    batch = next(
        run.tasks.episodes(
            "test", tasks, ways, shots, query, seed=run.config.eval.seed, batch_size=tasks
        )
    )
    side = run.config.data.image_size
    fig, axes = plt.subplots(tasks, 4, figsize=(6, 1.6 * tasks), squeeze=False)
    for t in range(tasks):
        count = int(batch.info["context"][t])
        support = Split(batch.support.x[t, :count], batch.support.y[t, :count])
        mean, std = run.algo.predict_distribution(support, batch.query.x[t])
        seen = torch.full((side * side,), 0.5)
        where = ((support.x + 1) / 2 * (side - 1)).round().long().cpu()
        seen[where[:, 0] * side + where[:, 1]] = support.y[:, 0].float().cpu()
        images = [seen, mean.float().cpu(), std.float().cpu(), batch.query.y[t, :, 0].cpu()]
        titles = [f"{count} context pixels", "mean", "std", "image"]
        for ax, image, title in zip(axes[t], images, titles, strict=True):
            ax.imshow(image.view(side, side).numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_axis_off()
            ax.set_title(title, fontsize=7)
    return save(fig, path)


def band(ax, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, color: str, label: str):
    """A predictive mean and its central 90% interval (mean +- 1.645 std)."""
    x, mean, std = (t.float().cpu().numpy() for t in (x[:, 0], mean, std))
    ax.plot(x, mean, color=color, label=label)
    ax.fill_between(x, mean - 1.645 * std, mean + 1.645 * std, color=color, alpha=0.2)


def plot_policy_curves(curves: dict[str, torch.Tensor], ylabel: str, path: Path) -> Path:
    """One mean curve per policy against the step of a trial (cumulative regret, accuracy)."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, curve in curves.items():
        steps = torch.arange(1, curve.numel() + 1)
        ax.plot(steps, curve, label=name, linewidth=2.2 if name == "rl2" else 1.2)
    ax.set_xlabel("step of the trial (pull; Harlow: choice)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path, dpi=120)


def plot_return_vs_steps(breakdown: list[dict], title: str, path: Path) -> Path:
    """A policy's mean return on the test tasks (95% CI) against its inner steps (0: before
    adaptation): how much each policy-gradient step adapts it."""
    steps = [entry["inner_steps"] for entry in breakdown]
    means = [entry["return"]["mean"] for entry in breakdown]
    cis = [entry["return"]["ci95"] for entry in breakdown]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.errorbar(steps, means, yerr=cis, marker="o", capsize=4)
    ax.set_xticks(steps)
    ax.set_xlabel("inner policy-gradient steps")
    ax.set_ylabel("return (mean over test tasks, 95% CI)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return save(fig, path, dpi=120)


def save(fig, path: Path, dpi: int = 100) -> Path:
    """Write a figure as PNG (making its folder) and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_loss_curves(curves: dict[str, torch.Tensor], path: Path) -> Path:
    """Mean optimizee loss against the optimiser's step, one line per optimiser (log scale)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (name, curve) in enumerate(curves.items()):
        ax.plot(torch.arange(curve.numel()), curve, label=name, linewidth=2.2 if i == 0 else 1.2)
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("mean loss over test problems")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save(fig, path, dpi=120)


def plot_online(results: dict, path: Path) -> Path:
    """An online run's two curves against the task's index in the stream: each method's score
    on the new task after k updates (faint: every task; bold: a running mean), and its
    cumulative regret against the hindsight comparator (results.json's `comparator`)."""
    metric, k = results["metric"], results["stream"]["inner_steps"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, entry in results["methods"].items():
        scores = torch.tensor(entry["score"], dtype=torch.float64)
        index = torch.arange(1, len(scores) + 1)
        window = max(1, len(scores) // 10)
        smooth = scores.cumsum(0)
        smooth = (smooth - torch.nn.functional.pad(smooth, (window, 0))[: len(scores)]) / (
            index.clamp(max=window)
        )
        (line,) = left.plot(index, smooth, linewidth=2.0 if method == "ftml" else 1.3, label=method)
        left.plot(index, scores, color=line.get_color(), alpha=0.25, linewidth=0.8)
        right.plot(index, entry["regret"], color=line.get_color(), label=method)
    left.set_title(f"{metric} after k={k} updates (running mean of {max(1, len(index) // 10)})")
    left.set_xlabel("task index")
    left.set_ylabel(metric)
    right.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--")
    right.set_title("cumulative regret (loss) vs the hindsight prior")
    right.set_xlabel("task index")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, path, dpi=110)
