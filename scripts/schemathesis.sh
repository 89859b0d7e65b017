#!/usr/bin/env bash
# OpenAPI validation of the HTTP service (issue #6, "Done when"): Schemathesis (PyPI) generates
# requests from the running server's /v1/openapi.json, valid and invalid, for every operation,
# and checks every answer: no 5xx, status codes and content types the document lists, bodies that
# match the response schemas, schema-valid requests accepted (2xx, or 404 / 409 for unknown ids and
# other weights), schema-invalid ones rejected with a 4xx.
#
#   scripts/schemathesis.sh               # build, seed (once), serve, validate; exit 1 on failures
#   scripts/schemathesis.sh --max-examples 20   # extra arguments go to `schemathesis run`
#
# What it does:
#   1. builds `gigapath` (release), creates the venv .venv-st with schemathesis if missing
#      (add `/.venv-st/` to .git/info/exclude);
#   2. seeds a small aligned data dir once (`models init --preset tiny`, `synth cohort` 3 x 2
#      slides, `ingest`, a short `train`, `reembed`) into $ST_DIR/pristine, and serves a fresh copy
#      of it every run (the admin key lets Schemathesis delete slides and queue ingests);
#   3. runs `gigapath serve` on 127.0.0.1:$ST_PORT with the admin key and the cohort as slide root;
#   4. runs `schemathesis run` over all operations and phases, with `X-Api-Key: $ST_API_KEY` on
#      every request (one worker: Python 3.11's `ast` is not thread-safe and Hypothesis parses
#      lambdas with it, which made parallel workers fail at random with "AST constructor recursion
#      depth mismatch"); settings in scripts/schemathesis.toml; the JUnit report goes to
#      $ST_DIR/report/, the output to stdout.
#
# Environment (defaults): SKIP_BUILD=1 (use the binaries already in target/release), ST_DIR (target/schemathesis), ST_PORT (18081),
# ST_API_KEY (schemathesis-admin-key-0123456789), ST_MAX_EXAMPLES (40), ST_RESEED=1.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${ST_DIR:-$ROOT/target/schemathesis}
PORT=${ST_PORT:-18081}
KEY=${ST_API_KEY:-schemathesis-admin-key-0123456789}
MAX_EXAMPLES=${ST_MAX_EXAMPLES:-40}
URL="http://127.0.0.1:$PORT"
BIN="$ROOT/target/release/gigapath"
VENV="$ROOT/.venv-st"
TEXT_ENCODER="$ROOT/tests/fixtures/reference/text_bert_mlm"

log() { printf '[schemathesis] %s\n' "$*" >&2; }

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "building (release)"
    (cd "$ROOT" && cargo build --release -q -p gigapath --bin gigapath)
fi
if [ ! -x "$VENV/bin/schemathesis" ]; then
    log "creating $VENV with schemathesis"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q schemathesis
fi

if [ "${ST_RESEED:-0}" = 1 ] || [ ! -f "$DIR/pristine/.seeded" ]; then
    log "seeding $DIR/pristine"
    rm -rf "$DIR"
    mkdir -p "$DIR/pristine"
    P="$DIR/pristine"
    G() { GIGAPATH_LOG=warn "$BIN" "$@"; }
    G models init -o "$P/models" --preset tiny >/dev/null
    G synth cohort -o "$P/cohort" --slides-per-subtype 2 --slide-um 600 >/dev/null
    cat >"$P/gigapath.toml" <<EOF
[models]
tile_encoder = "$P/models/tile"
slide_encoder = "$P/models/slide"
text_encoder = "$TEXT_ENCODER"
text_pool = "cls"

[serve]
prompts_dir = "$ROOT/prompts"
slide_roots = ["$P/cohort"]
EOF
    printf '[model]\ntext_pool = "cls"\n[optim]\nsteps = 20\nbatch_size = 4\nwarmup_steps = 2\n[checkpoint]\nevery_steps = 20\n[eval]\nevery_steps = 0\n' >"$P/run.toml"
    G ingest --data-dir "$P/data" --config "$P/gigapath.toml" \
        --reports "$P/cohort/reports.jsonl" "$P/cohort/slides" >/dev/null
    G train --data-dir "$P/data" --config "$P/run.toml" --run-id st --json >/dev/null
    G reembed --data-dir "$P/data" --alignment "$P/data/alignment/st" >/dev/null
    touch "$P/.seeded"
fi

# A fresh copy each run: Schemathesis deletes slides and queues ingests.
rm -rf "$DIR/run" "$DIR/report"
cp -a "$DIR/pristine/data" "$DIR/run"
mkdir -p "$DIR/report"
GIGAPATH_API_KEYS="$KEY" GIGAPATH_LOG=warn "$BIN" serve --data-dir "$DIR/run" --bind "127.0.0.1:$PORT" \
    >"$DIR/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    curl -fsS "$URL/readyz" >/dev/null 2>&1 && break
    kill -0 $SERVER 2>/dev/null || { cat "$DIR/serve.log" >&2; exit 1; }
    sleep 0.5
done

log "schemathesis run $URL/v1/openapi.json"
set +e
NO_COLOR=1 "$VENV/bin/schemathesis" --config-file "$ROOT/scripts/schemathesis.toml" run "$URL/v1/openapi.json" \
    --header "X-Api-Key: $KEY" \
    --checks all \
    --phases examples,coverage,fuzzing,stateful \
    --max-examples "$MAX_EXAMPLES" \
    --workers 1 \
    --seed 1 \
    --report junit --report-dir "$DIR/report" \
    "$@" | tee "$DIR/report/output.txt"
status=${PIPESTATUS[0]}
set -e
if grep -q 'status="500"\|internal error' "$DIR/serve.log"; then
    log "the server logged internal errors:"; grep -m 20 'internal error' "$DIR/serve.log" >&2
fi
exit "$status"
