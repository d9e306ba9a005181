#!/usr/bin/env bash
# Install what the test suite needs on a fresh Debian machine: system binaries the tests start as real
# processes (redis-server, redis-sentinel, nginx, prometheus/promtool) and the Python package with its dev extra.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# The Sentinel tests start real sentinels (tests/support/redis_server.py); Debian ships the binary apart.
command -v redis-sentinel >/dev/null 2>&1 || need+=(redis-sentinel)
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# docker-compose 1.29 validates docker-compose.yml and ships the compose-spec schema (no Docker engine needed).
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if ((${#need[@]})); then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  export DEBIAN_FRONTEND=noninteractive
  # needrestart (Ubuntu) would print Perl warnings and ask about services; nothing here needs a restart.
  export NEEDRESTART_SUSPEND=1 NEEDRESTART_MODE=l
  log=$(mktemp)
  echo "installing system packages: ${need[*]}"
  if ! { $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}"; } >"$log" 2>&1; then
    cat "$log"; rm -f "$log"; exit 1
  fi
  rm -f "$log"
  # Debian starts packaged daemons on install; the tests start their own on free ports.
  for svc in redis-server redis-sentinel nginx prometheus; do $sudo_cmd service "$svc" stop >/dev/null 2>&1 || true; done
fi

PY=${PY:-python3}
# Always run: with everything present it only checks (seconds), and it picks up new dependencies.
# constraints.txt holds the versions the suite is known to pass with, so a new release of a test tool
# (pytest, schemathesis, ...) cannot turn the suite red on a fresh machine.
$PY -m pip install -q -c constraints.txt -e '.[dev]'

