"""Turn the README runs' results.json files into the README's markdown results table.

Usage: python scripts/results_table.py outputs/readme
"""

import json
import sys
from pathlib import Path

import yaml

# run name -> (what it reproduces, the published number with its source)
PUBLISHED = {
    "protonet_5w1s": ("ProtoNet, Omniglot 5-way 1-shot", "98.8% (Snell et al. 2017)"),
    "protonet_5w5s": ("ProtoNet, Omniglot 5-way 5-shot", "99.7% (Snell et al. 2017)"),
    "maml_5w1s_8min": ("MAML, Omniglot 5-way 1-shot", "98.7 ± 0.4% (Finn et al. 2017)"),
    "fomaml_5w1s_8min": ("FOMAML, Omniglot 5-way 1-shot", "98.3 ± 0.5% (Finn et al. 2017)"),
    "maml_5w1s_45min": ("MAML, Omniglot 5-way 1-shot", "98.7 ± 0.4% (Finn et al. 2017)"),
    "reptile_5w1s_30min": (
        "Reptile, Omniglot 5-way 1-shot",
        "97.68 ± 0.04% transductive (Nichol et al. 2018)",
    ),
    "anil_5w1s_8min": ("ANIL, Omniglot 5-way 1-shot", "- (the paper reports 20-way only)"),
    "metasgd_5w1s_8min": ("Meta-SGD, Omniglot 5-way 1-shot", "99.53 ± 0.26% (Li et al. 2017)"),
    "fomaml_5w1s_187it": (
        "FOMAML, Omniglot 5-way 1-shot, iMAML's 187 iterations",
        "98.3 ± 0.5% (Finn et al. 2017)",
    ),
    "imaml_5w1s_15min": (
        "iMAML, Omniglot 5-way 1-shot",
        "99.16 ± 0.35% with GD inner loop (Rajeswaran et al. 2019)",
    ),
    "mamlpp_5w1s_15min": ("MAML++, Omniglot 5-way 1-shot", "99.47% (Antoniou et al. 2019)"),
    "maml_5w1s_15min": ("MAML, Omniglot 5-way 1-shot", "98.7 ± 0.4% (Finn et al. 2017)"),
    "matchingnet_5w1s_15min": (
        "Matching Networks, Omniglot 5-way 1-shot",
        "98.1% (Vinyals et al. 2016)",
    ),
    "matchingnet_5w5s_8min": (
        "Matching Networks, Omniglot 5-way 5-shot",
        "98.9% (Vinyals et al. 2016)",
    ),
    "relationnet_5w1s_8min": (
        "Relation Networks, Omniglot 5-way 1-shot",
        "99.6 ± 0.2% (Sung et al. 2018)",
    ),
    "relationnet_5w5s_8min": (
        "Relation Networks, Omniglot 5-way 5-shot",
        "99.8 ± 0.1% (Sung et al. 2018)",
    ),
    "metaoptnet_ridge_5w1s_8min": (
        "MetaOptNet-RR (R2D2 head), Omniglot 5-way 1-shot",
        "98.6% R2D2 (Bertinetto et al. 2019, as commonly quoted, not checked)",
    ),
    "metaoptnet_ridge_5w5s_8min": (
        "MetaOptNet-RR (R2D2 head), Omniglot 5-way 5-shot",
        "99.7% R2D2 (Bertinetto et al. 2019, as commonly quoted, not checked)",
    ),
    "metaoptnet_svm_5w1s_8min": (
        "MetaOptNet-SVM, Omniglot 5-way 1-shot",
        "- (Lee et al. 2019 report no Omniglot row)",
    ),
    "metaoptnet_svm_5w5s_8min": (
        "MetaOptNet-SVM, Omniglot 5-way 5-shot",
        "- (Lee et al. 2019 report no Omniglot row)",
    ),
    "baselinepp_5w1s_8min": (
        "Baseline++, Omniglot 5-way 1-shot",
        "- (no published Omniglot 5-way number found)",
    ),
    "baselinepp_5w5s_8min": (
        "Baseline++, Omniglot 5-way 5-shot",
        "- (no published Omniglot 5-way number found)",
    ),
    "maml_sinusoid": (
        "MAML sinusoid, K=10 trained, K=5 tested",
        "0.67 / 0.38 / 0.35 (1 / 5 / 10 steps)",
    ),
    "mann_5w1s_8min": (
        "MANN, Omniglot 5-way 1-shot",
        "- (Santoro et al. 2016 report instance accuracies in an online protocol)",
    ),
    "lstm_5w1s_8min": (
        "LSTM learner, Omniglot 5-way 1-shot",
        "- (Santoro et al. 2016 report instance accuracies in an online protocol)",
    ),
    "snail_5w1s_8min": ("SNAIL, Omniglot 5-way 1-shot", "99.07 ± 0.16% (Mishra et al. 2018)"),
    "icl_transformer_5w1s_8min": (
        "In-context transformer, Omniglot 5-way 1-shot",
        "- (Kirsch et al. 2022 report other settings)",
    ),
    "rl2_harlow": (
        "RL², Harlow task, accuracy on choice 1 / 2 / 6 of held-out object pairs",
        "- (Wang et al. 2018 show a curve: chance on choice 1, near perfect from choice 2)",
    ),
    # issue 21's learners at 15 CPU minutes each (trainer.max_cpu_minutes=15, one thread)
    "maml_5w1s_15cpu": ("MAML, Omniglot 5-way 1-shot", "98.7 ± 0.4% (Finn et al. 2017)"),
    "protonet_5w1s_15cpu": ("ProtoNet, Omniglot 5-way 1-shot", "98.8% (Snell et al. 2017)"),
    "tnet_5w1s_15cpu": (
        "T-Net, Omniglot 5-way 1-shot",
        "99.4 ± 0.3% (Lee & Choi 2018, as recalled: the paper was not reachable here)",
    ),
    "mtnet_5w1s_15cpu": (
        "MT-Net, Omniglot 5-way 1-shot",
        "99.5 ± 0.3% (Lee & Choi 2018; 99.5 checked against a listing of the paper's claims)",
    ),
    "metacurvature_5w1s_15cpu": (
        "Meta-Curvature, Omniglot 5-way 1-shot",
        "- (Park & Oliva 2019's Omniglot figure was not reachable here)",
    ),
    "cavia_5w1s_15cpu": ("CAVIA, Omniglot 5-way 1-shot", "- (Zintgraf et al. 2019: no Omniglot)"),
    "warpgrad_5w1s_15cpu": (
        "WarpGrad, Omniglot 5-way 1-shot",
        "- (Flennerhag et al. 2020 report 20-way alphabet tasks with 100 steps)",
    ),
    "siamese_5w1s_15cpu": (
        "Siamese networks, Omniglot 5-way 1-shot",
        "96.7% (Koch et al.'s net as run by Vinyals et al. 2016, as recalled)",
    ),
    "gnn_5w1s_15cpu": (
        "GNN, Omniglot 5-way 1-shot",
        "99.2% (Garcia & Bruna 2018, as recalled)",
    ),
    "metanet_5w1s_15cpu": ("Meta Networks, Omniglot 5-way 1-shot", "98.95% (Munkhdalai & Yu 2017)"),
    "maml_5w1s_448tasks": ("MAML, Omniglot 5-way 1-shot, Meta Networks' 444 tasks", "-"),
    "maml_5w1s_2016tasks": ("MAML, Omniglot 5-way 1-shot, WarpGrad's 2020 tasks", "-"),
    "siamese_20w1s_15cpu": (
        "Siamese networks, Omniglot 20-way 1-shot",
        "88.0% (Koch et al.'s net as run by Vinyals et al. 2016, as recalled)",
    ),
    "siamese_20w1s_alphabet_15cpu": (
        "Siamese networks, Omniglot 20-way 1-shot within one alphabet",
        "92.0% (Koch et al. 2015: 8.0% error; people 95.5%, Lake et al. 2015, as recalled)",
    ),
    "gnn_20w1s_15cpu": (
        "GNN, Omniglot 20-way 1-shot",
        "97.4% (Garcia & Bruna 2018, as recalled)",
    ),
}


def cell(value: dict, percent: bool) -> str:
    if percent:
        return f"{100 * value['mean']:.2f} ± {100 * value['ci95']:.2f}%"
    return f"{value['mean']:.3f} ± {value['ci95']:.3f}"


def row(name: str, run_dir: Path) -> str:
    results = json.loads((run_dir / "results.json").read_text())
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    command = "metalearn train " + " ".join(o for o in overrides if not o.startswith("hydra."))
    train, hardware = results["train"], results["hardware"]
    if results["metric"] == "mse":
        cells = {(e["shots"], e["inner_steps"]): e["mse"] for e in results["test"]["breakdown"]}
        ours = " / ".join(cell(cells[(5, s)], False) for s in (1, 5, 10))
    elif results["metric"] == "reward":  # Harlow: accuracy by choice within an episode
        by_choice = results["test"]["breakdown"]
        ours = " / ".join(cell(by_choice[i]["accuracy"], True) for i in (0, 1, -1))
    else:
        ours = cell(results["test"]["accuracy"], True)
    calibration = results["test"].get("calibration")
    pooled = calibration["pooled"] if calibration else None
    scores = f"{pooled['ece']:.4f} / {pooled['nll']:.4f} / {pooled['brier']:.4f}" if pooled else "-"
    what, published = PUBLISHED[name]
    minutes = f"{train['wall_seconds'] / 60:.1f} min"
    if train.get("stopped_by") == "max_cpu_minutes":  # a CPU-time budget: both clocks
        minutes = f"{train['cpu_seconds'] / 60:.1f} CPU min ({minutes} wall)"
    where = f"{hardware['threads']} CPU threads ({hardware['cpu']}), torch {hardware['torch']}"
    return (
        f"| {what} | `{command}` | {where} | {minutes}, {train['iterations']} it "
        f"| {ours} | {scores} | {published} |"
    )


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/readme")
    print(
        "| benchmark | command | hardware | training | ours (95% CI) "
        "| calibration: ECE / NLL / Brier, pooled | published |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in PUBLISHED:
        if (root / name / "results.json").is_file():
            print(row(name, root / name))


if __name__ == "__main__":
    main()
