#!/usr/bin/env bash
# The autoregressive (iVideoGPT-style) backbone with DWS on the pushing task, at this
# machine's scale: a VQ tokenizer on CoinRun + pushing frames (scored on held-out frames
# of both), an action-free token transformer pretrained on both, fine-tuned on the
# pushing task with DWS (action modules, motion-weighted token loss) and without actions,
# both scored on held-out pushing episodes (1 context frame, 15 predicted).
#
#   scripts/ar_push.sh [OUT]          # default runs/ar-push
#
# Every step resumes or is skipped when its output is complete, so the script can be
# killed and run again. Sizes come from the environment (defaults in brackets):
#   PRESET [small]  TOK_STEPS [preset]  PRETRAIN_STEPS [preset]  FINETUNE_STEPS [preset]
#   CLIPS [32]  COINRUN [collect 64 random-policy episodes]  DWS [target/release/dws]
#   DEVICE [cpu]: where the token transformer trains (cuda:0 with a `--features cuda`
#   build); the tokenizer trains on the CPU either way, and `dws eval` runs there.
set -euo pipefail

OUT=${1:-runs/ar-push}
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
COINRUN=${COINRUN:-$OUT/data/coinrun}
if [ "$COINRUN" = "$OUT/data/coinrun" ]; then
  collect "$COINRUN" 64 0 procgen:coinrun num_levels=200,max_episode_steps=200
fi
collect "$OUT/data/coinrun-heldout" 16 5000 procgen:coinrun \
  num_levels=100,start_level=5000,max_episode_steps=200

log "tokenizer ($PRESET)"
# shellcheck disable=SC2046
"$DWS" tokenizer train --data "$COINRUN,$OUT/data/push" --preset "$PRESET" \
  $(steps "${TOK_STEPS:-}") --out "$OUT/tok" --resume
"$DWS" tokenizer eval --ckpt "$OUT/tok" --data "$OUT/data/coinrun-heldout,$OUT/data/push-heldout"

log "AR base: action-free, CoinRun + pushing"
# shellcheck disable=SC2046
"$DWS" pretrain --backbone ar --tokenizer "$OUT/tok" --preset "$PRESET" \
  --data "$COINRUN,$OUT/data/push" $(steps "${PRETRAIN_STEPS:-}") --out "$OUT/base" --device "$DEVICE" --resume

for mode in on off; do
  name=$([ $mode = on ] && echo dws || echo no-actions)
  log "fine-tune on the pushing task: $name"
  # shellcheck disable=SC2046
  "$DWS" finetune --base "$OUT/base" --data "$OUT/data/push" --preset "$PRESET" \
    --action-module $mode $(steps "${FINETUNE_STEPS:-}") --out "$OUT/$name" --device "$DEVICE" \
    --resume
  if [ ! -f "$OUT/eval-$name/metrics.json" ]; then
    "$DWS" eval --ckpt "$OUT/$name" --data "$OUT/data/push-heldout" --context 1 --horizon 15 \
      --clips "$CLIPS" --out "$OUT/eval-$name" --name "AR $name"
  fi
done
"$DWS" compare "$OUT/eval-dws" "$OUT/eval-no-actions" --out "$OUT/compare.md"
log "done: $OUT/compare.md, $OUT/tok/eval.json"
