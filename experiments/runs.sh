# Sourced by the experiment scripts: `train NAME ARGS...` runs `python -m effx.train` in
# "$runs/NAME" (log in "$runs/NAME.log") unless that run already has results.json.
train() {
  local name=$1; shift
  [ -f "$runs/$name/results.json" ] || python -m effx.train --workdir="$runs/$name" "$@" \
      > "$runs/$name.log" 2>&1
}
