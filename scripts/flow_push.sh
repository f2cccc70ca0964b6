#!/usr/bin/env bash
# The flow-matching backbone with DWS on the pushing task (README, "Status"): an
# action-free base pretrained on CoinRun + Ninja + pushing episodes, fine-tuned on the
# pushing task with DWS and, from the same base, without actions; both scored on the same
# held-out clips (1 context frame, 15 predicted; two draws of clips), compared with paired
# per-clip differences, and rolled out from one start with another episode's actions.
#
#   scripts/flow_push.sh [OUT]          # default runs/flow-push
#
# Every step resumes or is skipped when its output is complete, so the script can be
# killed and run again. The two fine-tunes run side by side, one thread each. Sizes come
# from the environment (defaults in brackets):
#   PRESET [small]  PRETRAIN_STEPS [preset]  FINETUNE_STEPS [preset]  CLIPS [32]
#   DWS [target/release/dws]  DEVICE [cpu]
set -euo pipefail

OUT=${1:-runs/flow-push}
PRESET=${PRESET:-small}
CLIPS=${CLIPS:-32}
DWS=${DWS:-target/release/dws}
DEVICE=${DEVICE:-cpu}
# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"
mkdir -p "$OUT/data"
log "data"
collect "$OUT/data/push" 256 0 push "" scripted
collect "$OUT/data/push-heldout" 16 1000000 push "" scripted
for game in coinrun ninja; do
  collect "$OUT/data/procgen-$game" 64 0 "procgen:$game" num_levels=200,max_episode_steps=200
done

log "base: action-free, CoinRun + Ninja + pushing ($PRESET)"
# shellcheck disable=SC2046
"$DWS" pretrain --data "$OUT/data/procgen-coinrun,$OUT/data/procgen-ninja,$OUT/data/push" \
  --preset "$PRESET" $(steps "${PRETRAIN_STEPS:-}") --out "$OUT/base" --device "$DEVICE" --resume

log "fine-tunes on the pushing task: DWS and no actions, side by side"
for mode in on off; do
  name=$([ $mode = on ] && echo dws || echo no-actions)
  # shellcheck disable=SC2046
  RAYON_NUM_THREADS=1 "$DWS" finetune --base "$OUT/base" --data "$OUT/data/push" \
    --preset "$PRESET" --action-module $mode $(steps "${FINETUNE_STEPS:-}") --out "$OUT/$name" \
    --device "$DEVICE" --resume > "$OUT/finetune-$name.log" 2>&1 &
done
wait

for seed in 0 1; do
  for name in dws no-actions; do
    if [ ! -f "$OUT/eval$seed-$name/metrics.json" ]; then
      log "eval $name, clips drawn with seed $seed"
      # FVD on the first draw only (the I3D network is the slow part on a CPU).
      # shellcheck disable=SC2046
      "$DWS" eval --ckpt "$OUT/$name" --data "$OUT/data/push-heldout" --context 1 --horizon 15 \
        --clips "$CLIPS" --seed $seed $([ $seed = 0 ] || echo --no-fvd) \
        --out "$OUT/eval$seed-$name" --name "$name" --device "$DEVICE"
    fi
  done
  "$DWS" compare "$OUT/eval$seed-dws" "$OUT/eval$seed-no-actions" --out "$OUT/compare$seed.md"
done

log "one start, other actions"
"$DWS" predict --ckpt "$OUT/dws" --data "$OUT/data/push-heldout" --episode 4 \
  --out "$OUT/own-actions.gif" --device "$DEVICE"
"$DWS" predict --ckpt "$OUT/dws" --data "$OUT/data/push-heldout" --episode 4 \
  --actions-from 11 --out "$OUT/other-actions.gif" --device "$DEVICE"
log "done: $OUT/compare0.md, $OUT/compare1.md, $OUT/own-actions.png, $OUT/other-actions.png"
