#!/usr/bin/env bash
# The CUDA image's contents run without Docker, for a GPU machine that has no Docker (issue 17's
# lent machines). What `docker compose -f docker-compose.yml -f docker-compose.gpu.yml up` would
# run, as far as a plain host can: the service package installed (not the checkout's tree) next
# to the host's CUDA torch, the shipped models/ in an app folder, the environment of both compose
# files merged (plus the Dockerfile's ENV), the image's user 10001, its command
# `python -m service`; then /ready, /info, /predict and the CUDA memory gauges in /metrics.
#
#   sudo bash deploy/gpu_image_contents.sh [PYTHON]       # PYTHON: one with a CUDA torch
#
# The Python needs the service's dependencies (fastapi, uvicorn, pydantic-settings, tokenizers,
# numpy) importable, as the image's venv has them. Exits non-zero on the first check that fails.
set -euo pipefail
py=${1:-python3}
repo=$(cd "$(dirname "$0")/.." && pwd)
app=$(mktemp -d /tmp/gpu-image.XXXXXX)
server=""
trap 'kill "$server" 2>/dev/null || true; rm -rf "$app"' EXIT

# The image: the package installed from pyproject.toml (no deps: they are the host's), the models.
"$py" -m pip install -q --no-deps --no-build-isolation --no-index --target "$app/venv" "$repo" \
    >"$app/pip.log" 2>&1 || { cat "$app/pip.log"; exit 1; }
cp -r "$repo/models" "$app/models"
chmod -R a+rX "$app"

# The environment: the Dockerfile's ENV, then docker-compose.yml, then the GPU override.
env_file=$app/env
"$py" - "$repo" >"$env_file" <<'EOF'
import os, re, sys
import yaml
repo = sys.argv[1]
env = {"SENTIMENT_HOST": "127.0.0.1", "SENTIMENT_PORT": "18000", "SENTIMENT_MODEL_DIR": "models"}
for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
    with open(os.path.join(repo, name)) as f:
        env.update(yaml.safe_load(f)["services"]["api"].get("environment", {}))
# Compose's ${VAR:-default}: the default, as an unset host variable gives.
fill = lambda v: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v))
for key, value in env.items():
    print(f"{key}={fill(value)}")
EOF
echo "environment (Dockerfile ENV + both compose files; host and port kept on loopback):"
sed 's/^/  /' "$env_file"

# HTTP through Python's urllib: the lent machines have no guarantee of curl.
http() {  # URL [JSON body]
    "$py" -c 'import sys, urllib.request as u
data = sys.argv[2].encode() if len(sys.argv) > 2 else None
request = u.Request(sys.argv[1], data, {"content-type": "application/json"})
print(u.urlopen(request, timeout=10).read().decode())' "$@"
}

cd "$app"
# The image's user; the site folder is the image's venv.
env -i PATH="$PATH" HOME=/tmp PYTHONPATH="$app/venv:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 \
    $(cat "$env_file") setpriv --reuid 10001 --regid 10001 --clear-groups \
    "$py" -m service >"$app/server.log" 2>&1 &
server=$!
for _ in $(seq 120); do
    http http://127.0.0.1:18000/ready >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { cat "$app/server.log"; exit 1; }
    sleep 1
done
info=$(http http://127.0.0.1:18000/info)
echo "/info: $info"
answer=$(http http://127.0.0.1:18000/predict \
    '{"inputs": ["A moving, beautifully acted film.", "Dull, clumsy and far too long."]}')
echo "/predict: $answer"
metrics=$(http http://127.0.0.1:18000/metrics)
"$py" - "$info" "$answer" "$metrics" <<'EOF'
import json, sys
info, answer, metrics = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
assert info["device"].startswith("cuda"), info["device"]
assert info["batching"]["max_batch_size"] == 512, info["batching"]
assert info["batching"]["processes"] == 4, info["batching"]
top = [max(scores, key=lambda s: s["score"])["label"] for scores in answer]
assert top == ["POSITIVE", "NEGATIVE"], answer
gauges = [l for l in metrics.splitlines() if l.startswith("sentiment_cuda_memory_bytes{")]
assert len(gauges) == 3 and all(float(l.split()[-1]) > 0 for l in gauges), gauges
print("PASSED: the image's contents serve on", info["device"], "as uid 10001:", *gauges, sep="\n  ")
EOF
sed -n 1,5p "$app/server.log"
