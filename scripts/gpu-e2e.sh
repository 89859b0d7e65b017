#!/usr/bin/env bash
# The product binary (gigapath, --features cuda) on the GPU: encode commands in bf16 against the
# fixtures (relative error printed), then a small synthetic cohort ingested on CUDA in bf16.
# Run from the repo root on the GPU machine after `scripts/build-gpu-carry.sh --cli` here.
set -uo pipefail
pylib=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH="$PWD/gpu-carry/lib:/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib:${pylib}:${LD_LIBRARY_PATH:-}"
cd gpu-carry && tar xJf lib.tar.xz && xz -dkf gigapath.xz && chmod +x gigapath && cd ..
G=$PWD/gpu-carry/gigapath
F=tests/fixtures/reference
W=$(mktemp -d)
ldd $G | grep -E "not found|cuda|cublas" 
$G encode tile --model $F/tile_encoder --input $F/tile_encoder/inputs.safetensors --output $W/tile.safetensors --device cuda --dtype bf16
$G encode slide --model $F/slide_encoder --input $F/slide_encoder/inputs.safetensors --output $W/slide.safetensors --device cuda --dtype bf16
python3 - "$W" <<'PY'
import sys, torch
from safetensors.torch import load_file
w = sys.argv[1]
for name, exp, key in [("tile", "tests/fixtures/reference/tile_encoder/expected.safetensors", "cls"),
                       ("slide", "tests/fixtures/reference/slide_encoder/expected.safetensors", "cls")]:
    got = load_file(f"{w}/{name}.safetensors")["embedding"].double()
    ref = load_file(exp)[key].double()
    print(f"gigapath encode {name} (cuda bf16) vs reference {key}: rel err {((got-ref).norm()/ref.norm()).item():.2e}")
PY
$G synth cohort -o $W/cohort --slides-per-subtype 2 --slide-um 2000 --log warn >/dev/null
$G models init -o $W/models --preset small --log warn >/dev/null
printf '[models]\ntile_encoder = "%s"\nslide_encoder = "%s"\ntext_encoder = "%s"\ntext_pool = "cls"\ndevice = "cuda"\ndtype = "bf16"\n' \
  $W/models/tile $W/models/slide $PWD/$F/text_bert_mlm > $W/g.toml
$G ingest --data-dir $W/data --config $W/g.toml --reports $W/cohort/reports.jsonl $W/cohort/slides --log warn
$G status --data-dir $W/data --json
