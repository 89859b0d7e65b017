#!/usr/bin/env python3
"""The GPU check, in one command on a lent GPU machine (run through scripts/gpu-check.sh).

1. `ldd` of the candle binary: every library found (CUDA 13 from the toolkit or torch's wheels).
2. The fused CUDA kernels (flash attention, dilated attention, LayerNorm, SwiGLU, cuBLASLt linear)
   against candle's plain f32 ops on the same inputs, bf16 and f16 (<= 2e-2 relative); then
   parity on the reference fixtures on CUDA, f32 (<= 1e-5 relative) and bf16 (<= 1e-2).
3. Tile encoder at the full ViT-g config (random weights, bf16): candle and PyTorch + timm,
   batches 128 and 256, tiles/s.
4. Slide encoder at the full config (random weights, bf16) at 10,000 / 50,000 / 100,000 tiles:
   candle and a PyTorch implementation of the same dilated attention (scripts/gpu_torch_ref.py:
   flash-attn when importable, else PyTorch's fused SDPA kernels that return the log-sum-exp).
Every case runs in its own process (so peak memory is that case's alone) under a timeout; peak GPU
memory is sampled from nvidia-smi for the process (CUDA context included, both sides alike), and
PyTorch's own allocator peak is printed too. The table comes last.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def gpu_mem_sampler(pid, stop, out):
    """Peak used GPU memory (MiB) of `pid` and its children, from nvidia-smi every 0.1 s."""
    peak = 0
    while not stop.is_set():
        try:
            res = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=5,
            )
            for line in res.stdout.splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
                    peak = max(peak, int(parts[1]))
        except Exception:
            pass
        stop.wait(0.1)
    out.append(peak)


def run_case(cmd, timeout):
    """Runs one case; returns (parsed last JSON line or None, seconds, peak GPU MiB, error)."""
    log("$ " + " ".join(cmd))
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop, peak = threading.Event(), []
    sampler = threading.Thread(target=gpu_mem_sampler, args=(proc.pid, stop, peak), daemon=True)
    sampler.start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        err = None if proc.returncode == 0 else f"exit {proc.returncode}: {stderr.strip()[-600:]}"
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        err = f"timeout after {timeout} s"
    stop.set()
    sampler.join()
    wall = time.time() - t0
    result = None
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                result = json.loads(line)
                break
            except json.JSONDecodeError:
                pass
    if err:
        log(f"  FAILED ({err})")
    else:
        log(f"  {json.dumps(result)}  [{wall:.1f} s, peak {peak[0] if peak else 0} MiB]")
    return result, wall, (peak[0] if peak else None), err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="bench_encoders built with --features cuda")
    ap.add_argument("--fixtures", default=os.path.join(ROOT, "tests/fixtures/reference"))
    ap.add_argument("--tile-batches", default="128,256")
    ap.add_argument("--slide-tiles", default="10000,50000,100000")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--timeout", type=int, default=120, help="seconds per case")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script's plumbing")
    ap.add_argument("--tile-depth", type=int, default=40, help="tile encoder blocks (40: ViT-g)")
    args = ap.parse_args()
    py = sys.executable
    ref = os.path.join(ROOT, "scripts", "gpu_torch_ref.py")
    failures = []

    # 1. Libraries.
    ldd = subprocess.run(["ldd", args.bin], capture_output=True, text=True).stdout
    log(ldd)
    missing = [l.strip() for l in ldd.splitlines() if "not found" in l]
    if missing:
        failures.append("ldd: " + "; ".join(missing))
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        smi = "no nvidia-smi (CPU dry run)"
    log("GPU: " + smi)

    # 2. Fused kernels, then parity.
    kernels = {}
    for dtype in ("bf16", "f16"):
        res, _, _, err = run_case([args.bin, "kernels", "--device", args.device, "--dtype", dtype],
                                  args.timeout)
        if err or res is None:
            failures.append(f"kernels {dtype}: {err}")
        if res:
            kernels[dtype] = res["outputs"]
    parity = {}
    for dtype, bound in (("f32", 1e-5), ("bf16", 1e-2)):
        res, _, _, err = run_case([args.bin, "parity", "--fixtures", args.fixtures, "--device", args.device,
                                   "--dtype", dtype], args.timeout)
        if err or res is None:
            failures.append(f"parity {dtype}: {err}")
            continue
        parity[dtype] = res["outputs"]
        for name, e in res["outputs"].items():
            if not e["rel_err"] <= bound:
                failures.append(f"parity {dtype} {name}: rel_err {e['rel_err']:.2e} > {bound:.0e}")

    # 3. Tile encoder.
    tile_rows = []
    for batch in [int(b) for b in args.tile_batches.split(",") if b]:
        c, _, c_mem, c_err = run_case([args.bin, "tile", "--random", "--batch", str(batch), "--device", args.device,
                                       "--dtype", args.dtype, "--iters", str(args.iters),
                                       "--depth", str(args.tile_depth)], args.timeout)
        t, t_mem, t_err = None, None, None
        if not args.skip_torch:
            t, _, t_mem, t_err = run_case([py, ref, "tile", "--batch", str(batch), "--dtype", args.dtype,
                                           "--device", args.device, "--iters", str(args.iters),
                                           "--depth", str(args.tile_depth)], args.timeout)
        tile_rows.append((batch, c, c_mem, c_err, t, t_mem, t_err))
        if c_err:
            failures.append(f"tile batch {batch}: {c_err}")

    # 4. Slide encoder.
    slide_rows = []
    for n in [int(x) for x in args.slide_tiles.split(",") if x]:
        c, _, c_mem, c_err = run_case([args.bin, "slide", "--tiles", str(n), "--device", args.device,
                                       "--dtype", args.dtype], args.timeout)
        t, t_mem, t_err = None, None, None
        if not args.skip_torch:
            t, _, t_mem, t_err = run_case([py, ref, "slide", "--tiles", str(n), "--dtype", args.dtype,
                                           "--device", args.device], args.timeout)
        slide_rows.append((n, c, c_mem, c_err, t, t_mem, t_err))
        if c_err:
            failures.append(f"slide {n}: {c_err}")

    # The table, last.
    f = lambda x, spec: "-" if x is None else format(x, spec)
    print(f"\n## GPU check on {smi}\n")
    print("### Parity on the reference fixtures (CUDA)\n")
    print("| output | f32 rel err | f32 max abs | bf16 rel err | bf16 max abs |")
    print("| --- | --- | --- | --- | --- |")
    names = sorted(set().union(*[set(v) for v in parity.values()])) if parity else []
    for name in names:
        cells = []
        for dtype in ("f32", "bf16"):
            e = parity.get(dtype, {}).get(name)
            cells += [f(e and e["rel_err"], ".2e"), f(e and e["max_abs"], ".2e")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if kernels:
        print("\n### Fused CUDA kernels vs candle's f32 ops on the same inputs (relative error)\n")
        print("| case | bf16 | f16 |")
        print("| --- | --- | --- |")
        for name in sorted(set().union(*[set(v) for v in kernels.values()])):
            cells = [f(kernels.get(d, {}).get(name, {}).get("rel_err"), ".2e") for d in ("bf16", "f16")]
            print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n### Tile encoder, ViT-g (1536-d, {args.tile_depth} blocks), random weights, {args.dtype}\n")
    print("| batch | candle tiles/s | PyTorch tiles/s | ratio | candle peak MiB | PyTorch peak MiB (allocator) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for batch, c, c_mem, c_err, t, t_mem, t_err in tile_rows:
        cr = c and c.get("tiles_per_s")
        tr = t and t.get("tiles_per_s")
        ratio = cr / tr if cr and tr else None
        alloc = t and t.get("peak_mem_mib")
        print(f"| {batch} | {f(cr, '.1f') if not c_err else c_err} | {f(tr, '.1f') if not t_err else t_err} | "
              f"{f(ratio, '.2f')}x | {f(c_mem, 'd')} | {f(t_mem, 'd')} ({f(alloc, '.0f')}) |")
    attn = next((t.get("attention") for *_, t, _, _ in slide_rows if t), None)
    print(f"\n### Slide encoder, LongNet 768-d x 12 layers, random weights, {args.dtype} "
          f"(PyTorch attention kernel: {attn})\n")
    print("| tiles | candle ms | PyTorch ms | ratio (PyTorch / candle time) | candle peak MiB | PyTorch peak MiB (allocator) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, c, c_mem, c_err, t, t_mem, t_err in slide_rows:
        cs = c and c.get("seconds")
        ts = t and t.get("seconds")
        ratio = ts / cs if cs and ts else None
        alloc = t and t.get("peak_mem_mib")
        print(f"| {n} | {f(cs and cs * 1e3, '.0f') if not c_err else c_err} | "
              f"{f(ts and ts * 1e3, '.0f') if not t_err else t_err} | {f(ratio, '.2f')}x | "
              f"{f(c_mem, 'd')} | {f(t_mem, 'd')} ({f(alloc, '.0f')}) |")
    print("\nPeak MiB: nvidia-smi per-process samples every 0.1 s (CUDA context included).")
    if failures:
        print("\nFAILURES:\n- " + "\n- ".join(failures))
        sys.exit(1)
    print("\nall checks passed")


if __name__ == "__main__":
    main()
