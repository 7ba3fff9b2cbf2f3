#!/usr/bin/env bash
# The runs behind the README's results table, one after another (they share the CPU cores).
# Usage: METALEARN_DATA=../shared/data scripts/readme_runs.sh [name ...]   (default: all)
# Each run writes outputs/readme/<name>/results.json; scripts/results_table.py turns them into
# the README table.
set -euo pipefail
cd "$(dirname "$0")/.."
metalearn=${METALEARN:-.venv/bin/metalearn}

declare -A RUNS=(
  [protonet_5w1s]="experiment=protonet_omniglot_5w1s trainer.max_minutes=15 hardware.channels_last=true hardware.precision=bf16"
  [protonet_5w5s]="experiment=protonet_omniglot_5w5s trainer.max_minutes=15 hardware.channels_last=true hardware.precision=bf16"
  [maml_5w1s_8min]="experiment=maml_omniglot_5w1s trainer.max_minutes=8"
  [fomaml_5w1s_8min]="experiment=fomaml_omniglot_5w1s trainer.max_minutes=8"
  [maml_sinusoid]="experiment=maml_sinusoid"
  [maml_5w1s_45min]="experiment=maml_omniglot_5w1s trainer.max_minutes=45"
  # the gradient-based family at the same 8-minute budget
  [reptile_5w1s_30min]="experiment=reptile_omniglot_5w1s trainer.iterations=5000 trainer.max_minutes=30 trainer.eval_every=1000 eval.val_episodes=200 hardware.threads=1 logger=none"
  [anil_5w1s_8min]="experiment=anil_omniglot_5w1s trainer.max_minutes=8"
  [metasgd_5w1s_8min]="experiment=metasgd_omniglot_5w1s trainer.max_minutes=8"
  [imaml_5w1s_15min]="experiment=imaml_omniglot_5w1s trainer.max_minutes=15 trainer.eval_every=50 eval.val_episodes=200 hardware.threads=1 logger=none"
  # FOMAML for the iterations iMAML reached (187 in the README run)
  [fomaml_5w1s_187it]="experiment=fomaml_omniglot_5w1s trainer.iterations=187 trainer.eval_every=50 eval.val_episodes=200 hardware.threads=1 logger=none"
  # MAML++ and MAML at 15 minutes, one thread each (run side by side in the README)
  [mamlpp_5w1s_15min]="experiment=mamlpp_omniglot_5w1s trainer.max_minutes=15 trainer.eval_every=150 hardware.threads=1 logger=none"
  [maml_5w1s_15min]="experiment=maml_omniglot_5w1s trainer.max_minutes=15 trainer.eval_every=300 hardware.threads=1 logger=none"
  # metric learners at 8 CPU minutes, with the fast layout and bf16 as for ProtoNet
  [matchingnet_5w1s_15min]="experiment=matchingnet_omniglot_5w1s trainer.max_minutes=15 trainer.eval_every=500 hardware.threads=1 hardware.channels_last=true hardware.precision=bf16 logger=none"
  [matchingnet_5w5s_8min]="experiment=matchingnet_omniglot_5w5s trainer.max_minutes=8 hardware.channels_last=true hardware.precision=bf16 algo.scale=1 algo.cosine_relu=false"
  [relationnet_5w1s_8min]="experiment=relationnet_omniglot_5w1s trainer.max_minutes=8 hardware.channels_last=true hardware.precision=bf16"
  [relationnet_5w5s_8min]="experiment=relationnet_omniglot_5w5s trainer.max_minutes=8 hardware.channels_last=true hardware.precision=bf16"
  [metaoptnet_ridge_5w1s_8min]="experiment=metaoptnet_ridge_omniglot_5w1s trainer.max_minutes=8 hardware.channels_last=true hardware.precision=bf16"
  [metaoptnet_ridge_5w5s_8min]="experiment=metaoptnet_ridge_omniglot_5w5s trainer.max_minutes=8 hardware.channels_last=true hardware.precision=bf16"
  [metaoptnet_svm_5w1s_8min]="experiment=metaoptnet_svm_omniglot_5w1s trainer.max_minutes=8 hardware.channels_last=true hardware.precision=bf16"
  [metaoptnet_svm_5w5s_8min]="experiment=metaoptnet_svm_omniglot_5w5s trainer.max_minutes=8 hardware.channels_last=true hardware.precision=bf16"
  [baselinepp_5w1s_8min]="experiment=baselinepp_omniglot_5w1s trainer.max_minutes=8 hardware.channels_last=true hardware.precision=bf16"
  [baselinepp_5w5s_8min]="experiment=baselinepp_omniglot_5w5s trainer.max_minutes=8 hardware.channels_last=true hardware.precision=bf16"
  # black-box sequence learners at 8 CPU minutes, with the fast layout and bf16 as for ProtoNet
  [mann_5w1s_8min]="experiment=mann_omniglot_5w1s trainer.max_minutes=8 hardware.channels_last=true hardware.precision=bf16"
  [lstm_5w1s_8min]="experiment=lstm_omniglot_5w1s trainer.max_minutes=8 hardware.channels_last=true hardware.precision=bf16"
  [snail_5w1s_8min]="experiment=snail_omniglot_5w1s trainer.max_minutes=8 hardware.channels_last=true hardware.precision=bf16"
  [icl_transformer_5w1s_8min]="experiment=icl_transformer_omniglot_5w1s trainer.max_minutes=8 hardware.channels_last=true hardware.precision=bf16"
  # meta-RL: the Harlow task (the bandit rows are scripts/bandit_runs.sh)
  [rl2_harlow]="experiment=rl2_harlow"
)
ORDER=(protonet_5w1s protonet_5w5s maml_5w1s_8min fomaml_5w1s_8min maml_sinusoid maml_5w1s_45min
       reptile_5w1s_30min anil_5w1s_8min metasgd_5w1s_8min imaml_5w1s_15min fomaml_5w1s_187it mamlpp_5w1s_15min
       maml_5w1s_15min matchingnet_5w1s_15min matchingnet_5w5s_8min relationnet_5w1s_8min relationnet_5w5s_8min
       metaoptnet_ridge_5w1s_8min metaoptnet_ridge_5w5s_8min metaoptnet_svm_5w1s_8min
       metaoptnet_svm_5w5s_8min baselinepp_5w1s_8min baselinepp_5w5s_8min
       mann_5w1s_8min lstm_5w1s_8min snail_5w1s_8min icl_transformer_5w1s_8min rl2_harlow)

for name in "${@:-${ORDER[@]}}"; do
  echo "=== $name: metalearn train ${RUNS[$name]}"
  start=$(date +%s)
  $metalearn train ${RUNS[$name]} hydra.run.dir=outputs/readme/$name
  echo "=== $name done in $(( $(date +%s) - start )) s"
done
