#!/usr/bin/env bash
# The GPU check (issue #7) in ONE command on a machine with an NVIDIA GPU, CUDA 13 libraries
# (toolkit or PyTorch's pip wheels) and python3 with torch + timm:
#
#   scripts/gpu-check.sh [BENCH_BIN] [gpu_check.py options...]
#
# BENCH_BIN is models' `bench_encoders` example built with the `cuda` feature (see the README,
# "GPU"); default: gpu-carry/bench_encoders, unpacked from gpu-carry/bench_encoders.xz if needed.
# Prints ldd, fixture parity in f32 and bf16, tile / slide encoder timings next to PyTorch on the
# same GPU, and a markdown table last. Exits non-zero when a check fails.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${1:-$root/gpu-carry/bench_encoders}"
[ $# -gt 0 ] && shift
if [ ! -x "$bin" ] && [ -f "$bin.xz" ]; then
    xz -dkf "$bin.xz" && chmod +x "$bin"
fi
# CUDA 13 libraries: the toolkit's, or the ones PyTorch's wheels bring (nvidia/cu13/lib).
pylib=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib:${pylib}:${LD_LIBRARY_PATH:-}"
export CUDA_CACHE_MAXSIZE=1073741824   # keep candle's PTX JIT results between the cases
exec python3 "$root/scripts/gpu_check.py" --bin "$bin" "$@"
