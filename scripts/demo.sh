#!/usr/bin/env bash
# The newcomer's path: bring up a whole hive on this machine (control plane + box + router,
# one process), run builds through the HTTP API in real microVMs, show what the box and the
# hive saw, and take everything down again.
set -euo pipefail

HOME_DIR=${HIVED_DEMO_HOME:-/var/lib/hived/demo}
PY=${PYTHON:-python3}
log=$(mktemp)
cleanup() {
    if [[ -n "${up_pid:-}" ]] && kill -0 "$up_pid" 2>/dev/null; then
        kill -TERM "$up_pid"
        wait "$up_pid" || true
    fi
    rm -f "$log"
}
trap cleanup EXIT

echo "== hived doctor"
$PY -m hived doctor || true

echo "== hived up --home $HOME_DIR (hive 'local': control plane, one box with a warm pool of 1, router)"
$PY -m hived up --home "$HOME_DIR" >"$log" 2>&1 &
up_pid=$!
for _ in $(seq 1 240); do
    grep -qx ready "$log" && break
    kill -0 "$up_pid" 2>/dev/null || { cat "$log"; echo "hived up exited"; exit 1; }
    sleep 0.5
done
grep -qx ready "$log" || { cat "$log"; echo "no warm cell within 120 s"; exit 1; }
api=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["api"])' "$HOME_DIR/endpoints.json")
echo "ready: a warm microVM is waiting; the API (router) is at $api"

echo "== hived run -- (POST /v1/builds, then the log streamed back; a build in a fresh microVM)"
start_ns=$(date +%s%N)
set +e
$PY -m hived run --home "$HOME_DIR" -- sh -c '
    echo "hello from cell $(hostname), kernel $(uname -r), user $(id -un)"
    echo "host kernel was '"$(uname -r)"'"
    echo "this line goes to stderr" >&2
    head -c 1000000 /dev/urandom | sha256sum
    exit 3'
code=$?
set -e
echo "build exited with $code (expected 3) in $(( ($(date +%s%N) - start_ns) / 1000000 )) ms"

echo "== two builds at once with one warm cell: the second waits in the hive's queue"
$PY -m hived run --home "$HOME_DIR" -- sh -c 'echo first' &
first=$!
$PY -m hived run --home "$HOME_DIR" -- sh -c 'echo second' &
second=$!
wait "$first" "$second"

echo "== hived status (the box, then the hive)"
$PY -m hived status --home "$HOME_DIR"
[[ $code -eq 3 ]]
