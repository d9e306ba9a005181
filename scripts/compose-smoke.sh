#!/usr/bin/env bash
# Smoke test of the CPU compose stack on a Docker host, as a user meets it: no .env (an empty env file
# stands in, so a developer's .env cannot leak in), generated secrets, the CPU file alone.
#
#   scripts/compose-smoke.sh
#
# Builds the CPU image (docker-compose.yml's build, legacy builder unless the Compose CLI uses BuildKit),
# brings up redis + service + prometheus, reads the generated admin key, uploads a prompt set, classifies,
# checks the security properties (loopback-only ports, Redis unpublished and refusing unauthenticated
# clients, no secret in `docker inspect`, uid 10001), waits for Prometheus to scrape the replica, restarts
# Redis and then the service and checks the upload is still there, and tears everything down (volumes too).
#
# Environment: LPT_SMOKE_BUILD_ARGS (extra `build` flags, e.g. "--build-arg TORCH_INDEX_URL=..."),
# LPT_SMOKE_PROJECT (compose project, default lpt-smoke), LPT_SMOKE_KEEP=1 (leave the stack up on failure).
# The backbone is a seeded DeiT-Tiny (random:0) so nothing is downloaded from the hub.
set -euo pipefail
cd "$(dirname "$0")/.."

if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
project=${LPT_SMOKE_PROJECT:-lpt-smoke}
work=$(mktemp -d)
: >"$work/empty.env"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export LPT_HTTP_PORT=${LPT_HTTP_PORT:-$(free_port)} PROMETHEUS_PORT=${PROMETHEUS_PORT:-$(free_port)}
export LPT_BACKBONE=deit_tiny_patch16_224 LPT_BACKBONE_WEIGHTS=random:0 LPT_DEMO=true HF_HUB_OFFLINE=1
dc() { "${COMPOSE[@]}" --env-file "$work/empty.env" -p "$project" -f docker-compose.yml "$@"; }
api="http://127.0.0.1:$LPT_HTTP_PORT"
prom="http://127.0.0.1:$PROMETHEUS_PORT"

step() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }
fail() { echo "FAIL: $*" >&2; dc ps >&2 || true; dc logs --tail 40 >&2 || true; exit 1; }
teardown() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ "${LPT_SMOKE_KEEP:-}" = 1 ]; then echo "kept project $project"; else dc down -v --remove-orphans >/dev/null 2>&1 || true; fi
  rm -rf "$work"
  [ "$rc" -eq 0 ] && printf '\nPASS (%ss)\n' "$SECONDS" || echo "smoke failed (rc=$rc)"
}
trap teardown EXIT
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || fail "timed out waiting for $what"
    sleep 2
  done
}
http_code() { curl -s -o "$work/body" -w '%{http_code}' "$@"; }

step "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || true)), docker $(docker version -f '{{.Server.Version}}')"
dc config -q
dc down -v --remove-orphans >/dev/null 2>&1 || true

step "build the CPU image"
# shellcheck disable=SC2086  # LPT_SMOKE_BUILD_ARGS is a list of flags
dc build ${LPT_SMOKE_BUILD_ARGS:-} service
build_s=$SECONDS
image=$(dc config | awk '/^  service:/{s=1} s && /^    image:/{print $2; exit}')
docker image inspect "$image" -f '{{.Size}}' | awk '{printf "image %s: %.2f GB\n", "'"$image"'", $1/1e9}'
docker run --rm --entrypoint python "$image" -c \
  "import torch, torchvision, timm; assert torch.version.cuda is None; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"

step "up: redis, service, prometheus"
dc up -d --no-build redis service prometheus
wait_for 300 "service /readyz" curl -sf "$api/readyz"
echo "ready after $((SECONDS - build_s))s from up"
dc ps

step "secrets: generated, per install, nowhere in the container config"
key=$(dc run --rm -T secrets admin-key | tr -d '\r')
[ "${#key}" -ge 32 ] || fail "admin key too short: ${#key} characters"
redis_cid=$(dc ps -q redis)
service_cid=$(dc ps -q service)
password=$(docker exec "$redis_cid" cat /run/lpt-secrets/redis/password)
for cid in "$redis_cid" "$service_cid"; do
  docker inspect "$cid" | grep -qF -e "$key" -e "$password" && fail "a secret appears in docker inspect $cid"
done
[ "$(docker exec "$service_cid" id -u)" = 10001 ] || fail "service does not run as uid 10001"
docker exec "$redis_cid" redis-cli ping 2>&1 | grep -q NOAUTH || fail "redis answers without a password"
[ -z "$(docker port "$redis_cid")" ] || fail "redis is published: $(docker port "$redis_cid")"
for cid in $(dc ps -q); do
  docker port "$cid" | grep -v -E -e '-> 127\.0\.0\.1:' && fail "a port is published beyond 127.0.0.1"
done
echo "ok: key ${#key} chars, redis NOAUTH without it, no published port beyond 127.0.0.1, uid 10001"

step "upload, classify"
docker cp "$service_cid:/data/demo.safetensors" "$work/set.safetensors"
docker cp "$service_cid:/data/demo.jpg" "$work/demo.jpg"
auth=(-H "Authorization: Bearer $key")
code=$(http_code -X POST "$api/v1/classify?task=demo" --data-binary @"$work/demo.jpg")
[ "$code" = 401 ] || fail "classify without a key: $code"
code=$(http_code "${auth[@]}" -X POST "$api/v1/prompts?task=smoke" --data-binary @"$work/set.safetensors")
[ "$code" = 201 ] || fail "upload: $code $(cat "$work/body")"
sha=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sha256"])' "$work/body")
echo "upload 201, sha256 $sha"
code=$(http_code "${auth[@]}" -X POST "$api/v1/classify?task=smoke&top_k=3" --data-binary @"$work/demo.jpg")
[ "$code" = 200 ] || fail "classify: $code $(cat "$work/body")"
echo "classify 200: $(head -c 200 "$work/body")"

step "prometheus scrapes the replica"
targets_up() {
  curl -sf "$prom/api/v1/targets" | python3 -c '
import json, sys
active = json.load(sys.stdin)["data"]["activeTargets"]
up = [t for t in active if t["labels"].get("job") == "lpt-serve" and t["health"] == "up"]
print([t["labels"].get("replica") for t in up])
sys.exit(0 if any(t["labels"].get("replica") == "service" for t in up) else 1)'
}
wait_for 120 "prometheus target lpt-serve/service up" targets_up
targets_up

step "restart redis, then the service (cold cache): the upload is still there"
dc restart redis
wait_for 60 "redis healthy" sh -c "docker inspect -f '{{.State.Health.Status}}' $redis_cid | grep -q healthy"
dc restart service
wait_for 300 "service /readyz after restart" curl -sf "$api/readyz"
code=$(http_code "${auth[@]}" "$api/v1/prompts/smoke")
[ "$code" = 200 ] || fail "prompt set after restart: $code $(cat "$work/body")"
grep -q "$sha" "$work/body" || fail "prompt set after restart has another sha256: $(cat "$work/body")"
code=$(http_code "${auth[@]}" -X POST "$api/v1/classify?task=smoke" --data-binary @"$work/demo.jpg")
[ "$code" = 200 ] || fail "classify after restart: $code"
echo "ok: task smoke, sha256 $sha, classify 200 after both restarts"

step "tear down"
