#!/usr/bin/env python3
"""Encoder benchmarks: gigapath (candle) next to PyTorch + timm on this machine's CPU.

Tile encoder: the Prov-GigaPath architecture (timm vit_giant_patch14_dinov2 at 224 px / patch 16,
packed SwiGLU, LayerScale) at two sizes, same random weights and same input batch on both sides;
reports tiles/s, the candle/PyTorch ratio and the relative difference of the embeddings.
Slide encoder: the full-size LongNet (768-d, 12 layers, 16 heads) with random weights at N tiles,
each N in its own process: wall time and peak RSS. (The reference slide encoder needs flash-attn
on CUDA, so there is no PyTorch CPU column for it.)

Run through scripts/bench-encoders.sh, which builds the Rust side first.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import timm
from safetensors.torch import load_file, save_file

TILE_CONFIGS = [
    ("ViT-S size (D=384, 12 blocks, 6 heads)", dict(embed_dim=384, depth=12, num_heads=6)),
    ("giant, 2 blocks (D=1536, 24 heads)", dict(embed_dim=1536, depth=2, num_heads=24)),
]
MODEL_ARGS = dict(img_size=224, in_chans=3, patch_size=16, init_values=1e-5, mlp_ratio=5.33334, num_classes=0)


def tile_folder(path, size_args):
    """A timm model folder as the release ships it (config.json + model.safetensors)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_giant_patch14_dinov2", pretrained=False, **MODEL_ARGS, **size_args).eval()
    # Move LayerScale away from 1e-5 so every block matters to the output.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.0)
    os.makedirs(path, exist_ok=True)
    config = {
        "architecture": "vit_giant_patch14_dinov2",
        "num_classes": 0,
        "num_features": size_args["embed_dim"],
        "global_pool": "token",
        "model_args": {**MODEL_ARGS, **size_args},
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, "model.safetensors"))
    return model


def time_torch(model, x, iters):
    with torch.inference_mode():
        out = model(x)  # warm-up
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    times.sort()
    return out, times[len(times) // 2]


def torch_ops(b, d, heads, hidden, iters=5):
    """One giant block op by op in PyTorch, as timm runs it (SDPA for attention)."""
    import torch.nn.functional as F
    n, dh = 197, d // heads
    r = lambda *s: torch.randn(*s) * 0.02
    x = r(b, n, d)
    w_ln, b_ln = torch.ones(d), torch.zeros(d)
    (wq, bq), (wp, bp), (w1, b1), (w2, b2) = [(r(o, i), r(o)) for i, o in [(d, 3 * d), (d, d), (d, hidden), (hidden // 2, d)]]
    gamma = r(d)
    with torch.inference_mode():
        qkv = F.linear(x, wq, bq)
        h = F.linear(x, w1, b1)

        def attention():
            q, k, v = qkv.reshape(b, n, 3, heads, dh).permute(2, 0, 3, 1, 4).unbind(0)
            o = F.scaled_dot_product_attention(q, k, v)
            return o.transpose(1, 2).reshape(b, n, d)

        def swiglu():
            x1, x2 = h.chunk(2, dim=-1)
            return F.silu(x1) * x2

        gated = swiglu()
        ops = {
            "layer_norm": lambda: F.layer_norm(x, (d,), w_ln, b_ln, 1e-6),
            "qkv linear": lambda: F.linear(x, wq, bq),
            "attention": attention,
            "proj linear": lambda: F.linear(x, wp, bp),
            "layer scale + residual": lambda: x + x * gamma,
            "fc1 linear": lambda: F.linear(x, w1, b1),
            "SwiGLU gate": swiglu,
            "fc2 linear": lambda: F.linear(gated, w2, b2),
        }
        out = {}
        for name, f in ops.items():
            f()
            times = []
            for _ in range(iters):
                t = time.perf_counter()
                f()
                times.append(time.perf_counter() - t)
            out[name] = sorted(times)[len(times) // 2]
    return out


def op_table(bin_path, batch):
    d, heads, hidden = 1536, 24, 8192
    cand, _ = run_json([bin_path, "ops", "--batch", str(batch), "--dim", str(d), "--heads", str(heads),
                        "--hidden", str(hidden)])
    tor = torch_ops(batch, d, heads, hidden)
    print(f"One giant block op by op (batch {batch}, 197 tokens, D={d}, 24 heads, SwiGLU hidden {hidden}), median ms")
    print("| op | PyTorch ms | candle ms | candle / PyTorch time |")
    print("| --- | ---: | ---: | ---: |")
    tot_t = tot_c = 0.0
    for group in tor:
        c = cand[group] * 1e3
        t = tor[group] * 1e3
        tot_t += t
        tot_c += c
        print(f"| {group} | {t:.1f} | {c:.1f} | {c / t:.2f} |")
    print(f"| **block total** | {tot_t:.1f} | {tot_c:.1f} | {tot_c / tot_t:.2f} |")
    print()


def run_json(cmd):
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1]), res.stderr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="the bench_encoders example binary")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--slide-tiles", default="10000,50000")
    ap.add_argument("--skip-tile", action="store_true")
    ap.add_argument("--skip-ops", action="store_true")
    args = ap.parse_args()
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    print(f"machine: {threads} CPU threads; torch {torch.__version__} ({torch.get_num_threads()} threads), timm {timm.__version__}")
    print(f"candle: RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'default (all cores)')}")
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other processes share these cores: compare ratios, not absolutes)\n")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_tile:
            torch.manual_seed(1)
            x = torch.randn(args.batch, 3, 224, 224)
            inp = os.path.join(tmp, "pixels.safetensors")
            save_file({"pixel_values": x}, inp)
            for i, (label, size_args) in enumerate(TILE_CONFIGS):
                folder = os.path.join(tmp, f"tile{i}")
                model = tile_folder(folder, size_args)
                ref, t_torch = time_torch(model, x, args.iters)
                out_path = os.path.join(tmp, f"out{i}.safetensors")
                res, _ = run_json([args.bin, "tile", "--model", folder, "--input", inp,
                                   "--iters", str(args.iters), "--output", out_path])
                got = load_file(out_path)["embedding"]
                rel = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
                rows.append((label, args.batch / t_torch, res["tiles_per_s"], rel))

    if rows:
        print(f"Tile encoder, CPU f32, batch {args.batch}, median of {args.iters} runs")
        print("| config | PyTorch tiles/s | candle tiles/s | candle / PyTorch | rel. diff of embeddings |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for label, tp, tc, rel in rows:
            print(f"| {label} | {tp:.2f} | {tc:.2f} | {tc / tp:.2f} | {rel:.1e} |")
        print()

    if not args.skip_ops:
        op_table(args.bin, args.batch)

    slide_ns = [int(n) for n in args.slide_tiles.split(",") if n]
    if slide_ns:
        print("Slide encoder, full size (768-d, 12 layers, 16 heads, 5 dilated branches), random weights, CPU f32")
        print("| tiles | wall time (s) | CPU time, user + sys (s) | peak RSS (MiB) |")
        print("| ---: | ---: | ---: | ---: |")
        for n in slide_ns:
            res, stderr = run_json(["/usr/bin/time", "-v", args.bin, "slide", "--tiles", str(n)])
            m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
            rss = int(m.group(1)) / 1024 if m else res["peak_rss_mib"]
            cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", stderr))
            print(f"| {n} | {res['seconds']:.1f} | {cpu:.1f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
