#!/usr/bin/env bash
# Idempotent setup: Debian packages, a Python venv with segproxy (+dev tools), the compiled
# request path (scripts/build_native.py: skipped when up to date), npm packages.
# Usage: scripts/setup.sh [--runtime-only]
set -euo pipefail
cd "$(dirname "$0")/.."
runtime_only=0
[ "${1:-}" = "--runtime-only" ] && runtime_only=1

need_apt=()
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc)  # mypyc's C: the compiled request path
if [ "$runtime_only" = 0 ]; then
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
  command -v nginx >/dev/null 2>&1 || need_apt+=(nginx-light)
  command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
  command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
  command -v node >/dev/null 2>&1 || need_apt+=(nodejs npm)
  # tests/package verifies deploy/systemd/segproxy.service with it
  command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: missing ${need_apt[*]} (run as root to install them)" >&2
  fi
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3.13 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      PY=$c; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup: Python 3.11+ is required" >&2; exit 1; }
# Python's C headers, for the compiled request path (Debian's own Python keeps them apart).
if ! "$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$(command -v "$PY")" = /usr/bin/"$PY" ]; then
  echo "setup: installing Debian's python3-dev (C headers)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-dev >/dev/null
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# One stamp per mode, so that scripts/serve (runtime only) installs once, not on every start,
# and a later full setup still adds the dev tools. The dev install includes the runtime one.
dev_stamp=.venv/.segproxy-installed-dev
runtime_stamp=.venv/.segproxy-installed-runtime
installed() { [ -f "$1" ] && [ ! pyproject.toml -nt "$1" ] && [ ! setup.py -nt "$1" ]; }
if [ "$runtime_only" = 1 ]; then
  if ! installed "$dev_stamp" && ! installed "$runtime_stamp"; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[native]'
    touch "$runtime_stamp"
  fi
elif ! installed "$dev_stamp"; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev,native]'
  touch "$dev_stamp"
fi
# Without a C compiler this warns and segproxy runs as plain Python (same behaviour, slower).
.venv/bin/python scripts/build_native.py

if [ "$runtime_only" = 0 ] && [ -f package.json ]; then
  if [ ! -d node_modules ] || [ package.json -nt node_modules ] || { [ -f package-lock.json ] && [ package-lock.json -nt node_modules ]; }; then
    if [ -f package-lock.json ]; then npm ci --silent --no-audit --no-fund; else npm install --silent --no-audit --no-fund; fi
    touch node_modules
  fi
fi
