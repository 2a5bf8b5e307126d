#!/usr/bin/env bash
# One entry point for the README's two Quickstart commands:
#   ./run.sh demo [ARGS...]   set up .venv (idempotent), then run `dydit demo ARGS...`
#   ./run.sh test [ARGS...]   set up .venv (idempotent), then run the whole test suite (all but `gpu`)
#   ./run.sh setup            only set up
# Set-up: creates .venv with Python 3.11 if missing, installs torch==2.13.0 (the CPU wheel) and
# this package (its core dependencies run the demo) with the extras of the tests and of latent
# models, and, when running as root on Debian, the Fashion-MNIST package.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

TORCH_VERSION="${DYDIT_TORCH_VERSION:-2.13.0}"
EXTRAS="test,latent,flux"  # pyproject.toml: `test` for ./run.sh test, `latent` (diffusers) for VAE tests, `flux` for FluxPipeline tests
VENV=.venv
PY="$VENV/bin/python"

log() { printf '[run.sh] %s\n' "$*" >&2; }

pick_python() {
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$cand"; return 0
    fi
  done
  log "Python >= 3.11 is required (none found on PATH)"; exit 1
}

setup_debian_data() {
  [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian package dataset-fashion-mnist"
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
      || log "could not install dataset-fashion-mnist; tests that need it will say so"
  else
    log "Fashion-MNIST not found; install it with: sudo apt-get install dataset-fashion-mnist"
  fi
}

setup_venv() {
  if [ ! -x "$PY" ]; then
    log "creating $VENV"
    "$(pick_python)" -m venv "$VENV"
  fi
  if ! "$PY" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION'))" 2>/dev/null; then
    if [ -n "${DYDIT_SKIP_TORCH:-}" ]; then
      log "DYDIT_SKIP_TORCH set: keeping the installed torch"
    else
      log "installing torch==$TORCH_VERSION"
      "$PY" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
    fi
  fi
  # Reinstall the package only when its metadata changed (idempotent and fast on reruns).
  local stamp="$VENV/.dydit-installed" want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1) $EXTRAS"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing dydit[$EXTRAS] (editable)"
    "$PY" -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]"
    echo "$want" > "$stamp"
  fi
}

cmd="${1:-}"; shift || true
case "$cmd" in
  setup) setup_debian_data; setup_venv ;;
  demo)  setup_debian_data; setup_venv; exec "$VENV/bin/dydit" demo "$@" ;;
  test)  setup_debian_data; setup_venv; exec "$PY" -m pytest -m "not gpu" -q "$@" ;;
  *) echo "usage: ./run.sh {demo|test|setup} [ARGS...]" >&2; exit 2 ;;
esac
