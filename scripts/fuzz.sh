#!/usr/bin/env bash
# Fuzzes every parser of outside bytes with cargo-fuzz (libFuzzer); see docs/FUZZING.md.
#
#   scripts/fuzz.sh                  short run: each target 15 s, one after the other (~1 min)
#   scripts/fuzz.sh --long           each target 30 min (-max_total_time=1800), two at a time
#   scripts/fuzz.sh [--long] NAME..  only these targets (slide_metadata files text_inputs api_bodies)
#
# Environment: FUZZ_SECONDS (per target; overrides both modes), FUZZ_JOBS (targets at once;
# 1 short, 2 long), FUZZ_TARGET_DIR (build folder, default fuzz/target: never the shared
# CARGO_TARGET_DIR, the instrumented build would replace its artefacts), FUZZ_SANITIZER (none).
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). The first build
# compiles the whole dependency tree instrumented (tens of minutes on 2 cores); later ones only
# what changed. The fuzz crate is outside the workspace: `cargo test --workspace` stays stable.
#
# Each target's working corpus is fuzz/corpus/NAME (ignored by git), merged with the committed
# seeds in fuzz/seeds/NAME (read, never written); logs go to fuzz/logs/NAME.log, crashing inputs
# to fuzz/artifacts/NAME/. Exit status 1 when any target found a crash, a timeout (-timeout=10)
# or an allocation over the caps (-rss_limit_mb=2048; one allocation over 256 MiB aborts, see
# fuzz/src/lib.rs). Reproduce one with
#   fuzz/target/x86_64-unknown-linux-gnu/release/NAME fuzz/artifacts/NAME/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."

ALL=(slide_metadata files text_inputs api_bodies)
long=0
targets=()
for arg in "$@"; do
    case "$arg" in
        --long) long=1 ;;
        -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "fuzz.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) targets+=("$arg") ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL[@]}")
for t in "${targets[@]}"; do
    [[ " ${ALL[*]} " == *" $t "* ]] || { echo "fuzz.sh: no target $t (${ALL[*]})" >&2; exit 2; }
done
if [ "$long" = 1 ]; then
    seconds=${FUZZ_SECONDS:-1800}
    jobs=${FUZZ_JOBS:-2}
else
    seconds=${FUZZ_SECONDS:-15}
    jobs=${FUZZ_JOBS:-1}
fi
target_dir=${FUZZ_TARGET_DIR:-fuzz/target}
sanitizer=${FUZZ_SANITIZER:-none}

command -v cargo-fuzz > /dev/null || {
    echo "fuzz.sh: cargo-fuzz is missing: cargo install cargo-fuzz" >&2
    exit 2
}
rustup run nightly rustc --version > /dev/null 2>&1 || {
    echo "fuzz.sh: the nightly toolchain is missing: rustup toolchain install nightly" >&2
    exit 2
}
host=$(rustup run nightly rustc -vV | sed -n 's/^host: //p')

# -a: debug assertions (overflow checks) in every crate, as in the stable test builds.
for t in "${targets[@]}"; do
    echo "fuzz.sh: building $t ($sanitizer sanitizer, $target_dir)" >&2
    env -u CARGO_TARGET_DIR cargo +nightly fuzz build -s "$sanitizer" -a --target-dir "$target_dir" "$t"
done

mkdir -p fuzz/logs
run_one() {
    local t=$1
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    "$target_dir/$host/release/$t" "fuzz/corpus/$t" "fuzz/seeds/$t" \
        -artifact_prefix="fuzz/artifacts/$t/" -max_total_time="$seconds" \
        -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 > "fuzz/logs/$t.log" 2>&1
}

echo "fuzz.sh: ${targets[*]}: $seconds s each, $jobs at a time" >&2
declare -A pids=()
failed=()
for t in "${targets[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
    run_one "$t" &
    pids[$t]=$!
done
for t in "${targets[@]}"; do
    if ! wait "${pids[$t]}"; then failed+=("$t"); fi
done

printf '%-15s %12s %8s %6s %7s %10s %s\n' target executions exec/s cov ft corpus result
for t in "${targets[@]}"; do
    log=fuzz/logs/$t.log
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<< "$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<< "$last")
    corp=$(sed -n 's/.* corp: \([^ ]*\).*/\1/p' <<< "$last")
    result=ok
    [[ " ${failed[*]:-} " == *" $t "* ]] && result="FAILED: $(ls fuzz/artifacts/$t | tail -n 1) (see $log)"
    printf '%-15s %12s %8s %6s %7s %10s %s\n' "$t" "${runs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result"
done
[ ${#failed[@]} -eq 0 ]
