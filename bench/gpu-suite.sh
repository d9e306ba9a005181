#!/usr/bin/env bash
# One-shot GPU suite: the engine table, HTTP end to end, cold loads from Redis and 10,000 resident sets,
# sized to finish within 8 minutes on one H100/H200 (ViT-B/16, bf16, seeded random weights: throughput does
# not depend on the weight values, and the machine needs no hub access).
#
#   bench/gpu-suite.sh [--smoke] OUTDIR
#
# Writes OUTDIR/suite.md (every table), OUTDIR/suite.json (every step's full report and status) and
# OUTDIR/suite.log (progress and errors): three files, so they all come back from a remote run.
# --smoke (or GPU_SUITE_SMOKE=1) runs the same steps on the CPU with a tiny ViT and tiny sizes, to show the
# script works end to end without a GPU (about 2 minutes on 2 cores).
# Needs the project's Python dependencies (torch, timm, fastapi, uvicorn, redis, httpx, ...) importable by
# $PYTHON (default python3) and redis-server on PATH; a step whose needs are missing is recorded as skipped.
# A failed or timed-out step is recorded and the suite goes on with the next one.
set -uo pipefail

smoke="${GPU_SUITE_SMOKE:-0}"
if [[ "${1:-}" == "--smoke" ]]; then
    smoke=1
    shift
fi
if [[ $# -ne 1 ]]; then
    echo "usage: bench/gpu-suite.sh [--smoke] OUTDIR" >&2
    exit 2
fi
out="$(mkdir -p "$1" && cd "$1" && pwd)"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$root" || exit 1
raw="$(mktemp -d)"
trap 'rm -rf "$raw"' EXIT
started="$(date +%s)"

if [[ "$smoke" == 1 ]]; then
    model=(--backbone test_vit --weights random:0 --img-size 32)
    on=(--device "${GPU_SUITE_DEVICE:-cpu}" --dtype float32)
    engine_args=(--batch-sizes 1,4 --repeats 2 --warmup 1 --tasks 8 --tasks-per-batch 4 --threads 1)
    http_args=(--concurrency 1,4 --duration 1 --warmup 0.5 --repeats 1 --engine-repeats 1 --half-load 1 --tasks 4
        --images 4 --threads 1 --server-threads 1)
    loading_args=(--shape-backbone test_vit --sets 4 --loads 4 --uploads 2 --serve-backbone test_vit
        --serve-weights random:0 --serve-img-size 32 --threads 1)
    scaling_args=(--parts registered --registered 10,100 --registered-batch 4 --registered-tasks-per-batch 2
        --repeats 2 --check-tasks 2 --threads 1)
    limits=(600 600 600 600)
    budget_s="${GPU_SUITE_BUDGET_S:-1800}"  # generous: a shared CPU can be slow; the limits are only a safety net
else
    model=(--backbone vit_base_patch16_224 --weights random:0)
    on=(--device "${GPU_SUITE_DEVICE:-cuda}" --dtype bfloat16)
    engine_args=(--batch-sizes 1,2,4,8,16,32,64,128,256 --repeats 10 --warmup 2 --tasks 256 --tasks-per-batch 64)
    http_args=(--concurrency 1,16,64 --duration 8 --warmup 2 --repeats 1 --engine-repeats 3 --half-load 8
        --tasks 100 --max-batch-size 64)
    loading_args=(--shape-backbone vit_base_patch16_224 --sets 20 --loads 40 --uploads 10
        --serve-backbone vit_base_patch16_224 --serve-weights random:0)
    scaling_args=(--parts registered --registered 10,100,1000,10000 --registered-batch 64
        --registered-tasks-per-batch 8 --repeats 5)
    limits=(150 140 60 110)
    budget_s="${GPU_SUITE_BUDGET_S:-470}"  # the whole suite, under 8 minutes with the summary
fi

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$out/suite.log" >&2; }
: >"$out/suite.log"
: >"$raw/steps.tsv"

# One interpreter start (seconds on a busy machine) tells which of the modules the steps need are missing.
missing="$("$py" -c '
import importlib.util
names = ["torch", "timm", "fastapi", "uvicorn", "httpx", "redis"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
' 2>/dev/null || echo python)"
have_modules() {
    local name
    for name in ${1//,/ }; do
        [[ " $missing " == *" $name "* ]] && return 1
    done
    return 0
}

# run_step NAME LIMIT_S NEEDS_MODULES NEEDS_REDIS ARGS...: python -m bench ARGS --json, stdout is the markdown.
run_step() {
    local name="$1" limit="$2" modules="$3" needs_redis="$4"
    shift 4
    local left=$((budget_s - ($(date +%s) - started)))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        log "$name: skipped, the suite's ${budget_s}s budget is spent"
        printf '%s\tskipped: budget spent\t0\n' "$name" >>"$raw/steps.tsv"
        return
    fi
    if ! have_modules "$modules"; then
        log "$name: skipped, $py cannot import one of: $modules"
        printf '%s\tskipped: missing python modules (%s)\t0\n' "$name" "$modules" >>"$raw/steps.tsv"
        return
    fi
    if [[ "$needs_redis" == 1 ]] && ! command -v redis-server >/dev/null; then
        log "$name: skipped, no redis-server on PATH"
        printf '%s\tskipped: no redis-server\t0\n' "$name" >>"$raw/steps.tsv"
        return
    fi
    log "$name: python -m bench $* (limit ${limit}s)"
    local t0 status rc
    t0="$(date +%s)"
    timeout --kill-after=10 "$limit" "$py" -m bench "$@" --json "$raw/$name.json" >"$raw/$name.md" 2>>"$out/suite.log"
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out after ${limit}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    log "$name: $status in $(($(date +%s) - t0))s"
    printf '%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" >>"$raw/steps.tsv"
}

log "gpu-suite: smoke=$smoke, out=$out, python=$("$py" -c 'import sys; print(sys.version.split()[0])' 2>&1)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    | tee -a "$out/suite.log" >&2

run_step engine "${limits[0]}" "torch,timm" 0 engine "${model[@]}" "${on[@]}" "${engine_args[@]}"
run_step http "${limits[1]}" "torch,timm,fastapi,uvicorn,httpx" 0 http "${model[@]}" "${on[@]}" "${http_args[@]}"
run_step loading "${limits[2]}" "torch,timm,fastapi,uvicorn,httpx,redis" 1 loading "${on[@]}" "${loading_args[@]}"
run_step scaling "${limits[3]}" "torch,timm,fastapi" 0 scaling "${model[@]}" "${on[@]}" "${scaling_args[@]}"

# The summary: one markdown file with every table, one JSON file with every report and the step statuses.
"$py" - "$raw" "$out" "$smoke" "$(($(date +%s) - started))" <<'EOF'
import datetime as dt
import json
import sys
from pathlib import Path

raw, out, smoke, total_s = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
titles = {
    "engine": "Engine (plain, two-pass, append, ours single / mixed, per task, deep VPT, plain last-token)",
    "http": "HTTP end to end against the engine",
    "loading": "Cold loads from Redis (and the embedded store), upload to first served",
    "scaling": "Resident sets: 10 ... 10,000 registered",
}
steps, reports = [], {}
for line in (raw / "steps.tsv").read_text().splitlines():
    name, status, seconds = line.split("\t")
    steps.append({"step": name, "status": status, "seconds": int(seconds)})
    path = raw / f"{name}.json"
    if path.is_file():
        reports[name] = json.loads(path.read_text())
date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
md = [f"# GPU suite{' (smoke run on CPU)' if smoke else ''}", "", f"{date}, {total_s} s in all", ""]
md += ["| step | status | seconds |", "|---|---|---:|"]
md += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps]
for s in steps:
    table = raw / f"{s['step']}.md"
    if table.is_file() and table.read_text().strip():
        md += ["", f"## {titles.get(s['step'], s['step'])}", "", table.read_text().strip()]
(out / "suite.md").write_text("\n".join(md) + "\n")
suite = {"suite": "gpu", "smoke": smoke, "date": date, "seconds": total_s, "steps": steps, "reports": reports}
(out / "suite.json").write_text(json.dumps(suite, indent=1))
failed = [s["step"] for s in steps if s["status"] != "ok"]
print(f"gpu-suite: {len(steps) - len(failed)}/{len(steps)} steps ok{'; not ok: ' + ', '.join(failed) if failed else ''}",
      file=sys.stderr)
sys.exit(1 if failed else 0)
EOF
rc=$?
log "gpu-suite: done in $(($(date +%s) - started))s; $out/suite.md, suite.json, suite.log"
exit $rc
