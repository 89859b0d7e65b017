#!/usr/bin/env bash
# Set up a fresh Debian / Ubuntu machine for gigapath: the system libraries the build links
# (OpenSlide, libclang for bindgen, pkg-config), Python's pip (to fetch the offline text model),
# Debian's Chromium + Node.js with Playwright (tests/browser, for the web page's browser test),
# then the offline text encoder all-MiniLM-L6-v2 into models/weights/.
# Safe to re-run: installs only what is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

packages=(libopenslide-dev libclang-dev pkg-config ca-certificates)
command -v python3 >/dev/null 2>&1 || packages+=(python3)
# The browser test drives the web page in Debian's chromium through playwright-core (npm).
packages+=(chromium)
command -v node >/dev/null 2>&1 || packages+=(nodejs)
command -v npm >/dev/null 2>&1 || packages+=(npm)
python3 -m pip --version >/dev/null 2>&1 || packages+=(python3-pip)

missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    sudo_cmd=()
    [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found. Install Rust (https://rustup.rs), then re-run this script." >&2
    exit 1
fi

if [[ ! -f tests/browser/node_modules/.package-lock.json ||
      tests/browser/package-lock.json -nt tests/browser/node_modules/.package-lock.json ]]; then
    echo "setup: installing playwright-core for the browser test (tests/browser)"
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi

scripts/fetch-minilm.sh
echo "setup: done"
