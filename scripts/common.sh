# Helpers sourced by the experiment scripts (ar_push.sh, flow_push.sh). They read $OUT
# (the run directory) and $DWS (the dws binary).

# `--steps N` when N is set, nothing otherwise (the preset's count).
steps() { if [ -n "${1:-}" ]; then echo "--steps $1"; fi; }

# A timestamped line, also appended to $OUT/log.txt.
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }

# Collects a dataset once: skipped when DIR holds a finished collection.
collect() { # DIR EPISODES SEED ENV [OPTS] [POLICY]
  if [ ! -f "$1/.complete" ]; then
    rm -rf "$1"
    "$DWS" collect --env "$4" --env-opts "${5:-}" --policy "${6:-random}" --episodes "$2" \
      --seed "$3" --workers 2 --out "$1"
    touch "$1/.complete"
  fi
}
