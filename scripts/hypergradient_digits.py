"""Hypergradient descent on logistic regression (Baydin et al. 2018, figure 2, on scikit-learn's
digits instead of MNIST): the final training loss against the initial learning rate for SGD,
SGD-HD, SGDN and SGDN-HD, Adam and Adam-HD, and the HD rates' trajectories.

    python scripts/hypergradient_digits.py --epochs 10 --out results/hypergradient_digits

writes <out>.md (the table) and <out>.png (final loss against the initial rate; the rates over
the iterations). Each run: the same initialisation (zeros, as a logistic regression allows),
the same minibatches of 128, weight decay 1e-4 and beta as the authors' run.sh (1e-3 for the
SGD variants, 1e-7 for Adam's), momentum 0.9.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metalearn.data.optimizees import load_digits  # noqa: E402
from metalearn.optim import DEFAULT_HYPERGRAD_LR, SGDHD, AdamHD  # noqa: E402

METHODS = ("sgd", "sgd_hd", "sgdn", "sgdn_hd", "adam", "adam_hd")
RATES = (1e-4, 1e-3, 1e-2, 1e-1)


def optimizer(method: str, params, lr: float):
    decay = 1e-4
    if method == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=decay)
    if method == "sgdn":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=decay)
    if method == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=decay)
    beta = DEFAULT_HYPERGRAD_LR[method]
    if method == "adam_hd":
        return AdamHD(params, lr, hypergrad_lr=beta, weight_decay=decay)
    nesterov = method == "sgdn_hd"
    momentum = 0.9 if nesterov else 0.0
    return SGDHD(
        params, lr, hypergrad_lr=beta, momentum=momentum, nesterov=nesterov, weight_decay=decay
    )


def train(method: str, lr: float, epochs: int, x, y) -> tuple[float, list[float]]:
    """(final training loss over all digits, the rate after every step)."""
    w = torch.zeros(64, 10, requires_grad=True)
    b = torch.zeros(10, requires_grad=True)
    opt = optimizer(method, [w, b], lr)
    generator = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(epochs):
        for index in torch.randperm(len(y), generator=generator).split(128):
            opt.zero_grad()
            F.cross_entropy(x[index] @ w + b, y[index]).backward()
            opt.step()
            rates.append(opt.param_groups[0]["lr"])
    with torch.no_grad():
        return F.cross_entropy(x @ w + b, y).item(), rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("results/hypergradient_digits"))
    args = parser.parse_args()
    x, y = load_digits(torch.device("cpu"))
    start = time.perf_counter()
    final, trajectories = {}, {}
    for method in METHODS:
        for lr in RATES:
            final[method, lr], trajectories[method, lr] = train(method, lr, args.epochs, x, y)
    seconds = time.perf_counter() - start
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method in METHODS:
        style = "-" if method.endswith("_hd") else "--"
        values = [final[method, lr] for lr in RATES]
        left.plot(RATES, values, style, marker="o", label=method)
        if method.endswith("_hd"):
            for lr in RATES:
                right.plot(trajectories[method, lr], label=f"{method} from {lr:g}", linewidth=1)
    left.set(xscale="log", yscale="log", xlabel="initial learning rate", ylabel="final loss")
    left.set_title(f"logistic regression on digits, {args.epochs} epochs")
    right.set(yscale="symlog", xlabel="iteration", ylabel="learning rate")
    right.set_title("hypergradient rates (negative allowed)")
    right.set_yscale("symlog", linthresh=1e-4)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    spread = {m: max(final[m, r] for r in RATES) / min(final[m, r] for r in RATES) for m in METHODS}
    lines = [
        f"# Hypergradient descent: logistic regression on digits, {args.epochs} epochs",
        "",
        f"`python scripts/hypergradient_digits.py --epochs {args.epochs}` ({seconds:.0f} s on "
        f"2 CPU threads). Final training loss over all 1797 digits after each run; the last "
        f"column is the largest over the smallest final loss across the initial rates "
        f"(1: insensitive). Plot: [{args.out.name}.png]({args.out.name}.png).",
        "",
        "| method | " + " | ".join(f"lr0 = {r:g}" for r in RATES) + " | max / min |",
        "| --- | " + " | ".join("---" for _ in RATES) + " | --- |",
    ]
    for m in METHODS:
        cells = " | ".join(f"{final[m, r]:.4f}" for r in RATES)
        lines.append(f"| {m} | {cells} | {spread[m]:.2f} |")
    lines += ["", "Final rates of the HD runs:", ""]
    for m in METHODS:
        if m.endswith("_hd"):
            ends = ", ".join(f"{r:g} → {trajectories[m, r][-1]:.3g}" for r in RATES)
            lows = min(min(trajectories[m, r]) for r in RATES)
            lines.append(f"- {m}: {ends} (lowest rate seen: {lows:.3g})")
    text = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)
    assert all(math.isfinite(v) for v in final.values())


if __name__ == "__main__":
    main()
