// gigapath's own CUDA kernels for half-precision inference (bf16 / f16, sm_80 and newer), compiled
// to PTX by models/build.rs when the `cuda` feature is on and loaded by src/cuda_ops.rs.
//
//   flash_fwd_*      attention forward with the log-sum-exp, FlashAttention-2 style: one pass over
//                    the keys with an online softmax, scores never leave registers. Tensor cores
//                    through mma.sync m16n8k16 (f32 accumulation); arbitrary (batch, head, token)
//                    strides, so it reads timm's packed qkv and writes the merged heads directly.
//   layer_norm_*     two-pass LayerNorm over the last dimension, half in / f32 params / half out.
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

constexpr int FA_BM = 64;     // query rows per block (16 per warp)
constexpr int FA_BN = 64;     // keys per iteration
constexpr int FA_THREADS = 128;

// Loads a [FA_BN, D] tile of rows `row0..` (zeros past `n`) into shared memory, row stride D + 8.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T *smem, const T *base, long long stride, int row0, int n) {
    constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < FA_BN * CHUNKS; c += FA_THREADS) {
        int r = c / CHUNKS, cc = c % CHUNKS;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (row0 + r < n) v = *reinterpret_cast<const uint4 *>(base + (long long)(row0 + r) * stride + cc * 8);
        *reinterpret_cast<uint4 *>(smem + r * (D + 8) + cc * 8) = v;
    }
}

// One (batch b = blockIdx.z, head h = blockIdx.y, 64 queries from blockIdx.x * 64) of
// softmax(scale * q k^T) v over all n keys. Element strides (batch, head, token); the last
// dimension is contiguous. `lse` (natural log of the scaled logits' sum of exps) is written to
// lse[(b * heads + h) * n + t] when not null.
template <typename T, int D>
__device__ void flash_fwd(const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
                          T *__restrict__ o, float *__restrict__ lse, int n, int heads,
                          long long qsb, long long qsh, long long qst, long long ksb, long long ksh,
                          long long kst, long long vsb, long long vsh, long long vst, long long osb,
                          long long osh, long long ost, float scale) {
    __shared__ __align__(16) T ks[FA_BN * (D + 8)];
    __shared__ __align__(16) T vs[FA_BN * (D + 8)];
    const int b = blockIdx.z, h = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, t = lane & 3;
    const int r0 = blockIdx.x * FA_BM + warp * 16 + g, r1 = r0 + 8;
    const T *qb = q + b * qsb + h * qsh;
    const T *kb = k + b * ksb + h * ksh;
    const T *vb = v + b * vsb + h * vsh;
    const float scale_log2 = scale * 1.4426950408889634f;

    // This warp's 16 query rows as mma A fragments, straight from global memory.
    uint32_t qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const int col = kk * 16 + 2 * t;
        auto ld = [&](int r, int c) -> uint32_t {
            return r < n ? *reinterpret_cast<const uint32_t *>(qb + (long long)r * qst + c) : 0u;
        };
        qa[kk][0] = ld(r0, col);
        qa[kk][1] = ld(r1, col);
        qa[kk][2] = ld(r0, col + 8);
        qa[kk][3] = ld(r1, col + 8);
    }

    float acc[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY;  // running max of scale_log2 * s, rows r0 / r1
    float l0 = 0.f, l1 = 0.f;              // this thread's part of the running sums

    for (int n0 = 0; n0 < n; n0 += FA_BN) {
        __syncthreads();
        load_tile<T, D>(ks, kb, kst, n0, n);
        load_tile<T, D>(vs, vb, vst, n0, n);
        __syncthreads();

        float s[FA_BN / 8][4];
#pragma unroll
        for (int j = 0; j < FA_BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int j = 0; j < FA_BN / 8; ++j) {
                const T *kp = ks + (j * 8 + g) * (D + 8) + kk * 16 + 2 * t;
                uint32_t bf[2] = {*reinterpret_cast<const uint32_t *>(kp),
                                  *reinterpret_cast<const uint32_t *>(kp + 8)};
                mma16816<T>(s[j], qa[kk], bf);
            }
        }
        float mx0 = m0, mx1 = m1;
        const bool edge = n0 + FA_BN > n;
#pragma unroll
        for (int j = 0; j < FA_BN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = n0 + j * 8 + 2 * t + (e & 1);
                s[j][e] = (edge && col >= n) ? -INFINITY : s[j][e] * scale_log2;
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
        for (int j = 0; j < D / 8; ++j) {
            acc[j][0] *= a0;
            acc[j][1] *= a0;
            acc[j][2] *= a1;
            acc[j][3] *= a1;
        }
        // acc += P V: the score accumulators are already laid out as the A fragments of P.
#pragma unroll
        for (int kk = 0; kk < FA_BN / 16; ++kk) {
            uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            const int mat = lane >> 3, row = lane & 7;
#pragma unroll
            for (int j = 0; j < D / 8; j += 2) {
                uint32_t bf[4];
                const T *vp = vs + (kk * 16 + (mat & 1) * 8 + row) * (D + 8) + j * 8 + (mat >> 1) * 8;
                ldmatrix_x4_trans(bf, vp);
                mma16816<T>(acc[j], pa, bf);
                mma16816<T>(acc[j + 1], pa, bf + 2);
            }
        }
    }

    l0 += __shfl_xor_sync(FULL_MASK, l0, 1);
    l0 += __shfl_xor_sync(FULL_MASK, l0, 2);
    l1 += __shfl_xor_sync(FULL_MASK, l1, 1);
    l1 += __shfl_xor_sync(FULL_MASK, l1, 2);
    const float inv0 = 1.f / l0, inv1 = 1.f / l1;
    T *ob = o + b * osb + h * osh;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
        const int col = j * 8 + 2 * t;
        if (r0 < n)
            *reinterpret_cast<uint32_t *>(ob + (long long)r0 * ost + col) =
                pack2<T>(acc[j][0] * inv0, acc[j][1] * inv0);
        if (r1 < n)
            *reinterpret_cast<uint32_t *>(ob + (long long)r1 * ost + col) =
                pack2<T>(acc[j][2] * inv1, acc[j][3] * inv1);
    }
    if (lse != nullptr && t == 0) {
        const float ln2 = 0.6931471805599453f;
        float *lb = lse + (long long)(b * heads + h) * n;
        if (r0 < n) lb[r0] = (m0 + log2f(l0)) * ln2;
        if (r1 < n) lb[r1] = (m1 + log2f(l1)) * ln2;
    }
}

#define FLASH(NAME, T, D)                                                                             \
    extern "C" __global__ void __launch_bounds__(FA_THREADS)                                          \
        NAME(const T *q, const T *k, const T *v, T *o, float *lse, int n, int heads, long long qsb,    \
             long long qsh, long long qst, long long ksb, long long ksh, long long kst, long long vsb, \
             long long vsh, long long vst, long long osb, long long osh, long long ost, float scale) { \
        flash_fwd<T, D>(q, k, v, o, lse, n, heads, qsb, qsh, qst, ksb, ksh, kst, vsb, vsh, vst, osb,  \
                        osh, ost, scale);                                                             \
    }

FLASH(flash_fwd_bf16_32, __nv_bfloat16, 32)
FLASH(flash_fwd_bf16_48, __nv_bfloat16, 48)
FLASH(flash_fwd_bf16_64, __nv_bfloat16, 64)
FLASH(flash_fwd_bf16_80, __nv_bfloat16, 80)
FLASH(flash_fwd_bf16_96, __nv_bfloat16, 96)
FLASH(flash_fwd_bf16_128, __nv_bfloat16, 128)
FLASH(flash_fwd_f16_32, __half, 32)
FLASH(flash_fwd_f16_48, __half, 48)
FLASH(flash_fwd_f16_64, __half, 64)
FLASH(flash_fwd_f16_80, __half, 80)
FLASH(flash_fwd_f16_96, __half, 96)
FLASH(flash_fwd_f16_128, __half, 128)

#endif  // __CUDA_ARCH__ >= 800

// ---- LayerNorm: one warp per row, two passes over the row (mean, then centred variance) in f32.
template <typename T>
__device__ void layer_norm(const T *__restrict__ x, const float *__restrict__ w, const float *__restrict__ bias,
                           T *__restrict__ y, int rows, int dim, float eps) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T *xr = x + (long long)row * dim;
    T *yr = y + (long long)row * dim;
    float sum = 0.f;
    for (int c = lane * 8; c < dim; c += 256) {
        uint4 raw = *reinterpret_cast<const uint4 *>(xr + c);
        const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
        for (int i = 0; i < 8; ++i) sum += to_float(e[i]);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(FULL_MASK, sum, off);
    const float mean = sum / dim;
    float var = 0.f;
    for (int c = lane * 8; c < dim; c += 256) {
        uint4 raw = *reinterpret_cast<const uint4 *>(xr + c);
        const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float d = to_float(e[i]) - mean;
            var += d * d;
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) var += __shfl_xor_sync(FULL_MASK, var, off);
    const float inv = rsqrtf(var / dim + eps);
    for (int c = lane * 8; c < dim; c += 256) {
        uint4 raw = *reinterpret_cast<const uint4 *>(xr + c);
        const T *e = reinterpret_cast<const T *>(&raw);
        uint4 out;
        T *oe = reinterpret_cast<T *>(&out);
#pragma unroll
        for (int i = 0; i < 8; ++i) oe[i] = from_float<T>((to_float(e[i]) - mean) * inv * w[c + i] + bias[c + i]);
        *reinterpret_cast<uint4 *>(yr + c) = out;
    }
}

extern "C" __global__ void layer_norm_bf16(const __nv_bfloat16 *x, const float *w, const float *b,
                                           __nv_bfloat16 *y, int rows, int dim, float eps) {
    layer_norm(x, w, b, y, rows, dim, eps);
}
extern "C" __global__ void layer_norm_f16(const __half *x, const float *w, const float *b, __half *y,
                                          int rows, int dim, float eps) {
    layer_norm(x, w, b, y, rows, dim, eps);
}

// ---- SwiGLU of a packed fc1 output: 8 outputs per thread.
template <typename T>
__device__ void swiglu(const T *__restrict__ x, T *__restrict__ y, long long rows, int hidden) {
    const long long chunks = rows * (hidden / 8);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < chunks;
         i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / (hidden / 8);
        const int c = (int)(i % (hidden / 8)) * 8;
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
