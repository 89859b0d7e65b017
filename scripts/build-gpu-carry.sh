#!/usr/bin/env bash
# Builds what the GPU checks run on a lent GPU machine and packs it into gpu-carry/ (gitignored;
# name it in the device call's `carry`, 64 MiB at most):
#   gpu-carry/bench_encoders.xz   models' bench example, `cuda` feature   (scripts/gpu-check.sh)
#   gpu-carry/gigapath.xz         the gigapath binary, `cuda` feature     (scripts/gpu-e2e.sh, --cli)
#   gpu-carry/lib.tar.xz          libopenslide and its libraries, which GPU machines lack (--cli)
#
#   scripts/build-gpu-carry.sh [--cli]
#
# Needs a CUDA toolkit: CUDA_HOME set (README "GPU": the PyPI CUDA 13 recipe works without a GPU).
# Builds into target-cuda/ (CARGO_TARGET_DIR_CUDA) so the CPU target dir is not rebuilt. First
# build: ~15 min on 2 cores for the bench example (candle's kernels), ~40 min more for --cli.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
: "${CUDA_HOME:?set CUDA_HOME to a CUDA 12.x / 13.0 toolkit (see README, GPU)}"
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR_CUDA:-$root/target-cuda}"
mkdir -p gpu-carry

pack() { # pack BIN NAME
    cp "$1" "gpu-carry/$2"
    strip "gpu-carry/$2"
    xz -T0 -6 -f "gpu-carry/$2"
}

cargo build --release -p gigapath-models --features cuda --example bench_encoders
pack "$CARGO_TARGET_DIR/release/examples/bench_encoders" bench_encoders

if [[ "${1:-}" == "--cli" ]]; then
    cargo build --release -p gigapath --features cuda
    pack "$CARGO_TARGET_DIR/release/gigapath" gigapath
    lib=$(ldconfig -p | awk '/libopenslide.so.0 /{print $NF; exit}')
    rm -rf gpu-carry/lib && mkdir gpu-carry/lib
    cp -L "$lib" gpu-carry/lib/
    ldd "$lib" | awk '/=>/{print $3}' |
        grep -vE '/(libc|libm|libpthread|libdl|librt)\.so|ld-linux' |
        xargs -r -I{} cp -L {} gpu-carry/lib/
    tar -C gpu-carry -cJf gpu-carry/lib.tar.xz lib && rm -rf gpu-carry/lib
fi
du -sh gpu-carry/* && echo "gpu-carry: ready (carry it: [\"gpu-carry\"])"
