#!/usr/bin/env bash
# The paper's Table 2 (offline RL with and without world-model data) at this machine's
# scale, on one Procgen game: a PPO expert on levels 0-199 (easy), expert data with
# sampled actions, a DWS world model fine-tuned on it, as many imagined transitions as
# real ones, then BC, CQL, CQL + WM, IQL, IQL + WM for each seed, and the table.
#
#   scripts/offline_table.sh [OUT]          # default runs/table2-coinrun
#
# Every step resumes or is skipped when its output is complete, so the script can be
# killed and run again. Sizes come from the environment (defaults in brackets):
#   GAME [coinrun]  SEEDS ["0 1 2"]  EXPERT_STEPS [100000]  DATA_STEPS [20000]
#   WM_STEPS [1500]  OFFLINE_STEPS [3000]  EVAL_EPISODES [32]  DWS [target/release/dws]
set -euo pipefail

GAME=${GAME:-coinrun}
OUT=${1:-runs/table2-$GAME}
SEEDS=${SEEDS:-"0 1 2"}
EXPERT_STEPS=${EXPERT_STEPS:-100000}
DATA_STEPS=${DATA_STEPS:-20000}
WM_STEPS=${WM_STEPS:-1500}
OFFLINE_STEPS=${OFFLINE_STEPS:-3000}
EVAL_EPISODES=${EVAL_EPISODES:-32}
DWS=${DWS:-target/release/dws}
ENV=procgen:$GAME
OPTS=num_levels=200,start_level=0,distribution_mode=easy

mkdir -p "$OUT"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }

if [ ! -f "$OUT/expert/summary.json" ]; then
  log "expert: dws ppo, $EXPERT_STEPS steps"
  "$DWS" ppo --env "$ENV" --env-opts "$OPTS" --steps "$EXPERT_STEPS" --out "$OUT/expert" --resume
fi

if [ ! -f "$OUT/data/expert/.complete" ]; then
  log "expert data: $DATA_STEPS transitions, sampled actions"
  rm -rf "$OUT/data/expert"
  "$DWS" collect --env "$ENV" --env-opts "$OPTS" --policy "ppo:$OUT/expert" \
    --steps "$DATA_STEPS" --workers 2 --out "$OUT/data/expert"
  touch "$OUT/data/expert/.complete"
fi
"$DWS" dataset info "$OUT/data/expert" | tee "$OUT/expert-data.txt"

log "world model: pretrain + DWS finetune, $WM_STEPS steps each (debug preset)"
"$DWS" pretrain --data "$OUT/data/expert" --steps "$WM_STEPS" --out "$OUT/wm-base" --resume
"$DWS" finetune --base "$OUT/wm-base" --data "$OUT/data/expert" --steps "$WM_STEPS" \
  --out "$OUT/wm" --resume

log "imagination: $DATA_STEPS transitions"
"$DWS" imagine --ckpt "$OUT/wm" --starts "$OUT/data/expert" --transitions "$DATA_STEPS" \
  --out "$OUT/data/imagined"

for seed in $SEEDS; do
  for spec in bc: cql: cql:wm iql: iql:wm; do
    algo=${spec%%:*}
    wm=${spec#*:}
    name=$algo${wm:+-wm}-s$seed
    data=$OUT/data/expert${wm:+,$OUT/data/imagined}
    if [ -f "$OUT/$name/summary.json" ]; then continue; fi
    log "offline: $name"
    "$DWS" offline --algo "$algo" --data "$data" --steps "$OFFLINE_STEPS" --seed "$seed" \
      --eval-every "$OFFLINE_STEPS" --eval-episodes "$EVAL_EPISODES" --out "$OUT/$name" --resume
  done
done

# The table covers every finished run in OUT, seeds of earlier invocations included.
runs=()
for d in "$OUT"/{bc,cql,cql-wm,iql,iql-wm}-s*; do
  if [ -f "$d/summary.json" ]; then runs+=("$d"); fi
done
"$DWS" compare "${runs[@]}" --out "$OUT/table2.md"
log "done: $OUT/table2.md"
