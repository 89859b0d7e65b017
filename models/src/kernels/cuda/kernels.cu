// gigapath's own CUDA kernels for half-precision inference (bf16 / f16, sm_80 and newer), compiled
// to PTX by models/build.rs when the `cuda` feature is on and loaded by src/kernels/cuda/imp.rs.
//
//   flash_fwd_*      attention forward with the log-sum-exp, FlashAttention-2 style: one pass over
//                    the keys with an online softmax, scores never leave registers. Tensor cores
//                    through mma.sync m16n8k16 (f32 accumulation); arbitrary (batch, head, token)
//                    strides, so it reads timm's packed qkv and writes the merged heads directly.
//   layer_norm_*     two-pass LayerNorm over the last dimension, half in / f32 params / half out;
//                    gelu_layer_norm_* applies exact GELU first (torchscale's FFN sub-LN).
//   dilated_mix_*    LongNet's per-(position, head) softmax over the branches' lses.
//   swiglu_*         silu(x[:, :H]) * x[:, H:] of a packed [rows, 2H] fc1 output -> [rows, H].

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define FULL_MASK 0xffffffffu

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_float(float x) { return __float2half(x); }

// Two floats rounded into one 32-bit register of two halves (low = a).
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
    __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t *>(&v);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800

// c += a (16x16, row) * b (16x8, col), f32 accumulators.
template <typename T> __device__ __forceinline__ void mma16816(float *c, const uint32_t *a, const uint32_t *b);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float *c, const uint32_t *a, const uint32_t *b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma16816<__half>(float *c, const uint32_t *a, const uint32_t *b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 2^x on the special-function unit (2 ulp; 2^-inf = 0). exp2f adds range handling around it.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t *r, const void *smem) {
    uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t *r, const void *smem) {
    uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// 16 bytes global -> shared without a register round trip; src_bytes = 0 writes zeros.
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, int src_bytes) {
    uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

constexpr int FA_BN = 64;  // keys per iteration

template <bool B> struct BoolTag {
    static constexpr bool value = B;
};

// Element strides of one operand: batch, head, head group, token.
struct Geom {
    long long b, h, g, t;
};

// One flash-attention launch. Problem (batch b, head h) has `n` tokens; its head group is
// j = h / group and token t sits at position b * pos_b + j + t * pos_t: tokens at positions
// >= seq_len are zero rows that still take part as keys (LongNet's zero padding) and are never
// written. Plain attention: group = heads, pos_b = 0, pos_t = 1, seq_len = n.
struct FlashArgs {
    Geom q, k, v, o, lse;
    long long pos_b, pos_t, seq_len;
    int n, heads, group;
    float scale;
};

// Starts copying a [FA_BN, D] tile of rows `row0..` (zeros from `valid` on) into shared memory,
// row stride D + 8 (conflict-free for ldmatrix).
template <typename T, int D, int THREADS>
__device__ __forceinline__ void load_tile_async(T *smem, const T *base, long long stride, int row0, int valid) {
    constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < FA_BN * CHUNKS; c += THREADS) {
        const int r = c / CHUNKS, cc = c % CHUNKS;
        const bool in = row0 + r < valid;
        const T *src = in ? base + (long long)(row0 + r) * stride + cc * 8 : base;
        cp_async16(smem + r * (D + 8) + cc * 8, src, in ? 16 : 0);
    }
}

// One (batch b = blockIdx.z, head h = blockIdx.y, 16 * WARPS queries from blockIdx.x) of
// softmax(scale * q k^T) v over the problem's n keys, and (when `lse` is not null) the natural-log
// log-sum-exp of the scaled logits. Key / value tiles are double-buffered with cp.async.
template <typename T, int D, int WARPS>
__device__ void flash_fwd(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
                          T *__restrict__ o, float *__restrict__ lse, const FlashArgs &a) {
    constexpr int THREADS = WARPS * 32, BM = WARPS * 16, STRIDE = D + 8, TILE = FA_BN * STRIDE;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T *ks = reinterpret_cast<T *>(smem_raw);  // [2][TILE]
    T *vs = ks + 2 * TILE;                     // [2][TILE]
    const int b = blockIdx.z, h = blockIdx.y, hg = h / a.group;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;
    const int r0 = blockIdx.x * BM + warp * 16 + g, r1 = r0 + 8;
    const int n = a.n;
    // Tokens 0..valid-1 lie inside the sequence.
    const long long pos0 = b * a.pos_b + hg;
    const int valid = pos0 >= a.seq_len ? 0 : (int)min((long long)n, (a.seq_len - pos0 + a.pos_t - 1) / a.pos_t);
    auto base = [&](const Geom &m) { return b * m.b + h * m.h + hg * m.g; };
    const T *qb = q + base(a.q);
    const T *kb = k + base(a.k);
    const T *vb = v + base(a.v);
    const float scale_log2 = a.scale * 1.4426950408889634f;

    const int tiles = (n + FA_BN - 1) / FA_BN;
    load_tile_async<T, D, THREADS>(ks, kb, a.k.t, 0, valid);
    load_tile_async<T, D, THREADS>(vs, vb, a.v.t, 0, valid);
    cp_async_commit();

    // This warp's 16 query rows as mma A fragments, straight from global memory.
    uint32_t qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const int col = kk * 16 + 2 * t;
        auto ld = [&](int r, int c) -> uint32_t {
            return r < valid ? *reinterpret_cast<const uint32_t *>(qb + (long long)r * a.q.t + c) : 0u;
        };
        qa[kk][0] = ld(r0, col);
        qa[kk][1] = ld(r1, col);
        qa[kk][2] = ld(r0, col + 8);
        qa[kk][3] = ld(r1, col + 8);
    }

    float acc[D / 8][4];
#pragma unroll
    for (int jj = 0; jj < D / 8; ++jj) acc[jj][0] = acc[jj][1] = acc[jj][2] = acc[jj][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY;  // running max of scale_log2 * s, rows r0 / r1
    float l0 = 0.f, l1 = 0.f;              // this thread's part of the running sums
    const int mat = lane >> 3, mrow = lane & 7;  // ldmatrix: which 8x8 matrix / row this lane addresses
    const bool warp_active = blockIdx.x * BM + warp * 16 < valid;

    for (int it = 0; it < tiles; ++it) {
        const int n0 = it * FA_BN;
        if (it + 1 < tiles) {
            const int next = (it + 1) & 1;
            load_tile_async<T, D, THREADS>(ks + next * TILE, kb, a.k.t, n0 + FA_BN, valid);
            load_tile_async<T, D, THREADS>(vs + next * TILE, vb, a.v.t, n0 + FA_BN, valid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T *kt = ks + (it & 1) * TILE;
        const T *vt = vs + (it & 1) * TILE;
        // A warp whose 16 rows are all padding (the last block of a short problem) only helps
        // load; it has nothing to compute or write.
        if (!warp_active) {
            __syncthreads();
            continue;
        }

        // The last tile (EDGE) masks and skips keys past the end; the others run the plain,
        // fully unrolled loops.
        auto step = [&](auto edge_tag) {
            constexpr bool EDGE = decltype(edge_tag)::value;
            float s[FA_BN / 8][4];
#pragma unroll
            for (int j = 0; j < FA_BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
                for (int j = 0; j < FA_BN / 8; j += 2) {
                    if (EDGE && n0 + j * 8 >= n) break;  // past the last key: masked below anyway
                    // matrices: keys j*8.. / (j+1)*8.. x dims kk*16 + 0..7 / 8..15
                    uint32_t bf[4];
                    ldmatrix_x4(bf, kt + ((j + (mat >> 1)) * 8 + mrow) * STRIDE + kk * 16 + (mat & 1) * 8);
                    mma16816<T>(s[j], qa[kk], bf);
                    mma16816<T>(s[j + 1], qa[kk], bf + 2);
                }
            }
            float mx0 = m0, mx1 = m1;
#pragma unroll
            for (int j = 0; j < FA_BN / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = n0 + j * 8 + 2 * t + (e & 1);
                    s[j][e] = (EDGE && col >= n) ? -INFINITY : s[j][e] * scale_log2;
                }
                mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
                mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, 2));
            const float a0 = fast_exp2(m0 - mx0), a1 = fast_exp2(m1 - mx1);
            m0 = mx0;
            m1 = mx1;
            float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
            for (int j = 0; j < FA_BN / 8; ++j) {
                s[j][0] = fast_exp2(s[j][0] - mx0);
                s[j][1] = fast_exp2(s[j][1] - mx0);
                s[j][2] = fast_exp2(s[j][2] - mx1);
                s[j][3] = fast_exp2(s[j][3] - mx1);
                sum0 += s[j][0] + s[j][1];
                sum1 += s[j][2] + s[j][3];
            }
            l0 = l0 * a0 + sum0;
            l1 = l1 * a1 + sum1;
#pragma unroll
            for (int jj = 0; jj < D / 8; ++jj) {
                acc[jj][0] *= a0;
                acc[jj][1] *= a0;
                acc[jj][2] *= a1;
                acc[jj][3] *= a1;
            }
            // acc += P V: the score accumulators are already laid out as the A fragments of P.
#pragma unroll
            for (int kk = 0; kk < FA_BN / 16; ++kk) {
                if (EDGE && n0 + kk * 16 >= n) break;  // probabilities past the last key are 0
                uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                  pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
                for (int jj = 0; jj < D / 8; jj += 2) {
                    // matrices: keys kk*16 + 0..7 / 8..15 x dims jj*8.. / (jj+1)*8.., transposed
                    uint32_t bf[4];
                    ldmatrix_x4_trans(bf, vt + (kk * 16 + (mat & 1) * 8 + mrow) * STRIDE + jj * 8 + (mat >> 1) * 8);
                    mma16816<T>(acc[jj], pa, bf);
                    mma16816<T>(acc[jj + 1], pa, bf + 2);
                }
            }
        };
        if (n0 + FA_BN > n)
            step(BoolTag<true>{});
        else
            step(BoolTag<false>{});
        __syncthreads();  // this stage is refilled by the next iteration's prefetch
    }

    l0 += __shfl_xor_sync(FULL_MASK, l0, 1);
    l0 += __shfl_xor_sync(FULL_MASK, l0, 2);
    l1 += __shfl_xor_sync(FULL_MASK, l1, 1);
    l1 += __shfl_xor_sync(FULL_MASK, l1, 2);
    const float inv0 = 1.f / l0, inv1 = 1.f / l1;
    T *ob = o + base(a.o);
#pragma unroll
    for (int jj = 0; jj < D / 8; ++jj) {
        const int col = jj * 8 + 2 * t;
        if (r0 < valid)
            *reinterpret_cast<uint32_t *>(ob + (long long)r0 * a.o.t + col) =
                pack2<T>(acc[jj][0] * inv0, acc[jj][1] * inv0);
        if (r1 < valid)
            *reinterpret_cast<uint32_t *>(ob + (long long)r1 * a.o.t + col) =
                pack2<T>(acc[jj][2] * inv1, acc[jj][3] * inv1);
    }
    if (lse != nullptr && t == 0) {
        const float ln2 = 0.6931471805599453f;
        float *lb = lse + base(a.lse);
        if (r0 < valid) lb[(long long)r0 * a.lse.t] = (m0 + log2f(l0)) * ln2;
        if (r1 < valid) lb[(long long)r1 * a.lse.t] = (m1 + log2f(l1)) * ln2;
    }
}

// flash_fwd_<dtype>_<head dim>_w<warps>: 4 warps (64 queries) for short problems, 8 warps (128
// queries, K / V tiles shared by twice the rows) for long ones. Dynamic shared memory:
// 4 * 64 * (D + 8) * sizeof(T) bytes (kernel attribute raised above 48 KiB by the caller).
#define FLASH(NAME, T, D, WARPS, MINB)                                                          \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB)                             \
        NAME(const T *q, const T *k, const T *v, T *o, float *lse, const FlashArgs args) {      \
        flash_fwd<T, D, WARPS>(q, k, v, o, lse, args);                                          \
    }
// Up to 64 dims the registers fit 2 blocks of 8 warps per SM; above, that bound would spill.
#define FLASH_ALL(TNAME, T, D)                                           \
    FLASH(flash_fwd_##TNAME##_##D##_w4, T, D, 4, (D <= 64 ? 4 : 2))      \
    FLASH(flash_fwd_##TNAME##_##D##_w8, T, D, 8, (D <= 64 ? 2 : 1))

FLASH_ALL(bf16, __nv_bfloat16, 32)
FLASH_ALL(bf16, __nv_bfloat16, 48)
FLASH_ALL(bf16, __nv_bfloat16, 64)
FLASH_ALL(bf16, __nv_bfloat16, 80)
FLASH_ALL(bf16, __nv_bfloat16, 96)
FLASH_ALL(bf16, __nv_bfloat16, 128)
FLASH_ALL(f16, __half, 32)
FLASH_ALL(f16, __half, 48)
FLASH_ALL(f16, __half, 64)
FLASH_ALL(f16, __half, 80)
FLASH_ALL(f16, __half, 96)
FLASH_ALL(f16, __half, 128)

#endif  // __CUDA_ARCH__ >= 800

// ---- LongNet's branch mix: per (position, head) row, weights softmax_b(lse_b) over the branches
// (an lse of exactly 0 -- never written, i.e. not covered -- counts as -1e8, as in the
// reference), out = sum_b w_b * out_b in f32. 8 outputs per thread; up to 8 branches.
template <typename T>
__device__ void dilated_mix(const T *const *outs, const float *const *lses, int branches, T *__restrict__ y,
                            long long rows, int dim) {
    // 32-bit index math (the host keeps rows * dim / 8 below 2^32): a 64-bit division per
    // 8 elements cost more than the memory traffic.
    const unsigned per_row = dim / 8, chunks = (unsigned)rows * per_row;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < chunks; i += gridDim.x * blockDim.x) {
        const long long row = i / per_row;
        const int c = (int)(i - (unsigned)row * per_row) * 8;
        // Fixed trip counts keep the per-branch arrays in registers.
        float l[8], w[8];
        float m = -INFINITY;
#pragma unroll
        for (int b = 0; b < 8; ++b) {
            const float x = b < branches ? lses[b][row] : -INFINITY;
            l[b] = x == 0.f ? -1e8f : x;
            m = fmaxf(m, l[b]);
        }
        float sum = 0.f;
#pragma unroll
        for (int b = 0; b < 8; ++b) {
            w[b] = b < branches ? expf(l[b] - m) : 0.f;
            sum += w[b];
        }
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int b = 0; b < 8; ++b) {
            if (w[b] == 0.f) continue;  // not covered: that row of out_b was never written
            const float wb = w[b] / sum;
            uint4 raw = *reinterpret_cast<const uint4 *>(outs[b] + row * dim + c);
            const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
            for (int x = 0; x < 8; ++x) acc[x] += to_float(e[x]) * wb;
        }
        uint4 out;
        T *oe = reinterpret_cast<T *>(&out);
#pragma unroll
        for (int x = 0; x < 8; ++x) oe[x] = from_float<T>(acc[x]);
        *reinterpret_cast<uint4 *>(y + row * dim + c) = out;
    }
}

#define MIX(NAME, T)                                                                                  \
    extern "C" __global__ void NAME(const T *o0, const T *o1, const T *o2, const T *o3, const T *o4,  \
                                    const T *o5, const T *o6, const T *o7, const float *l0,           \
                                    const float *l1, const float *l2, const float *l3,                \
                                    const float *l4, const float *l5, const float *l6,                \
                                    const float *l7, int branches, T *y, long long rows, int dim) {   \
        const T *outs[8] = {o0, o1, o2, o3, o4, o5, o6, o7};                                          \
        const float *lses[8] = {l0, l1, l2, l3, l4, l5, l6, l7};                                      \
        dilated_mix(outs, lses, branches, y, rows, dim);                                              \
    }
MIX(dilated_mix_bf16, __nv_bfloat16)
MIX(dilated_mix_f16, __half)

// ---- LayerNorm: one block per row, 8 elements per thread kept in registers (dim <= 8192, a
// multiple of 8); mean, then the variance of the centred values, in f32. With GELU the input
// first goes through exact (erf) GELU, rounded to T as the reference's separate op would.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(FULL_MASK, x, off);
    return x;
}

// Sum over the block; every thread gets it.
__device__ __forceinline__ float block_sum(float x) {
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    x = warp_sum(x);
    __syncthreads();  // the previous call's readers are done with `part`
    if (lane == 0) part[warp] = x;
    __syncthreads();
    return warp_sum(lane < warps ? part[lane] : 0.f);
}

template <typename T, bool GELU>
__device__ void layer_norm(const T *__restrict__ x, const float *__restrict__ w, const float *__restrict__ bias,
                           T *__restrict__ y, int dim, float eps) {
    const long long row = blockIdx.x;
    const int c = threadIdx.x * 8;
    const bool active = c < dim;
    float v[8];
    if (active) {
        uint4 raw = *reinterpret_cast<const uint4 *>(x + row * dim + c);
        const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            float f = to_float(e[i]);
            if (GELU) f = to_float(from_float<T>(0.5f * f * (1.f + erff(f * 0.7071067811865476f))));
            v[i] = f;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.f;
    }
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) sum += v[i];
    const float mean = block_sum(sum) / dim;
    float sq = 0.f;
    if (active) {
#pragma unroll
        for (int i = 0; i < 8; ++i) sq += (v[i] - mean) * (v[i] - mean);
    }
    const float inv = rsqrtf(block_sum(sq) / dim + eps);
    if (!active) return;
    uint4 out;
    T *oe = reinterpret_cast<T *>(&out);
#pragma unroll
    for (int i = 0; i < 8; ++i) oe[i] = from_float<T>((v[i] - mean) * inv * w[c + i] + bias[c + i]);
    *reinterpret_cast<uint4 *>(y + row * dim + c) = out;
}

// The same for dim <= 2048: one warp per row, eight rows per block, no barriers.
template <typename T, bool GELU>
__device__ void layer_norm_warp(const T *__restrict__ x, const float *__restrict__ w,
                                const float *__restrict__ bias, T *__restrict__ y, int rows, int dim,
                                float eps) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const int chunks = dim / 8;
    const T *xr = x + (long long)row * dim;
    float v[8][8];
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const int c = lane + 32 * k;
        if (c < chunks) {
            uint4 raw = *reinterpret_cast<const uint4 *>(xr + c * 8);
            const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                float f = to_float(e[i]);
                if (GELU) f = to_float(from_float<T>(0.5f * f * (1.f + erff(f * 0.7071067811865476f))));
                v[k][i] = f;
                sum += f;
            }
        }
    }
    const float mean = warp_sum(sum) / dim;
    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        if (lane + 32 * k < chunks) {
#pragma unroll
            for (int i = 0; i < 8; ++i) sq += (v[k][i] - mean) * (v[k][i] - mean);
        }
    }
    const float inv = rsqrtf(warp_sum(sq) / dim + eps);
    T *yr = y + (long long)row * dim;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const int c = lane + 32 * k;
        if (c < chunks) {
            uint4 out;
            T *oe = reinterpret_cast<T *>(&out);
#pragma unroll
            for (int i = 0; i < 8; ++i)
                oe[i] = from_float<T>((v[k][i] - mean) * inv * w[c * 8 + i] + bias[c * 8 + i]);
            *reinterpret_cast<uint4 *>(yr + c * 8) = out;
        }
    }
}

#define LAYER_NORM_WARP(NAME, T, GELU)                                                              \
    extern "C" __global__ void NAME(const T *x, const float *w, const float *b, T *y, int rows,      \
                                    int dim, float eps) {                                           \
        layer_norm_warp<T, GELU>(x, w, b, y, rows, dim, eps);                                       \
    }
LAYER_NORM_WARP(layer_norm_warp_bf16, __nv_bfloat16, false)
LAYER_NORM_WARP(layer_norm_warp_f16, __half, false)
LAYER_NORM_WARP(gelu_layer_norm_warp_bf16, __nv_bfloat16, true)
LAYER_NORM_WARP(gelu_layer_norm_warp_f16, __half, true)

#define LAYER_NORM(NAME, T, GELU)                                                                 \
    extern "C" __global__ void NAME(const T *x, const float *w, const float *b, T *y, int dim,     \
                                    float eps) {                                                  \
        layer_norm<T, GELU>(x, w, b, y, dim, eps);                                                \
    }
LAYER_NORM(layer_norm_bf16, __nv_bfloat16, false)
LAYER_NORM(layer_norm_f16, __half, false)
LAYER_NORM(gelu_layer_norm_bf16, __nv_bfloat16, true)
LAYER_NORM(gelu_layer_norm_f16, __half, true)

// ---- SwiGLU of a packed fc1 output: 8 outputs per thread.
template <typename T>
__device__ void swiglu(const T *__restrict__ x, T *__restrict__ y, long long rows, int hidden) {
    // 32-bit index math (the host keeps rows * hidden / 8 below 2^32): a 64-bit division per
    // 8 elements cost more than the memory traffic.
    const unsigned per_row = hidden / 8, chunks = (unsigned)rows * per_row;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < chunks; i += gridDim.x * blockDim.x) {
        const long long row = i / per_row;
        const int c = (int)(i - (unsigned)row * per_row) * 8;
        uint4 ga = *reinterpret_cast<const uint4 *>(x + row * 2 * hidden + c);
        uint4 va = *reinterpret_cast<const uint4 *>(x + row * 2 * hidden + hidden + c);
        const T *ge = reinterpret_cast<const T *>(&ga);
        const T *ve = reinterpret_cast<const T *>(&va);
        uint4 out;
        T *oe = reinterpret_cast<T *>(&out);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float gf = to_float(ge[e]);
            oe[e] = from_float<T>(gf / (1.f + __expf(-gf)) * to_float(ve[e]));
        }
        *reinterpret_cast<uint4 *>(y + row * hidden + c) = out;
    }
}

extern "C" __global__ void swiglu_bf16(const __nv_bfloat16 *x, __nv_bfloat16 *y, long long rows, int hidden) {
    swiglu(x, y, rows, hidden);
}
extern "C" __global__ void swiglu_f16(const __half *x, __half *y, long long rows, int hidden) {
    swiglu(x, y, rows, hidden);
}
