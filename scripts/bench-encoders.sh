#!/usr/bin/env bash
# Encoder benchmarks, candle next to PyTorch + timm, in one command. Prints markdown tables.
#
#   scripts/bench-encoders.sh [--batch 16] [--iters 3] [--slide-tiles 10000,50000] [--skip-tile]
#
# Needs python3 with torch, timm and safetensors: uses .venv-bench/ (gitignored) if present, else
# creates it with `pip install torch timm safetensors` (several GB: PyPI's torch wheel pulls CUDA).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

venv="$root/.venv-bench"
if ! "$venv/bin/python" -c "import torch, timm, safetensors" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet torch timm safetensors
fi

cargo build --release --quiet -p gigapath-models --example bench_encoders
bin="${CARGO_TARGET_DIR:-$root/target}/release/examples/bench_encoders"
"$venv/bin/python" scripts/bench_encoders.py --bin "$bin" "$@"
