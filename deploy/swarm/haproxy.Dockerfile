# HAProxy from Debian's package, on the same Debian base as the service image (no registry
# needed beyond what builds the service image).
FROM python:3.11-slim
# hadolint ignore=DL3008
RUN set -eu; apt-get update; apt-get install -y --no-install-recommends haproxy; \
    rm -rf /var/lib/apt/lists/*
COPY haproxy.cfg /etc/haproxy/haproxy.cfg
EXPOSE 8080
CMD ["haproxy", "-W", "-db", "-f", "/etc/haproxy/haproxy.cfg"]
