#!/usr/bin/env bash
# The sinusoid table of the gradient-based family: each algorithm trained and tested with
# K = 5, 10 and 20 support points (the Meta-SGD paper's protocol), test MSE after 0, 1, 5 and
# 10 steps over 1000 fixed test tasks. Two runs at a time, one CPU thread each (the 1-40-40-1
# network does not gain from a second thread).
# Usage: [KS="5 10 20"] scripts/sinusoid_runs.sh [algo ...]
#        (default: maml fomaml reptile anil metasgd imaml, each for K = 5, 10 and 20)
# Each run writes outputs/sinusoid/<algo>_k<K>/results.json; scripts/sinusoid_table.py reads them.
set -euo pipefail
cd "$(dirname "$0")/.."
metalearn=${METALEARN:-.venv/bin/metalearn}
algos=("${@:-maml fomaml reptile anil metasgd imaml}")
read -r -a algos <<< "${algos[*]}"

run() {
  local algo=$1 k=$2 start
  start=$(date +%s)
  rm -rf "outputs/sinusoid/${algo}_k${k}"  # a fresh run, not one mixed with an older attempt
  $metalearn train algo="$algo" data=sinusoid data.shots="$k" data.query="$k" \
    "eval.shots=[$k]" "eval.steps=[0,1,5,10]" hardware.threads=1 logger=none \
    trainer.progress=false hydra.run.dir="outputs/sinusoid/${algo}_k${k}" \
    > "outputs/sinusoid/${algo}_k${k}.log" 2>&1 \
    && echo "=== ${algo} K=${k} done in $(( $(date +%s) - start )) s" \
    || echo "=== ${algo} K=${k} FAILED: see outputs/sinusoid/${algo}_k${k}.log"
}

mkdir -p outputs/sinusoid
jobs_running=0
for algo in "${algos[@]}"; do
  for k in ${KS:-5 10 20}; do
    run "$algo" "$k" &
    jobs_running=$((jobs_running + 1))
    if (( jobs_running >= 2 )); then
      wait -n
      jobs_running=$((jobs_running - 1))
    fi
  done
done
wait
