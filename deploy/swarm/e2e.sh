#!/usr/bin/env bash
# Docker Swarm end to end, on this machine only (loopback, an overlay network of its own):
#   swarm init -> stack deploy (3 api replicas, HAProxy, Prometheus) -> Prometheus sees 3 targets
#   -> rolling update to a new model version under steady load: every request answered 2xx,
#      sent = answered, the answers' version flips -> one replica's container killed under load:
#      the swarm replaces it, failures counted -> stack rm, swarm leave.
# Load runs in a container on the stack's network (load.py, on the api image's Python),
# so nothing is published on the host. The api image must exist: `bash deploy/e2e.sh` builds it
# (with the local base images it needs). Results: one JSON line per phase, and a summary.
#
#   sudo bash deploy/swarm/e2e.sh            (REPLICAS, CLIENTS, STACK override the defaults)
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=deploy/dockerd.sh
. ../dockerd.sh
STACK=${STACK:-sentiment}
REPLICAS=${REPLICAS:-3}
CLIENTS=${CLIENTS:-16}
# The shipped model's version, and the one the rollout brings (the same weights, relabelled).
OLD_VERSION=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["version"])' \
  ../../models/imdb-bigru/card.json)
NEW_VERSION="$OLD_VERSION-rollout"
log() { printf '[swarm %(%H:%M:%S)T] %s\n' -1 "$*"; }
fail() { log "FAILED: $*"; exit 1; }

left_swarm=0
cleanup() {
  docker stack rm "$STACK" >/dev/null 2>&1 || true
  if [ "$left_swarm" = 1 ]; then sleep 5; docker swarm leave --force >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

log "docker daemon"
start_dockerd /tmp/dockerd-swarm.log || exit 1
docker image inspect imdb-sentiment:latest >/dev/null 2>&1 \
  || fail "no imdb-sentiment:latest image: run deploy/e2e.sh first (it builds it)"
if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" != active ]; then
  docker swarm init --advertise-addr 127.0.0.1 >/dev/null
  left_swarm=1
  log "swarm initialised on 127.0.0.1"
fi

log "building the load balancer and the new model version's image"
docker build -q -t sentiment-haproxy:local -f haproxy.Dockerfile . >/dev/null
docker build -q -t imdb-sentiment:v2 --build-arg VERSION="$NEW_VERSION" -f v2.Dockerfile . >/dev/null

API_REPLICAS=$REPLICAS docker stack deploy -c stack.yml "$STACK" >/dev/null
network="${STACK}_default"
in_network() { docker run --rm --network "$network" -v "$PWD":/swarm:ro imdb-sentiment:latest "$@"; }

wait_running() {  # until REPLICAS api tasks run, at most $1 tries 2 s apart
  for _ in $(seq "$1"); do
    running=$(docker service ps "${STACK}_api" --filter desired-state=running \
      --format '{{.CurrentState}}' | grep -c '^Running' || true)
    [ "$running" = "$REPLICAS" ] && return 0
    sleep 2
  done
  return 1
}
wait_running 90 || fail "$running of $REPLICAS api tasks running"
log "$REPLICAS api tasks running"

targets_up() {
  in_network python -c '
import json, sys, urllib.request
targets = json.load(urllib.request.urlopen("http://prometheus:9090/api/v1/targets", timeout=5))
print(sum(t["health"] == "up" for t in targets["data"]["activeTargets"] if t["labels"]["job"] == "api"))'
}
for _ in $(seq 60); do
  up=$(targets_up 2>/dev/null || echo 0)
  [ "$up" = "$REPLICAS" ] && break
  sleep 2
done
[ "$up" = "$REPLICAS" ] || fail "Prometheus sees $up api targets up, not $REPLICAS"
log "Prometheus (dns_sd_configs on tasks.api): $up api targets up"

# Steady load in the background (SECONDS, result file); returns once the load has its first
# answer, then lets it run 5 s more, so what follows always happens under load.
start_load() {
  in_network python /swarm/load.py http://lb:8080/predict "$1" "$CLIENTS" >"$2" 2>"$2.err" &
  load=$!
  for _ in $(seq 120); do
    grep -q answering "$2.err" 2>/dev/null && break
    kill -0 "$load" 2>/dev/null || fail "the load generator exited: $(cat "$2.err")"
    sleep 1
  done
  grep -q answering "$2.err" || fail "the load generator had no answer in 120 s"
  sleep 5
}

# Rolling update under load: the load runs past the update's end.
start_load $((REPLICAS * 45 + 40)) /tmp/swarm-rollout.json
started=$(date +%s)
docker service update --quiet --image imdb-sentiment:v2 "${STACK}_api" >/dev/null
state=$(docker service inspect --format '{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}' "${STACK}_api")
[ "$state" = completed ] || fail "the rolling update ended '$state', not completed"
log "rolling update to $NEW_VERSION done in $(($(date +%s) - started)) s"
wait "$load"
python3 - "$OLD_VERSION" "$NEW_VERSION" /tmp/swarm-rollout.json <<'PY'
import json, sys
old, new, result = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
print("rollout:", json.dumps({k: v for k, v in result.items() if k != "versions_by_second"}))
seconds = sorted(result["versions_by_second"].items(), key=lambda kv: int(kv[0]))
assert result["sent"] == result["answered"], "requests lost"
assert set(result["statuses"]) == {"200"} and not result["errors"], result
first, last = seconds[0][1], seconds[-1][1]
assert set(first) == {old} and set(last) == {new}, (first, last)
print(f"rollout: {result['sent']} sent, {result['answered']} answered, all 200; "
      f"version {'/'.join(first)} at second 0 -> {'/'.join(last)} at second {seconds[-1][0]}")
PY

# A replica's container killed under load: the swarm starts a new task; failures are counted.
start_load 60 /tmp/swarm-kill.json
victim=$(docker ps -q -f "name=${STACK}_api.1" | head -1)
docker kill "$victim" >/dev/null
log "killed $victim"
wait "$load"
python3 - /tmp/swarm-kill.json <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
print("kill:", json.dumps({k: v for k, v in result.items() if k != "versions_by_second"}))
failed = result["sent"] - result["statuses"].get("200", 0)
assert failed <= 0.01 * result["sent"], f"{failed} of {result['sent']} failed"
print(f"kill: {result['sent']} sent, {failed} not answered 200 ({failed / result['sent']:.3%})")
PY
wait_running 60 || fail "the killed task was not replaced ($running running)"
log "the swarm replaced the killed task: $running api tasks running"
log "PASSED"
