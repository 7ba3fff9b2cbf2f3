#!/usr/bin/env bash
# The README's bandit table (Duan et al. 2016, Table 1): RL² on k = 5 and 10 arms with n = 10
# and 100 pulls per trial, each run scoring its agent and the baselines on 1000 fixed test
# trials. Two runs at a time, one CPU thread each.
# Usage: [MINUTES=12] scripts/bandit_runs.sh
# Each run writes outputs/readme_rl/rl2_bandit_k<K>_n<N>/results.json; scripts/bandit_table.py
# reads them.
set -euo pipefail
cd "$(dirname "$0")/.."
metalearn=${METALEARN:-.venv/bin/metalearn}
out=outputs/readme_rl
mkdir -p "$out"

run() {
  local name=$1 start
  start=$(date +%s)
  rm -rf "${out:?}/$name"  # a fresh run, not one mixed with an older attempt
  $metalearn train experiment="$name" trainer.max_minutes="${MINUTES:-12}" hardware.threads=1 \
    logger=none trainer.progress=false hydra.run.dir="$out/$name" > "$out/$name.log" 2>&1 \
    && echo "=== $name done in $(( $(date +%s) - start )) s" \
    || echo "=== $name FAILED: see $out/$name.log"
}

run rl2_bandit_k5_n100 & run rl2_bandit_k10_n100 & wait
run rl2_bandit_k5_n10 & run rl2_bandit_k10_n10 & wait
