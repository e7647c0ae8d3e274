# The same service with a new model version: the shipped bundle, its card's version bumped (what
# a retrained model's image would carry).
# The image this checkout built (deploy/e2e.sh): a local tag, not a registry's.
# hadolint ignore=DL3007
FROM imdb-sentiment:latest
ARG VERSION=1.0.1-rollout
USER 0
RUN python -c "import json, pathlib, sys; p = pathlib.Path('/app/models/imdb-bigru/card.json'); c = json.loads(p.read_text()); c['version'] = sys.argv[1]; p.write_text(json.dumps(c))" "$VERSION"
USER 10001:10001
