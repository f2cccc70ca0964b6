#!/usr/bin/env bash
# Model-free PPO against MBRL with uniform and with prioritized imagination starts, at
# the same real-step budget, on one Procgen game (easy): random-policy data, the debug
# video model pretrained on it as the base, then for each seed `dws ppo`, `dws mbrl
# --starts uniform` and `dws mbrl --starts prioritized`; every final agent scored over
# real episodes (`dws score`) and the table grouped over seeds (`dws compare`).
#
#   scripts/mbrl_table.sh [OUT]             # default runs/mbrl-$GAME
#
# Every step resumes or is skipped when its output is complete, so the script can be
# killed and run again. LANES=2 runs two jobs at a time, one thread each (on 2 cores
# that finished sooner than one job at a time on both). Sizes come from the environment
# (defaults in brackets):
#   GAME [coinrun]  SEEDS ["0 1"]  STEPS [98304]  DATA_STEPS [20000]  BASE_STEPS [1500]
#   SCORE_EPISODES [320]  PRESET [small]  LANES [1]  DWS [target/release/dws]
# A smoke test in a few minutes:
#   PRESET=debug STEPS=2048 DATA_STEPS=2000 BASE_STEPS=20 SCORE_EPISODES=16 \
#     scripts/mbrl_table.sh /tmp/mbrl-smoke
set -euo pipefail

GAME=${GAME:-coinrun}
OUT=${1:-runs/mbrl-$GAME}
SEEDS=${SEEDS:-"0 1"}
STEPS=${STEPS:-98304}
DATA_STEPS=${DATA_STEPS:-20000}
BASE_STEPS=${BASE_STEPS:-1500}
SCORE_EPISODES=${SCORE_EPISODES:-320}
PRESET=${PRESET:-small}
LANES=${LANES:-1}
DWS=${DWS:-target/release/dws}
ENV=procgen:$GAME
OPTS=distribution_mode=easy

mkdir -p "$OUT"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }

if [ ! -f "$OUT/data/.complete" ]; then
  log "data: $DATA_STEPS random-policy steps"
  rm -rf "$OUT/data"
  "$DWS" collect --env "$ENV" --env-opts "$OPTS" --policy random --steps "$DATA_STEPS" \
    --seed 0 --workers 2 --out "$OUT/data"
  touch "$OUT/data/.complete"
fi
log "base video model: debug preset, $BASE_STEPS steps"
"$DWS" pretrain --data "$OUT/data" --preset debug --steps "$BASE_STEPS" --out "$OUT/base" --resume

# One job: NAME and the command's own arguments; skipped once finished.
job() {
  local name=$1
  shift
  if [ -f "$OUT/$name/summary.json" ]; then return; fi
  log "$name"
  "$DWS" "$@" --env "$ENV" --env-opts "$OPTS" --preset "$PRESET" --steps "$STEPS" \
    --out "$OUT/$name" --resume \
    >"$OUT/$name.log" 2>&1
  log "$name done"
}
jobs_of_seed() {
  local seed=$1
  echo "ppo-s$seed ppo --seed $seed"
  echo "uniform-s$seed mbrl --base $OUT/base --starts uniform --seed $seed"
  echo "prioritized-s$seed mbrl --base $OUT/base --starts prioritized --seed $seed"
}
ALL=$(for seed in $SEEDS; do jobs_of_seed "$seed"; done)

if [ "$LANES" -le 1 ]; then
  while read -r line; do
    # shellcheck disable=SC2086
    job $line
  done <<<"$ALL"
else
  # Lane k takes every LANES-th job, one thread each.
  for ((k = 0; k < LANES; k++)); do
    (
      export RAYON_NUM_THREADS=1
      i=0
      while read -r line; do
        # shellcheck disable=SC2086
        if [ $((i % LANES)) -eq "$k" ]; then job $line; fi
        i=$((i + 1))
      done <<<"$ALL"
    ) &
  done
  wait
fi

RUNS=()
for seed in $SEEDS; do
  for kind in ppo uniform prioritized; do
    RUNS+=("$OUT/$kind-s$seed")
  done
done
TODO=()
for run in "${RUNS[@]}"; do
  [ -f "$run/score.json" ] || TODO+=("$run")
done
if [ ${#TODO[@]} -gt 0 ]; then
  log "score: ${TODO[*]}"
  "$DWS" score "${TODO[@]}" --episodes "$SCORE_EPISODES"
fi
"$DWS" compare "${RUNS[@]}" --out "$OUT/agents.md"
log "table: $OUT/agents.md, curves: $OUT/agents.png"
