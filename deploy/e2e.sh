#!/usr/bin/env bash
# End-to-end check of the container set-up on a machine with no image registry:
#   build -> docker compose up -d api prometheus -> POST /predict on 127.0.0.1 -> ask Prometheus
#   that the api target is up and counted the request -> docker compose down -v.
#
# No registry is reachable here, so the two public base images are replaced by LOCAL STAND-INS
# built under their public names, and the same Dockerfile and compose file are exercised:
#   python:3.11-slim         <- a debootstrapped Debian bookworm root with Python 3.11
#                               (python on the same PATH, /usr/local/bin)
#   prom/prometheus:v2.53.2  <- Debian bookworm's `prometheus` package, same entrypoint and paths
# Images already present under those names (real or stand-in) are used as they are. Grafana
# cannot be built here; its provisioning is checked statically by tests/deploy.
#
# Compose v2 cannot be installed here: Debian's docker-compose (1.29) stands in for
# `docker compose`; the compose file stays within what both accept.
#
# Run as root. Environment: TORCH_WHEEL_DIR (default /opt/wheels: a torch wheel there is used
# instead of a download), CA_BUNDLE (default /etc/ssl/certs/ca-certificates.crt), API_PORT,
# GRPC_PORT, PROMETHEUS_PORT, MIRROR (Debian mirror for debootstrap), CLIENT_PYTHON (a Python
# with tritonclient and numpy; default .venv/bin/python, from make install).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=deploy/dockerd.sh
. deploy/dockerd.sh

MIRROR=${MIRROR:-http://deb.debian.org/debian}
TORCH_WHEEL_DIR=${TORCH_WHEEL_DIR:-/opt/wheels}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
export API_PORT=${API_PORT:-18000} GRPC_PORT=${GRPC_PORT:-18001} PROMETHEUS_PORT=${PROMETHEUS_PORT:-19090}
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-sentimente2e}
WORK=$(mktemp -d)
log() { printf '[e2e %(%H:%M:%S)T] %s\n' -1 "$*"; }

compose() {
  if docker compose version >/dev/null 2>&1; then docker compose "$@"; else docker-compose "$@"; fi
}

cleanup() {
  status=$?
  if [ "$status" -ne 0 ]; then
    log "FAILED; service logs:"
    compose logs --tail 50 api prometheus 2>/dev/null || true
  fi
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf .docker-extra "$WORK"
  exit "$status"
}
trap cleanup EXIT

install_tools() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || missing+=(docker-compose)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
  fi
  log "docker daemon"
  start_dockerd /var/log/dockerd-e2e.log || exit 1
}

# A Debian root, imported as an image: debootstrap <name> <packages> <docker import --change...>
import_root() {
  local name=$1 packages=$2; shift 2
  log "stand-in $name: debootstrap bookworm with $packages"
  debootstrap --variant=minbase --include="$packages" bookworm "$WORK/root" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; exit 1; }
  "${PREPARE_ROOT:-true}" "$WORK/root"
  rm -rf "$WORK/root/var/cache/apt/archives/"*.deb "$WORK/root/var/lib/apt/lists/"*
  tar -C "$WORK/root" -c . | docker import "$@" - "$name" >/dev/null
  rm -rf "$WORK/root"
}

python_root() {  # what python:3.11-slim puts on PATH
  ln -sf /usr/bin/python3 "$1/usr/local/bin/python"
  ln -sf /usr/bin/python3 "$1/usr/local/bin/python3"
}

prometheus_root() {  # the official image's layout: /prometheus owned by nobody
  mkdir -p "$1/prometheus"
  chown 65534:65534 "$1/prometheus"
}

build_standins() {
  if ! docker image inspect python:3.11-slim >/dev/null 2>&1; then
    PREPARE_ROOT=python_root import_root python:3.11-slim python3,python3-venv,ca-certificates \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]'
  fi
  if ! docker image inspect prom/prometheus:v2.53.2 >/dev/null 2>&1; then
    PREPARE_ROOT=prometheus_root import_root prom/prometheus:v2.53.2 prometheus \
      --change 'USER 65534:65534' --change 'WORKDIR /prometheus' --change 'EXPOSE 9090' \
      --change 'ENTRYPOINT ["/usr/bin/prometheus"]' \
      --change 'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'
  fi
}

http() { python3 -c 'import sys, urllib.request as u; print(u.urlopen(sys.argv[1], timeout=5).read().decode())' "$1"; }

main() {
  install_tools
  build_standins

  mkdir -p .docker-extra
  cp "$CA_BUNDLE" .docker-extra/ca-certificates.crt
  if ls "$TORCH_WHEEL_DIR"/torch-*.whl >/dev/null 2>&1; then
    cp "$TORCH_WHEEL_DIR"/torch-*.whl .docker-extra/
  fi

  log "compose config"
  compose config -q
  log "build api"
  compose build api
  log "up api prometheus"
  compose up -d api prometheus

  local container health=""
  container=$(compose ps -q api)
  for _ in $(seq 90); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$container")
    [ "$health" = healthy ] && break
    sleep 2
  done
  [ "$health" = healthy ] || { log "api never became healthy ($health)"; exit 1; }
  log "api healthy; user $(docker inspect -f '{{.Config.User}}' "$container"), read-only root $(docker inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$container")"
  docker exec "$container" grep -q libjemalloc /proc/1/maps \
    || { log "the server does not run on jemalloc"; exit 1; }
  log "api runs on jemalloc"

  local answer
  answer=$(python3 - "$API_PORT" <<'PY'
import json, sys, urllib.request
request = urllib.request.Request(
    f"http://127.0.0.1:{sys.argv[1]}/predict",
    data=json.dumps({"inputs": "A wonderful, moving film."}).encode(),
    headers={"content-type": "application/json"},
)
body = json.loads(urllib.request.urlopen(request, timeout=30).read())
# one text -> [[{label, score}, ...]], best first (README, "Wire format")
assert body[0][0]["label"] == "POSITIVE", body
print(json.dumps(body))
PY
)
  log "POST /predict -> $answer"

  # The explanation (a backward pass in the read-only container) and the page with its files.
  answer=$(python3 - "$API_PORT" <<'PY'
import json, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
text = "The acting was wonderful but the plot was dull."
request = urllib.request.Request(
    f"{base}/explain", data=json.dumps({"inputs": text}).encode(),
    headers={"content-type": "application/json"},
)
(body,) = json.loads(urllib.request.urlopen(request, timeout=60).read())
words = {t["text"]: t["attribution"] for t in body["tokens"]}
assert words["wonderful"] > 0 > words["dull"], words
assert len(body["sentences"]) == 2 and body["mixed"], body["sentences"]
page = urllib.request.urlopen(f"{base}/", timeout=30).read().decode()
assert 'src="static/app.js"' in page, page[:200]
assert urllib.request.urlopen(f"{base}/static/app.js", timeout=30).status == 200
print(f"wonderful {words['wonderful']:+.2f}, dull {words['dull']:+.2f}, 2 sentences, page served")
PY
)
  log "POST /explain and GET / -> $answer"

  # The Open Inference Protocol through the container's two ports, with Triton's own clients
  # (from the project's dev install: tritonclient is not in the image).
  answer=$("${CLIENT_PYTHON:-.venv/bin/python}" - "$API_PORT" "$GRPC_PORT" <<'PY'
import sys
import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
answers = {}
for triton, port in ((triton_http, sys.argv[1]), (triton_grpc, sys.argv[2])):
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    assert client.is_model_ready("imdb-bigru")
    text = triton.InferInput("TEXT", [1], "BYTES")
    text.set_data_from_numpy(np.array(["A wonderful, moving film."], dtype=object))
    result = client.infer("imdb-bigru", [text])
    assert result.as_numpy("LABEL")[0] == b"POSITIVE", result.as_numpy("LABEL")
    answers[triton.__name__.split(".")[-1]] = float(result.as_numpy("PROBABILITIES")[0][1])
assert abs(answers["http"] - answers["grpc"]) < 1e-6, answers
print(", ".join(f"{k} POSITIVE {v:.3f}" for k, v in answers.items()))
PY
)
  log "Open Inference Protocol (tritonclient) -> $answer"

  local prom="http://127.0.0.1:$PROMETHEUS_PORT"
  for _ in $(seq 60); do
    if http "$prom/api/v1/targets" 2>/dev/null | python3 -c '
import json, sys
targets = json.load(sys.stdin)["data"]["activeTargets"]
sys.exit(0 if any(t["labels"]["job"] == "api" and t["health"] == "up" for t in targets) else 1)'; then
      up=1; break
    fi
    sleep 2
  done
  [ "${up:-0}" = 1 ] || { log "Prometheus never saw the api target up"; exit 1; }
  log "Prometheus: api target is up"

  local query='sentiment_requests_total{route="/predict",status="200"}'
  for _ in $(seq 60); do
    value=$(http "$prom/api/v1/query?query=$(python3 -c 'import sys, urllib.parse as p; print(p.quote(sys.argv[1]))' "$query")" \
      | python3 -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)')
    python3 -c "import sys; sys.exit(0 if float('$value') >= 1 else 1)" && break
    sleep 2
  done
  python3 -c "import sys; sys.exit(0 if float('$value') >= 1 else 1)" \
    || { log "Prometheus did not record the request"; exit 1; }
  log "Prometheus: $query = $value"
  log "PASSED"
}

main "$@"
