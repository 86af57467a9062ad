#!/usr/bin/env bash
# Start the demo upstream and the gateway in front of it; Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/../.."
.venv/bin/python examples/demo/upstream.py &
upstream=$!
trap 'kill $upstream 2>/dev/null || true' EXIT INT TERM
echo "gateway on http://127.0.0.1:8080 — try: curl localhost:8080/api/demo/hello"
ODIN_CONFIG=examples/demo/config.yaml .venv/bin/gunicorn -c gunicorn.conf.py wsgi:app
