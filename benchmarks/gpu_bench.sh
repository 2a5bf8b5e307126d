#!/usr/bin/env bash
# Prepared GPU benchmark for issue 5: DiT-XL/2 at 256 px, bf16, CFG; batch 64 (plus 8 and 256).
# Times dense DiT (eager, compiled), masked DyDiT and sliced DyDiT (eager, compiled) side by side,
# and writes bench.json, bench.md and env.json under $OUT. Meant to finish in under 5 minutes on
# one H100 (phases past --budget seconds are skipped; see benchmarks/gpu_bench.py).
#
#   OUT=/some/dir bash benchmarks/gpu_bench.sh            # the GPU run
#   OUT=/tmp/dry  bash benchmarks/gpu_bench.sh --dry      # tiny CPU check of the same code paths
#
# Uses .venv/bin/python when present, else python3 (the GPU image's PyTorch); the package is
# imported from src/ so nothing needs to be installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-runs/gpu_bench}"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true; fi
"$PY" benchmarks/gpu_bench.py --out "$OUT" "$@" 2> >(tee "$OUT/log.txt" >&2)
