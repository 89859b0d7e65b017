#!/usr/bin/env python3
"""PyTorch side of the gigapath GPU benchmark (Prov-GigaPath tile + slide encoders, random weights).

Self-contained: needs only torch, timm (tile subcommand) and safetensors (selftest). flash-attn is used
when importable, never required. Every subcommand prints exactly ONE JSON line on stdout; logs go to
stderr.

Subcommands
-----------
tile      The full Prov-GigaPath tile encoder (timm `vit_giant_patch14_dinov2` at 224 px / patch 16:
          D=1536, 40 blocks, 24 heads, packed SwiGLU, LayerScale) with random weights, cast to --dtype,
          eval + inference_mode, input randn [B,3,224,224]. One warm-up, then the median of --iters
          timed runs, each bracketed by torch.cuda.synchronize().
              gpu_torch_ref.py tile --batch 64 --dtype bf16 --device cuda --iters 10
              gpu_torch_ref.py tile --batch 2 --dtype f32 --device cpu --iters 1 --depth 2
          -> {"side":"torch","model":"tile","batch":..,"dtype":..,"tiles_per_s":..,"seconds":..,
              "peak_mem_mib":..,"attention":"sdpa"|"math",...}
          "attention" says whether timm's blocks run F.scaled_dot_product_attention (fused_attn).

slide     The full-size slide encoder (LongNet ViT 1536 -> 768, 12 layers, 16 heads x 48, FFN 3072,
          segment lengths [1024, 5792, 32768, 185363, 1048576], dilation ratios [1, 2, 4, 8, 16],
          sub-LN, exact GELU, CLS prepended, 2D sin-cos positions computed on the fly), written here
          in plain PyTorch exactly per spec/prov-gigapath.md sections 2-3. Random weights N(0, 0.02),
          LayerNorm weights 1 + N(0, 0.02); features randn [N,1536]; coords on a row-major grid of
          side ceil(sqrt(N)) (tile i at cell (i % side, i // side), 256 px per cell). One warm-up
          forward at --warmup-tiles (default 2000), then --iters (default 1) timed forwards.
              gpu_torch_ref.py slide --tiles 100000 --dtype bf16 --device cuda
              gpu_torch_ref.py slide --tiles 3000 --dtype f32 --device cpu
          -> {"side":"torch","model":"slide","tiles":N,"dtype":..,"seconds":..,"peak_mem_mib":..,
              "attention":"flash_attn"|"sdpa_flash"|"sdpa_efficient"|"sdpa_cudnn"|"sdpa_flash_cpu"|"math",...}
          Attention kernels (--attn auto tries them in this order and keeps the first that passes a
          start-up check against the math path on a small padded problem, including the LSE):
            CUDA: flash_attn (flash_attn.flash_attn_func(..., return_attn_probs=True), as the
                  official code) -> sdpa_flash (aten._scaled_dot_product_flash_attention, fp16/bf16)
                  -> sdpa_efficient (aten._scaled_dot_product_efficient_attention with
                  compute_log_sumexp=True; also f32) -> math.
                  sdpa_cudnn (aten._scaled_dot_product_cudnn_attention) only when asked by --attn.
            CPU:  sdpa_flash_cpu (aten._scaled_dot_product_flash_attention_for_cpu) -> math.
          A kernel that raises during the run is dropped and the next one takes over (listed in
          "fallbacks"; the run is then not a clean timing of the first kernel).
          The math path (bmm + logsumexp + exp, chunked over segment x head so memory stays bounded)
          runs in any dtype, float64 included (bf16/f16 are computed in f32 there).

selftest  Loads the reference fixture (config.json, slide_encoder.pth = {"model": state_dict} with the
          official key names, inputs.safetensors, expected.safetensors) into the same slide encoder
          code, runs it in float64 with the math path, in float32 with the math path and with every
          fused kernel that applies on --device (bf16/f16 too on CUDA), and reports
          ||out - ref|| / ||ref|| for cls, pool, all_layers_cls, all_layers_pool. Exits 1 unless the
          float64 math run is within 1e-5 on all four.
              gpu_torch_ref.py selftest --fixture tests/fixtures/reference/slide_encoder [--device cuda]

Sequence order is the order of the inputs (row-major, y then x, for the synthetic grid). Above
L = 185,363 the reference's scatter drifts (a segment length not divisible by its ratio with several
segments); this script reproduces the reference, drift included, and warns.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "f64": torch.float64}

SLIDE_FULL = dict(
    in_chans=1536, embed_dim=768, depth=12, num_heads=16, mlp_ratio=4.0, tile_size=256, slide_ngrids=1000,
    segment_length=[1024, 5792, 32768, 185363, 1048576], dilated_ratio=[1, 2, 4, 8, 16],
    layernorm_eps=1e-5, norm_eps=1e-6,
)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def emit(obj):
    print(json.dumps(obj), flush=True)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def device_info(device):
    info = {"torch": torch.__version__}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            info["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        except Exception:
            pass
    else:
        info["threads"] = torch.get_num_threads()
    return info


def peak_mib(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return None


# ----------------------------------------------------------------------------------------------------
# Attention kernels. All take q, k, v as [B, H, l, d] (same dtype) and return
# (out [B, H, l, d] in q.dtype, lse [B, H, l] float32 (float64 for float64 math): natural-log
# log-sum-exp of the scaled logits). No mask: zero-padded keys take part with logit 0.
# ----------------------------------------------------------------------------------------------------

def attn_math(q, k, v, scale):
    B, H, l, d = q.shape
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.reshape(B * H, l, d)
    kf = k.reshape(B * H, l, d)
    vf = v.reshape(B * H, l, d)
    out = torch.empty(B * H, l, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(B * H, l, dtype=cdt, device=q.device)
    chunk = max(1, (1 << 26) // (l * l))  # <= 64M logits (256 MiB f32) per chunk
    for i in range(0, B * H, chunk):
        qc, kc, vc = (t[i:i + chunk].to(cdt) for t in (qf, kf, vf))
        s = torch.bmm(qc, kc.transpose(1, 2)) * scale
        m = torch.logsumexp(s, dim=-1)
        s.sub_(m.unsqueeze(-1)).exp_()
        out[i:i + chunk] = torch.bmm(s, vc).to(q.dtype)
        lse[i:i + chunk] = m
        del s
    return out.view(B, H, l, d), lse.view(B, H, l)


def attn_sdpa_flash(q, k, v, scale):
    # aten::_scaled_dot_product_flash_attention(Tensor query, Tensor key, Tensor value,
    #     float dropout_p=0., bool is_causal=False, bool return_debug_mask=False, *, float? scale=None)
    #   -> (output, logsumexp [B,H,L] f32, cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused, debug_mask)
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return res[0], res[1].reshape(q.shape[0], q.shape[1], -1)[..., : q.shape[2]].float()


def attn_sdpa_efficient(q, k, v, scale):
    # aten::_scaled_dot_product_efficient_attention(Tensor query, Tensor key, Tensor value,
    #     Tensor? attn_bias, bool compute_log_sumexp, float dropout_p=0., bool is_causal=False, *,
    #     float? scale=None) -> (output, log_sumexp [B,H,ceil(L/32)*32] f32, philox_seed, philox_offset)
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
    return res[0], res[1].reshape(q.shape[0], q.shape[1], -1)[..., : q.shape[2]].float()


def attn_sdpa_cudnn(q, k, v, scale):
    # aten::_scaled_dot_product_cudnn_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_bias,
    #     bool compute_log_sumexp, float dropout_p=0., bool is_causal=False, bool return_debug_mask=False,
    #     *, float? scale=None) -> (output, logsumexp [B,H,L,1] f32, ...)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
    return res[0], res[1].reshape(q.shape[0], q.shape[1], -1)[..., : q.shape[2]].float()


def attn_sdpa_flash_cpu(q, k, v, scale):
    # aten::_scaled_dot_product_flash_attention_for_cpu(Tensor query, Tensor key, Tensor value,
    #     float dropout_p=0., bool is_causal=False, *, Tensor? attn_mask=None, float? scale=None)
    #   -> (output, logsumexp [B,H,L])
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    lse = lse.reshape(q.shape[0], q.shape[1], -1)[..., : q.shape[2]]
    return out, (lse if q.dtype == torch.float64 else lse.float())


def attn_flash_attn(q, k, v, scale):
    # flash_attn.flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, ...,
    #     return_attn_probs=False) with q, k, v [B, L, H, d]; with return_attn_probs=True it returns
    #     (out [B,L,H,d], softmax_lse [B,H,L] f32, S_dmask), as the official LongNet code uses it.
    from flash_attn import flash_attn_func
    res = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.0,
                          softmax_scale=scale, causal=False, return_attn_probs=True)
    out, lse = res[0], res[1]
    return out.transpose(1, 2), lse.reshape(q.shape[0], q.shape[1], -1)[..., : q.shape[2]].float()


KERNELS = {
    "math": attn_math,
    "sdpa_flash": attn_sdpa_flash,
    "sdpa_efficient": attn_sdpa_efficient,
    "sdpa_cudnn": attn_sdpa_cudnn,
    "sdpa_flash_cpu": attn_sdpa_flash_cpu,
    "flash_attn": attn_flash_attn,
}


def default_chain(device):
    if torch.device(device).type == "cuda":
        return ["flash_attn", "sdpa_flash", "sdpa_efficient", "math"]
    return ["sdpa_flash_cpu", "math"]


def check_kernel(name, device, dtype, head_dim=48, heads=16):
    """Run kernel `name` on a small zero-padded problem and compare out and LSE with the math path."""
    g = torch.Generator(device="cpu").manual_seed(1234)
    B, l = 2, 257  # 257: not a multiple of 32 (the efficient kernel pads its LSE)
    qkv = [torch.randn(B, heads, l, head_dim, generator=g) for _ in range(3)]
    for t in qkv:
        t[:, :, -20:] = 0.0  # zero padding, as the segment/dilation padding produces
    q, k, v = (t.to(device=device, dtype=dtype).contiguous() for t in qkv)
    scale = head_dim ** -0.5
    out, lse = KERNELS[name](q, k, v, scale)
    sync(device)
    rdt = torch.float64 if dtype == torch.float64 else torch.float32
    ref_out, ref_lse = attn_math(q.to(rdt), k.to(rdt), v.to(rdt), scale)
    if tuple(out.shape) != (B, heads, l, head_dim) or tuple(lse.shape) != (B, heads, l):
        raise RuntimeError(f"shape out {tuple(out.shape)} lse {tuple(lse.shape)}")
    out_err = ((out.to(rdt) - ref_out).norm() / ref_out.norm()).item()
    lse_err = (lse.to(rdt) - ref_lse).abs().max().item()
    tol_out = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 2e-2)
    tol_lse = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 1e-2)
    ok = out_err <= tol_out and lse_err <= tol_lse
    return ok, {"out_rel_err": out_err, "lse_max_abs_err": lse_err}


class Attention:
    """A kernel chain: start-up check, then fall back at run time if the kernel raises."""

    def __init__(self, device, dtype, requested="auto", head_dim=48, heads=16, strict=False):
        chain = default_chain(device) if requested == "auto" else [requested]
        if requested != "auto" and not strict and requested != "math":
            chain.append("math")
        self.chain, self.checks, self.fallbacks = [], {}, []
        for name in chain:
            try:
                ok, info = check_kernel(name, device, dtype, head_dim, heads)
            except Exception as e:  # kernel missing, unsupported dtype / arch, ...
                ok, info = False, {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            self.checks[name] = info
            log(f"kernel check {name} ({dtype}): {'ok' if ok else 'REJECTED'} {info}")
            if ok:
                self.chain.append(name)
        if not self.chain:
            raise RuntimeError(f"no attention kernel works on {device} {dtype}: {self.checks}")
        self.used = set()
        self.seconds = 0.0
        self.timed = False
        self.device = device

    @property
    def name(self):
        return self.chain[0]

    def __call__(self, q, k, v, scale):
        while True:
            name = self.chain[0]
            try:
                if self.timed:
                    sync(self.device)
                    t = time.perf_counter()
                res = KERNELS[name](q, k, v, scale)
                if self.timed:
                    sync(self.device)
                    self.seconds += time.perf_counter() - t
                self.used.add(name)
                return res
            except Exception as e:
                if len(self.chain) == 1:
                    raise
                msg = f"{name} raised {type(e).__name__} on {tuple(q.shape)} {q.dtype}: {str(e)[:300]}"
                log("FALLBACK: " + msg)
                self.fallbacks.append(msg)
                self.chain.pop(0)
                if torch.device(self.device).type == "cuda":
                    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# Slide encoder (official key names), functional.
# ----------------------------------------------------------------------------------------------------

def slide_param_shapes(cfg):
    D, F_, C = cfg["embed_dim"], int(cfg["embed_dim"] * cfg["mlp_ratio"]), cfg["in_chans"]
    shapes = {"cls_token": (1, 1, D), "patch_embed.proj.weight": (D, C), "patch_embed.proj.bias": (D,)}
    for i in range(cfg["depth"]):
        p = f"encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (D, D)
            shapes[p + f"self_attn.{n}.bias"] = (D,)
        for n, dim in (("self_attn.inner_attn_ln", D), ("self_attn_layer_norm", D),
                       ("ffn.ffn_layernorm", F_), ("final_layer_norm", D)):
            shapes[p + n + ".weight"] = (dim,)
            shapes[p + n + ".bias"] = (dim,)
        shapes[p + "ffn.fc1.weight"] = (F_, D)
        shapes[p + "ffn.fc1.bias"] = (F_,)
        shapes[p + "ffn.fc2.weight"] = (D, F_)
        shapes[p + "ffn.fc2.bias"] = (D,)
    for n in ("encoder.layer_norm", "norm"):
        shapes[n + ".weight"] = (D,)
        shapes[n + ".bias"] = (D,)
    return shapes


def is_norm_weight(name):
    return name.endswith(".weight") and ("norm" in name.rsplit(".", 2)[-2] or "_ln" in name)


def random_slide_params(cfg, device, dtype, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    params = {}
    for name, shape in slide_param_shapes(cfg).items():
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02
        if is_norm_weight(name):
            t += 1.0
        params[name] = t.to(dtype)
    return params


def sincos_pos(coords, D, tile_size, ngrids):
    """2D sin-cos rows of the reference table for level-0 pixel coords (x, y), without the table."""
    g = torch.floor(coords.float() / tile_size)  # as coords_to_pos: floor(coords / tile_size) in f32
    if (g < 0).any() or (g >= ngrids).any():
        raise ValueError(f"grid coordinates outside [0, {ngrids}): the reference table has no such rows")
    g = g.double()
    quarter = D // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64, device=coords.device) / quarter)

    def emb1d(p):
        o = p[:, None] * omega[None]
        return torch.cat([torch.sin(o), torch.cos(o)], dim=1)

    return torch.cat([emb1d(g[:, 1]), emb1d(g[:, 0])], dim=1).float()  # y first, x second


def pad_to(n, m):
    return (n + m - 1) // m * m


def gather(x, s, r):
    """x [L, H, d] -> [n_seg, H, l, d]: segments of s tokens (zero-padded), each padded to a multiple
    of r; head h (group j = h // (H_pad / r)) keeps segment positions j, j + r, ..."""
    L, H, d = x.shape
    n = -(-L // s)
    sp, hp = pad_to(s, r), pad_to(H, r)
    hg, l = hp // r, sp // r
    x = F.pad(x, (0, 0, 0, 0, 0, n * s - L)).view(n, s, H, d)
    x = F.pad(x, (0, 0, 0, hp - H, 0, sp - s))  # [n, sp, hp, d]
    x = x.view(n, l, r, r, hg, d).diagonal(dim1=2, dim2=3)  # [n, l, hg, d, r]: phase == group
    x = x.permute(0, 4, 2, 1, 3).reshape(n, hp, l, d)  # head = group * hg + h
    return x[:, :H].contiguous()


def scatter(o, lse, s, r, L):
    """Inverse of gather for out [n, H, l, d] and lse [n, H, l]: dense [L, H, d] and [L, H], zeros /
    -1e8 where a head did not cover a position, lse == 0.0 -> -1e8. Segments are laid back at stride
    pad_to(s, r) as the reference does (no-op unless s % r != 0 with several segments)."""
    n, H, l, d = o.shape
    hp = pad_to(H, r)
    hg, sp = hp // r, l * r
    if hp > H:
        o = F.pad(o, (0, 0, 0, 0, 0, hp - H))
        lse = F.pad(lse, (0, 0, 0, hp - H), value=-1e8)
    dense = o.new_zeros(n, l, r, r, hg, d)
    dense.diagonal(dim1=2, dim2=3).copy_(o.reshape(n, r, hg, l, d).permute(0, 3, 2, 4, 1))
    dl = lse.new_full((n, l, r, r, hg), -1e8)
    dl.diagonal(dim1=2, dim2=3).copy_(lse.reshape(n, r, hg, l).permute(0, 3, 2, 1))
    dl.masked_fill_(dl == 0, -1e8)
    dense = dense.view(n * sp, hp, d)[:L, :H]
    dl = dl.view(n * sp, hp)[:L, :H]
    return dense, dl


def dilated_attention(q, k, v, cfg, attn):
    """q, k, v [L, H, d] -> [L, H, d], spec section 3."""
    L, H, d = q.shape
    scale = d ** -0.5
    outs, lses = [], []
    for S, r in zip(cfg["segment_length"], cfg["dilated_ratio"]):
        s = min(S, L)
        qi, ki, vi = gather(q, s, r), gather(k, s, r), gather(v, s, r)
        o, lse = attn(qi, ki, vi, scale)
        del qi, ki, vi
        o, lse = scatter(o, lse, s, r, L)
        outs.append(o)
        lses.append(lse)
        del o, lse
    wdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    w = torch.softmax(torch.stack([x.to(wdt) for x in lses]), dim=0)  # [branches, L, H]
    del lses
    out = None
    for b, o in enumerate(outs):
        term = o * w[b].to(o.dtype).unsqueeze(-1)
        out = term if out is None else out + term
    return out


def slide_forward(P, cfg, feats, coords, attn):
    """feats [N, in_chans], coords [N, 2] (x, y) pixels -> dict of cls, pool, all_layers_cls/_pool."""
    D, H, depth = cfg["embed_dim"], cfg["num_heads"], cfg["depth"]
    eps, neps = cfg["layernorm_eps"], cfg["norm_eps"]
    dtype = P["patch_embed.proj.weight"].dtype

    def lin(x, n):
        return F.linear(x, P[n + ".weight"], P[n + ".bias"])

    def ln(x, n, e=eps):
        return F.layer_norm(x, (x.shape[-1],), P[n + ".weight"], P[n + ".bias"], e)

    x = lin(feats.to(dtype), "patch_embed.proj")
    x = x + sincos_pos(coords, D, cfg["tile_size"], cfg["slide_ngrids"]).to(dtype)
    x = torch.cat([P["cls_token"].reshape(1, D), x], dim=0)  # CLS position row is zero
    L = x.shape[0]
    if L > 185363:
        log(f"warning: L = {L} > 185363, the reference scatter drifts there (reproduced as is)")
    all_cls, all_pool = [], []

    def record(h):
        all_cls.append(ln(h[0], "norm", neps))
        all_pool.append(ln(h[1:].mean(0), "norm", neps))

    record(x)
    for i in range(depth):
        p = f"encoder.layers.{i}."
        a = ln(x, p + "self_attn_layer_norm")
        q = lin(a, p + "self_attn.q_proj").view(L, H, D // H)
        k = lin(a, p + "self_attn.k_proj").view(L, H, D // H)
        v = lin(a, p + "self_attn.v_proj").view(L, H, D // H)
        del a
        o = dilated_attention(q, k, v, cfg, attn).reshape(L, D)
        del q, k, v
        x = x + lin(ln(o, p + "self_attn.inner_attn_ln"), p + "self_attn.out_proj")
        del o
        f = F.gelu(lin(ln(x, p + "final_layer_norm"), p + "ffn.fc1"))
        x = x + lin(ln(f, p + "ffn.ffn_layernorm"), p + "ffn.fc2")
        del f
        record(x)
    enc = ln(x, "encoder.layer_norm")
    return {
        "cls": ln(enc[0], "norm", neps),
        "pool": ln(enc[1:].mean(0), "norm", neps),
        "all_layers_cls": torch.stack(all_cls),
        "all_layers_pool": torch.stack(all_pool),
    }


def grid_coords(n, device, tile_size=256):
    side = math.ceil(math.sqrt(n))
    i = torch.arange(n, device=device)
    return torch.stack([i % side, i // side], dim=1).float() * tile_size


# ----------------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------------

def cmd_slide(args):
    device, dtype = args.device, DTYPES[args.dtype]
    cfg = dict(SLIDE_FULL, depth=args.depth)
    torch.manual_seed(args.seed)
    attn = Attention(device, dtype, args.attn, cfg["embed_dim"] // cfg["num_heads"], cfg["num_heads"])
    log(f"slide: N={args.tiles} {args.dtype} on {device}, kernel chain {attn.chain}")
    P = random_slide_params(cfg, device, dtype, args.seed)
    g = torch.Generator(device=device).manual_seed(args.seed + 1)

    def inputs(n):
        feats = torch.randn(n, cfg["in_chans"], generator=g, device=device, dtype=torch.float32).to(dtype)
        return feats, grid_coords(n, device, cfg["tile_size"])

    with torch.inference_mode():
        wf, wc = inputs(min(args.warmup_tiles, args.tiles))
        t = time.perf_counter()
        slide_forward(P, cfg, wf, wc, attn)
        sync(device)
        log(f"warm-up at {wf.shape[0]} tiles: {time.perf_counter() - t:.3f} s")
        del wf, wc
        feats, coords = inputs(args.tiles)
        sync(device)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times, attn_times = [], []
        for it in range(args.iters):
            attn.timed, attn.seconds = args.breakdown, 0.0
            sync(device)
            t = time.perf_counter()
            out = slide_forward(P, cfg, feats, coords, attn)
            sync(device)
            times.append(time.perf_counter() - t)
            attn_times.append(attn.seconds)
            log(f"run {it}: {times[-1]:.3f} s")
        finite = bool(torch.isfinite(out["cls"]).all() and torch.isfinite(out["pool"]).all())
    res = {
        "side": "torch", "model": "slide", "tiles": args.tiles, "dtype": args.dtype,
        "seconds": statistics.median(times), "peak_mem_mib": peak_mib(device),
        "attention": "+".join(sorted(attn.used)) if len(attn.used) > 1 else attn.name,
        "device": device, "depth": cfg["depth"], "iters": args.iters, "seconds_all": times,
        "warmup_tiles": min(args.warmup_tiles, args.tiles), "outputs_finite": finite,
        "kernel_checks": attn.checks, "fallbacks": attn.fallbacks, **device_info(device),
    }
    if args.breakdown:
        res["attention_kernel_seconds"] = statistics.median(attn_times)
    emit(res)


def cmd_tile(args):
    import timm

    device, dtype = args.device, DTYPES[args.dtype]
    kw = dict(img_size=224, in_chans=3, patch_size=16, init_values=1e-5, mlp_ratio=5.33334, num_classes=0,
              embed_dim=args.embed_dim, depth=args.depth, num_heads=args.heads)
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    try:
        with torch.device(device):  # initialise on the device (the 1.1B-parameter init is slow on CPU)
            model = timm.create_model("vit_giant_patch14_dinov2", pretrained=False, **kw)
    except Exception as e:
        log(f"init on {device} failed ({type(e).__name__}: {e}); initialising on CPU")
        model = timm.create_model("vit_giant_patch14_dinov2", pretrained=False, **kw)
    model = model.to(device=device, dtype=dtype).eval()
    nparams = sum(p.numel() for p in model.parameters())
    fused = [getattr(b.attn, "fused_attn", None) for b in model.blocks]
    attention = "sdpa" if all(f is True for f in fused) else ("math" if not any(fused) else "mixed")
    log(f"tile model: {nparams:,} params, built in {time.perf_counter() - t:.1f} s, timm {timm.__version__}, "
        f"fused_attn={fused[0]} -> {attention}")
    x = torch.randn(args.batch, 3, 224, 224, device=device, dtype=torch.float32).to(dtype)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        sync(device)
        t = time.perf_counter()
        out = model(x)
        sync(device)
        log(f"warm-up: {time.perf_counter() - t:.3f} s, output {tuple(out.shape)}")
        times = []
        for _ in range(args.iters):
            sync(device)
            t = time.perf_counter()
            out = model(x)
            sync(device)
            times.append(time.perf_counter() - t)
        finite = bool(torch.isfinite(out).all())
    sec = statistics.median(times)
    res = {
        "side": "torch", "model": "tile", "batch": args.batch, "dtype": args.dtype,
        "tiles_per_s": args.batch / sec, "seconds": sec, "peak_mem_mib": peak_mib(device),
        "attention": attention, "device": device, "depth": args.depth, "embed_dim": args.embed_dim,
        "heads": args.heads, "params": nparams, "iters": args.iters, "seconds_all": times,
        "outputs_finite": finite, "timm": timm.__version__, **device_info(device),
    }
    if args.probe_kernel and torch.device(device).type == "cuda":
        res["cuda_attention_kernels"] = probe_kernels(model, x)
    emit(res)


def probe_kernels(model, x):
    """Names of the CUDA kernels that look like attention in one profiled forward (optional)."""
    try:
        from torch.profiler import ProfilerActivity, profile
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(x)
            torch.cuda.synchronize()
        names = {e.key for e in prof.key_averages()}
        keys = ("flash", "fmha", "attention", "cudnn", "sdpa", "mha")
        return sorted(n[:120] for n in names if any(s in n.lower() for s in keys))
    except Exception as e:
        return [f"profiler failed: {type(e).__name__}: {e}"]


def cmd_selftest(args):
    from safetensors.torch import load_file

    device = args.device
    with open(os.path.join(args.fixture, "config.json")) as f:
        cfg = json.load(f)
    sd = torch.load(os.path.join(args.fixture, "slide_encoder.pth"), map_location="cpu", weights_only=True)["model"]
    want = slide_param_shapes(cfg)
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    bad = [k for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    if missing or extra or bad:
        sys.exit(f"state dict mismatch: missing {missing[:5]} extra {extra[:5]} shape {bad[:5]}")
    inp = load_file(os.path.join(args.fixture, "inputs.safetensors"))
    exp = load_file(os.path.join(args.fixture, "expected.safetensors"))
    hd, H = cfg["embed_dim"] // cfg["num_heads"], cfg["num_heads"]

    if torch.device(device).type == "cuda":
        plan = [("f64", "math"), ("f32", "math"), ("f32", "sdpa_efficient"), ("f32", "flash_attn"),
                ("bf16", "flash_attn"), ("bf16", "sdpa_flash"), ("bf16", "sdpa_efficient"), ("bf16", "math"),
                ("f16", "sdpa_flash")]
        if args.cudnn:
            plan.append(("bf16", "sdpa_cudnn"))
    else:
        plan = [("f64", "math"), ("f32", "math"), ("f32", "sdpa_flash_cpu"), ("f64", "sdpa_flash_cpu"),
                ("bf16", "sdpa_flash_cpu")]
    runs = []
    for dname, kname in plan:
        dtype = DTYPES[dname]
        entry = {"dtype": dname, "attention": kname}
        try:
            attn = Attention(device, dtype, kname, hd, H, strict=True)
            P = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
            with torch.inference_mode():
                out = slide_forward(P, cfg, inp["features"].to(device=device, dtype=dtype),
                                    inp["coords"].to(device), attn)
            entry["rel_err"] = {}
            entry["max_abs_err"] = {}
            for key in ("cls", "pool", "all_layers_cls", "all_layers_pool"):
                got, ref = out[key].double().cpu(), exp[key].double()
                entry["rel_err"][key] = ((got - ref).norm() / ref.norm()).item()
                entry["max_abs_err"][key] = (got - ref).abs().max().item()
            entry["kernel_check"] = attn.checks.get(kname)
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(json.dumps(entry))
        runs.append(entry)
    f64 = runs[0]
    ok = "rel_err" in f64 and max(f64["rel_err"].values()) <= 1e-5
    emit({"side": "torch", "model": "selftest", "device": device, "fixture": args.fixture,
          "tiles": int(inp["features"].shape[0]), "pass": ok, "runs": runs, **device_info(device)})
    if not ok:
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("tile", help="timm Prov-GigaPath tile encoder throughput")
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    t.add_argument("--device", default="cuda")
    t.add_argument("--iters", type=int, default=10)
    t.add_argument("--depth", type=int, default=40)
    t.add_argument("--embed-dim", type=int, default=1536)
    t.add_argument("--heads", type=int, default=24)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--probe-kernel", action="store_true", help="profile one forward for attention kernel names")

    s = sub.add_parser("slide", help="LongNet slide encoder forward time")
    s.add_argument("--tiles", type=int, required=True)
    s.add_argument("--dtype", choices=["bf16", "f16", "f32", "f64"], default="bf16")
    s.add_argument("--device", default="cuda")
    s.add_argument("--depth", type=int, default=12)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--iters", type=int, default=1)
    s.add_argument("--warmup-tiles", type=int, default=2000)
    s.add_argument("--attn", default="auto", choices=["auto"] + sorted(KERNELS))
    s.add_argument("--breakdown", action="store_true", help="also time the attention kernels (adds syncs)")

    st = sub.add_parser("selftest", help="check the slide encoder against the reference fixture")
    st.add_argument("--fixture", required=True)
    st.add_argument("--device", default="cpu")
    st.add_argument("--cudnn", action="store_true", help="also try aten._scaled_dot_product_cudnn_attention")

    args = ap.parse_args()
    {"tile": cmd_tile, "slide": cmd_slide, "selftest": cmd_selftest}[args.cmd](args)


if __name__ == "__main__":
    main()
