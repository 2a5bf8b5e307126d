#!/usr/bin/env bash
# Interleaved A/B of `dydit bench` between a base commit and the working tree, on one machine:
#   benchmarks/bench_ab.sh BASE_COMMIT [ROUNDS] [-- extra dydit bench options]
# Odd rounds run base then tree, even rounds tree then base (no order bias); each writes OUT/{base,tree}-ROUND.{txt,json}
# (OUT: $BENCH_AB_OUT or runs/bench_ab). Uses this checkout's .venv and the shipped DyDiT.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
base="${1:?usage: benchmarks/bench_ab.sh BASE_COMMIT [ROUNDS] [-- bench options]}"; shift
rounds="${1:-3}"; [ $# -gt 0 ] && shift; [ "${1:-}" = "--" ] && shift
out="${BENCH_AB_OUT:-runs/bench_ab}"; mkdir -p "$out"
src_base="$(mktemp -d)"; trap 'rm -rf "$src_base"' EXIT
git archive "$base" src | tar -x -C "$src_base"
ckpt=src/dydit/assets/dydit-ti4-fmnist-0.5.safetensors
opts=(--checkpoint "$ckpt" --batch 16 --repeats 9 --stat min --threads 2 --modes dense,masked,sliced "$@")
for round in $(seq "$rounds"); do
  order="base tree"; [ $((round % 2)) -eq 0 ] && order="tree base"
  for side in $order; do
    src="$PWD/src"; [ "$side" = base ] && src="$src_base/src"
    PYTHONPATH="$src" .venv/bin/python -m dydit bench "${opts[@]}" --json "$out/$side-$round.json" \
      > "$out/$side-$round.txt" 2>&1
    printf '%s %s: %s\n' "$side" "$round" "$(grep '| forward |' "$out/$side-$round.txt" | cut -d'|' -f3,7 | tr '\n' ' ')"
  done
done
