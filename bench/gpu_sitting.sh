#!/usr/bin/env bash
# One GPU sitting (issue 17): every figure this checkout can take on a lent GPU machine, each
# written under one folder, so that device time goes to measuring only.
#
#   bash bench/gpu_sitting.sh OUT [DATA]      # on the device machine: OUT="$OUT"
#
# DATA is the IMDb tarball (default ../shared/data/aclImdb_v1.tar.gz). The device machine sees
# only the repository, and its python3 (3.12, a CUDA torch) lacks the service's web packages.
# Before the call, here (both folders ignored through .git/info/exclude, 31 MB together):
#   mkdir -p .gpu-data && cp ../shared/data/aclImdb_v1.tar.gz .gpu-data/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl fastapi starlette uvicorn pydantic pydantic-core \
#     pydantic-settings annotated-types typing-inspection python-dotenv   # this venv's versions
# and the call carries [".whl", ".gpu-data"] and runs
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site:. bash bench/gpu_sitting.sh "$OUT" .gpu-data/aclImdb_v1.tar.gz
# The service sweep also needs wrk there (step 6 fails without it; the rest goes on): carry
# /usr/bin/wrk and its libluajit-5.1.so.2 and put them on PATH / LD_LIBRARY_PATH.
# The peers run when PEERS names them (e.g. PEERS=litserve) from a Python that has them:
# PEER_ARGS="--peer-python litserve=$(command -v python3)" with LitServe's wheels (litserve,
# pyzmq, httptools, watchfiles, websockets: .whl-peer/, 2 MB) installed beside the service's.
# TorchServe does not fit a call: its Java frontend (45 MB) and a JRE (260 MB) exceed the
# 64 MiB a call carries.
# BENCH_DTYPES (default "float32 float16") picks the sweeps' dtypes.
# To fit one 10-minute call: BENCH_ARGS=--quick (4-second points) and SOAK_SECONDS=120; to
# take again only some steps after a failed one: STEPS="gpu-tests evaluate bench soak".
#
# What it runs, in order (each step's output is its own file; a failed step is noted in
# summary.txt and the sitting goes on):
#   1. the machine: nvidia-smi, torch and CUDA versions
#   2. the gpu-marked tests (the HTTP service on CUDA against the CPU, float16 within 1e-2)
#   3. test-set accuracy per dtype on the 25k reviews: `training evaluate --device cuda`
#   4. the in-process limit on CUDA, batch 1 to 1024, arrival order and length-sorted, per dtype
#   5. tokenising on 1 to 12 threads against the 15,000 reviews/s target
#   6. the service sweep: `python -m bench --device cuda --peers ""` (needs wrk there; the peers
#      need their own CUDA venvs, so they are a separate call when the machine allows it)
#   7. a soak on CUDA (5 minutes unless SOAK_SECONDS) at 0.8x of saturation: host and CUDA
#      memory (needs wrk)
#   8. cudnn: the served model (recurrent weights flattened for cuDNN at load) against model.pt
#      as torch.jit.load leaves it (pytorch/pytorch#19053)
#   9. front-ends: 1, 2 and 4 service processes sharing the GPU, each under its own load
#  10. image: the CUDA image's contents run without Docker (deploy/gpu_image_contents.sh)
set -uo pipefail
out=${1:?usage: bench/gpu_sitting.sh OUT [DATA]}
data=${2:-../shared/data/aclImdb_v1.tar.gz}
py=${PYTHON:-python3}
bundle=models/imdb-bigru
bench_args=${BENCH_ARGS:-}
soak_seconds=${SOAK_SECONDS:-300}
steps=" ${STEPS:-machine gpu-tests evaluate limit tokenize bench soak cudnn front-ends image} "
peers=${PEERS:-}
peer_args=${PEER_ARGS:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

step() {
    local name=$1
    shift
    [[ $steps == *" ${name%-*float*} "* ]] || return 0  # evaluate-float16 -> evaluate
    echo "[$(date -u +%H:%M:%S)] $name" | tee -a "$out/summary.txt"
    "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "  FAILED (exit $rc): see $name.txt" | tee -a "$out/summary.txt"
    fi
}

step machine bash -c "nvidia-smi; $py -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'"
# Only the files that hold gpu tests: the others import packages the machine lacks.
step gpu-tests "$py" -m pytest -m gpu -v -p no:cacheprovider tests/service/test_runtime.py \
    tests/service/test_app.py tests/training/test_cli.py
for dtype in float32 float16 bfloat16; do
    step "evaluate-$dtype" "$py" -m training evaluate "$bundle" --data "$data" \
        --cache-dir "$out/cache" --device cuda --dtype "$dtype" --batch-size 1024
    step "limit-$dtype" "$py" -m bench.limit "$bundle" --data "$data" --device cuda \
        --dtype "$dtype" --batch-sizes 1,16,64,256,512,1024 --reviews 4096 --min-seconds 3 \
        --json "$out/limit-$dtype.json"
done
step tokenize "$py" -m bench.tokenize "$bundle" --data "$data" --cache-dir "$out/cache" \
    --workers 1,2,4,8,12 --json "$out/tokenize.json"
for dtype in ${BENCH_DTYPES:-float32 float16}; do
    step "bench-$dtype" "$py" -m bench --device cuda --dtype "$dtype" --peers "$peers" \
        $peer_args $bench_args --data "$data" --out "$out/bench-$dtype"
done
(  # the service as docker-compose.gpu.yml configures it (its file read by the bench)
    export SENTIMENT_DEVICE=cuda $("$py" -c 'from bench.servers import gpu_compose_env as e
print(" ".join(f"{k}={v}" for k, v in e().items()))')
    step soak "$py" -m bench.reliability soak --seconds "$soak_seconds" --calibrate 30 \
        --data "$data" --json "$out/soak.json"
)
step cudnn "$py" -m bench.limit "$bundle" --data "$data" --cache-dir "$out/cache" --device cuda \
    --batch-sizes 1,64,512,1024 --reviews 4096 --min-seconds 2 --cudnn-layout-lever \
    --json "$out/cudnn.json"
step front-ends "$py" -m bench.front_ends --data "$data" --cache-dir "$out/cache" \
    --processes 1,2,4 --seconds 6 --json "$out/front-ends.json"
step image bash deploy/gpu_image_contents.sh "$py"
rm -rf "$out/cache"
echo "[$(date -u +%H:%M:%S)] done: $out" | tee -a "$out/summary.txt"
