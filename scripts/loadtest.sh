#!/usr/bin/env bash
# Load test of the HTTP service (issue #6, "Speed"): p50 / p99 latency, throughput and errors of
# text-to-slide search, report search and zero-shot subtyping with 10,000 stored slides, at 16
# concurrent clients on loopback, measured with wrk (Debian package `wrk`).
#
#   scripts/loadtest.sh                    # build, seed (once), serve, load, print a table
#
# What it does:
#   1. builds `gigapath` and the seeding example (`cargo build --release`), installs wrk if missing;
#   2. seeds a data dir (once; reused while its marker file is there) the way a user would:
#      `models init --preset tiny`, `synth cohort` (3 subtypes x 4 slides), `ingest`, a short
#      `train`, `reembed`; then services/api/examples/loadtest_seed.rs adds synthetic slides (one
#      report each) around the real ones through the store API and the catalog, up to
#      $LOADTEST_SLIDES slides in all, and builds the search indexes;
#   3. starts `gigapath serve` on 127.0.0.1:$LOADTEST_PORT and checks one request per endpoint;
#   4. runs `wrk -t$THREADS -c$CONNS -d$DURATION --latency -s <lua>` per endpoint (POST bodies
#      from a small Lua script: search queries rotate over 24 phrasings, so every request runs
#      the text encoder; zero-shot asks for 8 random stored slides against the cached `rcc` set);
#   5. prints one table row per endpoint: requests/s, p50, p99, non-2xx responses, socket errors.
#
# Text encoder: all-MiniLM-L6-v2 from models/weights/ when scripts/setup.sh fetched it (what the
# demo serves), else the small BERT test fixture (then say so when you quote the numbers).
#
# Environment (defaults): SKIP_BUILD=1 (use the binaries already in target/release), LOADTEST_DIR (target/loadtest), LOADTEST_SLIDES (10000),
# LOADTEST_DURATION (20s), LOADTEST_CONNECTIONS (16), LOADTEST_THREADS (2), LOADTEST_PORT (18080),
# LOADTEST_RESEED=1 to rebuild the data dir. Raw wrk output goes to $LOADTEST_DIR/results/.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${LOADTEST_DIR:-$ROOT/target/loadtest}
SLIDES=${LOADTEST_SLIDES:-10000}
DURATION=${LOADTEST_DURATION:-20s}
CONNS=${LOADTEST_CONNECTIONS:-16}
THREADS=${LOADTEST_THREADS:-2}
PORT=${LOADTEST_PORT:-18080}
URL="http://127.0.0.1:$PORT"
BIN="$ROOT/target/release/gigapath"
SEED_BIN="$ROOT/target/release/examples/loadtest_seed"
MARKER="$DIR/seeded-$SLIDES"

log() { printf '[loadtest] %s\n' "$*" >&2; }

# ---- 1. build ------------------------------------------------------------------------------
if ! command -v wrk >/dev/null; then
    log "installing wrk"
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get install -y wrk >/dev/null || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y wrk >/dev/null; }
fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "building (release)"
    (cd "$ROOT" && cargo build --release -q -p gigapath --bin gigapath \
        && cargo build --release -q -p gigapath-api --example loadtest_seed)
fi

MINILM="$ROOT/models/weights/all-MiniLM-L6-v2"
if [ -f "$MINILM/model.safetensors" ]; then
    TEXT_ENCODER=$MINILM TEXT_POOL=mean
else
    TEXT_ENCODER="$ROOT/tests/fixtures/reference/text_bert_mlm" TEXT_POOL=cls
    log "MiniLM not in models/weights (scripts/setup.sh fetches it): using the small BERT fixture"
fi

# ---- 2. seed -------------------------------------------------------------------------------
if [ "${LOADTEST_RESEED:-0}" = 1 ] || [ ! -f "$MARKER" ]; then
    log "seeding $DIR ($SLIDES slides)"
    rm -rf "$DIR"
    mkdir -p "$DIR"
    G() { GIGAPATH_LOG=warn "$BIN" "$@"; }
    G models init -o "$DIR/models" --preset tiny >/dev/null
    G synth cohort -o "$DIR/cohort" --slides-per-subtype 4 --slide-um 600 >/dev/null
    cat >"$DIR/gigapath.toml" <<EOF
[models]
tile_encoder = "$DIR/models/tile"
slide_encoder = "$DIR/models/slide"
text_encoder = "$TEXT_ENCODER"
text_pool = "$TEXT_POOL"

[serve]
prompts_dir = "$ROOT/prompts"
EOF
    cat >"$DIR/run.toml" <<EOF
[model]
text_pool = "$TEXT_POOL"
[optim]
steps = 60
batch_size = 4
warmup_steps = 5
lr = 0.001
[checkpoint]
every_steps = 60
[eval]
every_steps = 0
EOF
    G ingest --data-dir "$DIR/data" --config "$DIR/gigapath.toml" \
        --reports "$DIR/cohort/reports.jsonl" "$DIR/cohort/slides" >/dev/null
    G train --data-dir "$DIR/data" --config "$DIR/run.toml" --run-id loadtest --json >/dev/null
    G reembed --data-dir "$DIR/data" --alignment "$DIR/data/alignment/loadtest" >/dev/null
    GIGAPATH_LOG=warn "$SEED_BIN" --data-dir "$DIR/data" --slides "$SLIDES" >"$DIR/seed.json"
    log "seeded: $(cat "$DIR/seed.json")"
    touch "$MARKER"
fi

# ---- 3. serve ------------------------------------------------------------------------------
mkdir -p "$DIR/results" "$DIR/lua"
GIGAPATH_LOG=warn "$BIN" serve --data-dir "$DIR/data" --bind "127.0.0.1:$PORT" >"$DIR/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    curl -fsS "$URL/readyz" >/dev/null 2>&1 && break
    kill -0 $SERVER 2>/dev/null || { cat "$DIR/serve.log" >&2; exit 1; }
    sleep 0.5
done
curl -fsS "$URL/readyz" >/dev/null || { log "the service did not become ready"; cat "$DIR/serve.log" >&2; exit 1; }
POINTS=$(curl -fsS "$URL/v1/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["points"]["slides"])')
log "serving $POINTS slide points at $URL"

# ---- 4. load -------------------------------------------------------------------------------
# Shared Lua: POST JSON, rotate over a list of queries.
QUERIES='"clear cell renal cell carcinoma", "papillary renal cell carcinoma with foamy macrophages",
  "chromophobe renal cell carcinoma with perinuclear halos", "renal cell carcinoma, clear cell type",
  "an H&E image of papillary RCC", "tumor with fibrovascular cores", "solid sheets of pale eosinophilic cells",
  "nests of clear cells in a delicate capillary network", "high grade renal tumour with necrosis",
  "kidney, radical nephrectomy, carcinoma", "plant-like cell borders and raisinoid nuclei",
  "WHO/ISUP grade 2 renal carcinoma", "chromophobe RCC", "clear cell RCC with hemorrhage",
  "papillary architecture with psammoma bodies", "renal cell carcinoma of the chromophobe type",
  "eosinophilic variant renal tumour", "tumour cells with abundant clear cytoplasm",
  "sarcomatoid differentiation in a renal carcinoma", "type 2 papillary renal cell carcinoma",
  "an image of clear cell renal cell carcinoma", "dark crowded fronds on pale stroma",
  "pink solid sheets separated by septa", "renal parenchyma with carcinoma"'
for endpoint in slides reports; do
    cat >"$DIR/lua/search_$endpoint.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local q = { $QUERIES }
local i = 0
request = function()
  i = i + 1
  return wrk.format(nil, "/v1/search/$endpoint", nil, '{"query": "' .. q[(i % #q) + 1] .. '", "k": 10}')
end
EOF
done
SYNTH=$((SLIDES - 12))
cat >"$DIR/lua/zero_shot.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = $SYNTH
request = function()
  local ids = {}
  for j = 1, 8 do ids[j] = string.format('"LOAD-%05d"', math.random(0, n - 1)) end
  return wrk.format(nil, "/v1/zero-shot/subtype", nil,
    '{"slide_ids": [' .. table.concat(ids, ",") .. '], "prompt_set": "rcc"}')
end
EOF

check() { # one request per endpoint first: a 200, and the prompt set's cache warmed
    local path=$1 body=$2 code
    code=$(curl -sS -o "$DIR/results/check.json" -w '%{http_code}' -H 'Content-Type: application/json' -d "$body" "$URL$path")
    [ "$code" = 200 ] || { log "$path answered $code: $(cat "$DIR/results/check.json")"; exit 1; }
}
check /v1/search/slides '{"query": "clear cell renal cell carcinoma", "k": 10}'
check /v1/search/reports '{"query": "clear cell renal cell carcinoma", "k": 10}'
check /v1/zero-shot/subtype '{"slide_ids": ["LOAD-00000"], "prompt_set": "rcc"}'

# wrk prints latencies as 1.23ms / 456.00us / 1.02s: convert to ms.
to_ms() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /m$/) n *= 60000; else if (v ~ /s$/) n *= 1000; printf "%.2f", n }'; }

declare -A ENDPOINT=([search_slides]=/v1/search/slides [search_reports]=/v1/search/reports [zero_shot]=/v1/zero-shot/subtype)
ROWS=()
for name in search_slides search_reports zero_shot; do
    out="$DIR/results/$name.txt"
    log "wrk -t$THREADS -c$CONNS -d$DURATION --latency -s $DIR/lua/$name.lua $URL"
    wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$DIR/lua/$name.lua" "$URL" >"$out"
    rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
    p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$out")")
    p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")")
    total=$(awk '/requests in/ { print $1 }' "$out")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$out")
    sock=$(awk '/Socket errors:/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' "$out")
    ROWS+=("$(printf '| %-27s | %9s | %9s | %9s | %9s | %7s | %8s |' \
        "POST ${ENDPOINT[$name]}" "$total" "$rps" "$p50" "$p99" "${non2xx:-0}" "${sock:-0}")")
done

echo
echo "$POINTS stored slides; wrk -t$THREADS -c$CONNS -d$DURATION --latency; $(nproc) CPUs; text encoder $(basename "$TEXT_ENCODER")"
echo
printf '| %-27s | %9s | %9s | %9s | %9s | %7s | %8s |\n' endpoint requests 'req/s' 'p50 ms' 'p99 ms' non-2xx 'sock err'
printf '|%s|%s|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..29})" "$(printf -- '-%.0s' {1..11})" "$(printf -- '-%.0s' {1..11})" \
    "$(printf -- '-%.0s' {1..11})" "$(printf -- '-%.0s' {1..11})" "$(printf -- '-%.0s' {1..9})" "$(printf -- '-%.0s' {1..10})"
printf '%s\n' "${ROWS[@]}"
