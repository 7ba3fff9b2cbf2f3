#!/usr/bin/env bash
# The GPU path in one go, on a CUDA machine (under 8 minutes on one H100-class GPU):
#   1. the CUDA-marked tests (tests/test_cuda.py): inner loop and meta-gradient on CUDA equal
#      the CPU's in float64, deterministic reruns, bf16 autocast, channels-last, torch.compile,
#      hardware.task_chunk;
#   2. `metalearn bench device=cuda`: MAML and FOMAML (against learn2learn when `make reference`
#      installed it), ProtoNet and evaluation, meta-batch 32;
#   3. MAML on Omniglot 5-way 1-shot with hardware=cuda for GPU_CHECK_MINUTES (5) minutes, and
#      its test accuracy.
# It installs nothing beyond `make install` (run only when .venv is missing). Results go to
# $OUT (the device tool's output folder) or outputs/gpu_check. Real Omniglot is read from
# $METALEARN_DATA, else ../shared/data or shared/data.
#
# GPU_CHECK_DEVICE=cpu runs the same steps on the CPU at tiny sizes: a check of the script where
# no GPU is lent (tests/test_gpu_check.py). GPU_CHECK_K=EXPR runs only the tests pytest -k selects.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE="${GPU_CHECK_DEVICE:-cuda}"
MINUTES="${GPU_CHECK_MINUTES:-5}"
OUT="${OUT:-outputs/gpu_check}"
mkdir -p "$OUT"
if [ -z "${METALEARN_DATA:-}" ]; then
    for root in ../shared/data shared/data; do
        [ -f "$root/omniglot/images_background.zip" ] && METALEARN_DATA="$(cd "$root" && pwd)"
    done
fi
export METALEARN_DATA="${METALEARN_DATA:-}" WANDB_MODE=offline
[ -x .venv/bin/python ] || make install
PY=.venv/bin/python

SELECT=()
[ -n "${GPU_CHECK_K:-}" ] && SELECT=(-k "$GPU_CHECK_K")

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

step "device"
$PY - "$DEVICE" <<'EOF'
import sys, torch
device = sys.argv[1]
print("torch", torch.__version__, "CUDA", torch.version.cuda)
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("no CUDA device is visible: run this on a GPU machine (or GPU_CHECK_DEVICE=cpu)")
    print(torch.cuda.get_device_name(0))
EOF

if [ "$DEVICE" = cuda ]; then
    step "CUDA-marked tests"
    $PY -m pytest -m cuda tests/test_cuda.py -p no:cacheprovider "${SELECT[@]}" \
        2>&1 | tee "$OUT/tests.txt"
    BENCH=(meta_batch=32 min_seconds=3 "groups=[family,protonet,eval]" "task_chunks=[4,8]")
else
    step "CUDA-marked tests, on the CPU"
    METALEARN_CUDA_TESTS_ON=cpu $PY -m pytest -m cuda tests/test_cuda.py -p no:cacheprovider \
        "${SELECT[@]}" 2>&1 | tee "$OUT/tests.txt"
    # (the family and protonet groups' CPU runs are test_bench's)
    BENCH=(meta_batch=4 min_seconds=0 "groups=[eval]" "task_chunks=[2]")
fi

step "bench"
$PY -m metalearn.cli bench device="$DEVICE" "algos=[maml,fomaml]" "shapes=[omniglot]" "steps=[1]" \
    "${BENCH[@]}" out="$OUT/bench" \
    2>&1 | grep -v -i "gym" | tee "$OUT/bench.txt"

step "MAML, Omniglot 5-way 1-shot, $MINUTES minutes on $DEVICE"
EXTRA=()
[ "$DEVICE" = cpu ] && EXTRA=(trainer.eval_every=5 eval.val_episodes=10 eval.episodes=20)
$PY -m metalearn.cli train experiment=maml_omniglot_5w1s hardware="$DEVICE" \
    trainer.max_minutes="$MINUTES" logger=none trainer.progress=false "${EXTRA[@]}" \
    hydra.run.dir="$OUT/maml_omniglot_5w1s" 2>&1 | tail -n 8 | tee "$OUT/train.txt"
$PY - "$OUT/maml_omniglot_5w1s/results.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
t, acc = r["train"], r["test"]["accuracy"]
print(f"MAML Omniglot 5w1s on {r['hardware'].get('gpu') or r['hardware']['cpu']}: "
      f"{t['iterations']} iterations in {t['wall_seconds'] / 60:.1f} min, test accuracy "
      f"{100 * acc['mean']:.2f} ± {100 * acc['ci95']:.2f}% ({r['test']['episodes']} episodes)")
EOF
step "done: $OUT"
