# The inference service and the shipped models/, CPU PyTorch by default.
#
#   docker build -t imdb-sentiment .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 -t imdb-sentiment:cuda .
#
# Build inputs that are not in git go into .docker-extra/ (ignored), and are used when present:
#   torch-*.whl              install this wheel instead of downloading torch
#   ca-certificates.crt      CA bundle pip trusts (networks that intercept TLS)
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /build
# ".docker-extr[a]" matches nothing on a plain clone; pyproject.toml keeps the COPY valid.
COPY pyproject.toml .docker-extr[a] /build/extra/
RUN python -m venv /opt/venv
RUN set -eu; \
    if [ -f /build/extra/ca-certificates.crt ]; then export PIP_CERT=/build/extra/ca-certificates.crt; fi; \
    if ls /build/extra/torch-*.whl >/dev/null 2>&1; then \
        /opt/venv/bin/pip install --no-cache-dir /build/extra/torch-*.whl; \
    else \
        /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    fi
# The serving lock, hashes checked (every package but torch, whose build is chosen above); then
# the project on top, resolving nothing.
COPY requirements/serve.txt /build/requirements/
RUN set -eu; \
    if [ -f /build/extra/ca-certificates.crt ]; then export PIP_CERT=/build/extra/ca-certificates.crt; fi; \
    /opt/venv/bin/pip install --no-cache-dir --require-hashes -r /build/requirements/serve.txt
COPY pyproject.toml README.md /build/
COPY service /build/service
RUN set -eu; \
    if [ -f /build/extra/ca-certificates.crt ]; then export PIP_CERT=/build/extra/ca-certificates.crt; fi; \
    /opt/venv/bin/pip install --no-cache-dir --no-deps /build; \
    /opt/venv/bin/pip check

FROM ${PYTHON_IMAGE}
# jemalloc: `python -m service` finds it and runs itself on it (service/allocator.py). Under
# batches of every size glibc's heap fragments and the server's memory drifts; jemalloc's stayed
# flat in every soak (docs/reliability.md, "Memory").
# hadolint ignore=DL3008
RUN set -eu; \
    apt-get update; \
    apt-get install -y --no-install-recommends libjemalloc2; \
    rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SENTIMENT_HOST=0.0.0.0 \
    SENTIMENT_PORT=8000 \
    SENTIMENT_GRPC_PORT=8001 \
    SENTIMENT_MODEL_DIR=/app/models
COPY --from=builder /opt/venv /opt/venv
COPY models /app/models
WORKDIR /app
USER 10001:10001
# 8000: HTTP (REST, the page, /metrics); 8001: the Open Inference Protocol over gRPC
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
CMD ["python", "-m", "service"]
