#!/usr/bin/env bash
# Smoke-test a built executable from a clean directory, with no Python on PATH and an empty
# environment: --version, libpq (a PostgreSQL store it cannot reach), import the tiny model, serve
# on a free port, /healthz, one chat completion (so llama.cpp really loads in the frozen app), the
# UI page, one MCP tool call, then SIGTERM and a clean exit. Also that the frozen llama.cpp reports the same build
# (system info, devices) as the pip install REFERENCE (default: .venv/bin/appliance).
# Usage: packaging/smoke.sh dist/appliance/appliance [REFERENCE]
set -euo pipefail
binary=$(realpath "$1")
repo=$(cd "$(dirname "$0")/.." && pwd)
reference=${2:-$repo/.venv/bin/appliance}
work=$(mktemp -d)
trap 'kill "${server:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
"$repo/.venv/bin/python" -c "import sys; sys.path.insert(0, '$repo'); from pathlib import Path; \
from tests.tiny_model import TINY_CHAT_TEMPLATE, write_llama_gguf; \
write_llama_gguf(Path('$work/tiny.gguf'), chat_template=TINY_CHAT_TEMPLATE)"
port=$("$repo/.venv/bin/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
run() { (cd "$work" && exec env -i PATH=/usr/bin:/bin HOME="$work" "$binary" --data-dir "$work/data" "$@"); }

run --version
# psycopg's libpq is frozen in too: a PostgreSQL store it cannot reach fails with libpq's own reason.
refused=$(cd "$work" && env -i PATH=/usr/bin:/bin HOME="$work" APPLIANCE_STORE__URL=postgresql://smoke@127.0.0.1:1/smoke \
    "$binary" --data-dir "$work/data" models ls 2>&1 || true)
if ! grep -q 'the PostgreSQL database postgresql://smoke@127.0.0.1:1/smoke failed: connection' <<<"$refused"; then
    printf 'the frozen app does not reach PostgreSQL through libpq:\n%s\n' "$refused" >&2
    exit 1
fi
# The same llama.cpp build frozen as installed: backends, CPU features, devices.
engine_facts='import json, sys; facts = json.load(sys.stdin); print(facts["llama_cpp_system_info"]); print([d["name"] for d in facts["devices"]])'
frozen=$(run system --json | "$repo/.venv/bin/python" -c "$engine_facts")
installed=$("$reference" --data-dir "$work/reference" system --json | "$repo/.venv/bin/python" -c "$engine_facts")
if [[ "$frozen" != "$installed" ]]; then
    printf 'the frozen llama.cpp differs from the installed one:\nfrozen:    %s\ninstalled: %s\n' "$frozen" "$installed" >&2
    exit 1
fi
echo "llama.cpp as installed: $frozen"
run models import tiny.gguf --name tiny
# Started without the function, so that $! is the server itself and SIGTERM reaches it.
(cd "$work" && exec env -i PATH=/usr/bin:/bin HOME="$work" "$binary" --data-dir "$work/data" serve --port "$port") \
    >"$work/serve.log" 2>&1 &
server=$!
for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
    sleep 0.1
done
curl -sf "http://127.0.0.1:$port/healthz"
echo
curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
    -d '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}' \
    | grep -q '"completion_tokens":8'
curl -sf "http://127.0.0.1:$port/" | grep -q '<html'
# The MCP gateway (the SDK and what it brings are frozen too): one tool call, answered as JSON.
curl -sf "http://127.0.0.1:$port/mcp" -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' \
    -d '{"jsonrpc": "2.0", "id": 1, "method": "tools/call",
         "params": {"name": "preference.get", "arguments": {"key": "models.download.require_user_approval"}}}' \
    | grep -q '"isError":false'
kill -TERM "$server"
status=0
wait "$server" || status=$?
# uvicorn shuts down gracefully, then ends by the signal it caught (143), as a process should
if [[ $status -ne 0 && $status -ne 143 ]] || ! grep -q "Application shutdown complete" "$work/serve.log"; then
    echo "serve did not shut down cleanly on SIGTERM (status $status):" >&2
    cat "$work/serve.log" >&2
    exit 1
fi
echo "smoke test passed: $binary"
