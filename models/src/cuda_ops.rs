//! Fused CUDA paths for half-precision inference (bf16 / f16 on sm_80 and newer).
//!
//! candle 0.11 runs a linear layer as a cuBLAS product plus a separate broadcast bias add, a
//! LayerNorm as three kernels through f32, and attention by materialising every score. On an H200
//! the ViT-g block spent more time in those extra passes than in its products, and the slide
//! encoder's dilated attention wrote ~11.5 G f32 scores per layer at 100k tiles. Here:
//!
//! - [`linear`]: one cuBLASLt product with the bias in its epilogue and the residual as its C
//!   input (`beta = 1`, no copy), descriptors and algorithm chosen once per shape;
//! - [`flash_attention`]: a FlashAttention-2 style kernel (tensor cores, online softmax, the
//!   log-sum-exp the dilated-attention branch mix needs), reading any (batch, head, token)
//!   strides, so the tile encoder's packed qkv is read in place;
//! - [`dilated_attention`]: LongNet's branches through the same kernel, each reading its segments
//!   and head groups in place and writing dense outputs and lses, then one mix kernel;
//! - [`layer_norm`] (optionally after GELU) and [`swiglu`]: one pass each, half in and out.
//!
//! Every function returns `Ok(None)` when its fast path does not apply (CPU, f32, a tensor that
//! needs a gradient, unsupported shapes or alignment, compute capability below 8.0, or
//! `GIGAPATH_CUDA_KERNELS=0`); the caller then runs the plain candle ops. Without the `cuda`
//! feature the same functions exist and always return `None`.

use candle_core::{DType, Device, Result, Tensor};

/// Whether the fused kernels may run for a `dtype` tensor on `device` (no gradient considered).
pub fn available(device: &Device, dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16) && imp::device_ok(device)
}

/// [`available`] for `t`, and `t` needs no gradient.
pub fn applies(t: &Tensor) -> bool {
    available(t.device(), t.dtype()) && !crate::nn::needs_grad(t)
}

/// One (batch, head, token) strided operand of [`flash_attention`]: element `offset + b * batch +
/// h * head + t * token` starts the row of token t; its `head_dim` values are contiguous.
#[derive(Debug, Clone, Copy)]
pub struct Strided<'a> {
    pub tensor: &'a Tensor,
    pub offset: usize,
    pub batch: usize,
    pub head: usize,
    pub token: usize,
}

/// Shape of one [`flash_attention`] call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub tokens: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// `softmax(scale * q k^T) v` without masking -> out `[batch, tokens, heads, head_dim]`
/// (contiguous). [`dilated_attention`] runs the same kernel with its log-sum-exp.
pub fn flash_attention(
    q: Strided,
    k: Strided,
    v: Strided,
    shape: AttentionShape,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    return imp::flash_attention(q, k, v, shape);
    #[cfg(not(feature = "cuda"))]
    no_cuda((q, k, v, shape))
}

/// LongNet dilated attention of `q`, `k`, `v` `[L, H, Dh]` (each row of H x Dh contiguous, any
/// row stride, e.g. views into one packed `[L, 3, H, Dh]` projection) over `branches`, exactly
/// as [`crate::dilated_attention::DilatedAttention::forward`]: one flash launch per branch reads
/// its segments and head groups in place (no gather) and writes outputs and lses to their dense
/// positions (no scatter); one kernel mixes the branches. Lengths must pass
/// [`crate::dilated_attention::Branch::check_len`]. At most 8 branches.
pub fn dilated_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    branches: &[crate::dilated_attention::Branch],
    scale: f32,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    return imp::dilated_attention(q, k, v, branches, scale);
    #[cfg(not(feature = "cuda"))]
    no_cuda((q, k, v, branches, scale))
}

/// `x [rows, in] @ w^T [in, out] + bias (+ residual [rows, out])` in one cuBLASLt call.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    return imp::linear(x, w, bias, residual);
    #[cfg(not(feature = "cuda"))]
    no_cuda((x, w, bias, residual))
}

/// LayerNorm over the last dimension with f32 `weight` / `bias`; output in `x`'s dtype. With
/// `gelu`, of `gelu_erf(x)` (rounded to `x`'s dtype first, as two separate ops would).
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    gelu: bool,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    return imp::layer_norm(x, weight, bias, eps, gelu);
    #[cfg(not(feature = "cuda"))]
    no_cuda((x, weight, bias, eps, gelu))
}

/// `silu(x[.., :H]) * x[.., H:]` of a packed `[.., 2H]` tensor -> `[.., H]`.
pub fn swiglu(x: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    return imp::swiglu(x);
    #[cfg(not(feature = "cuda"))]
    no_cuda(x)
}

/// Without the `cuda` feature every fused path declines.
#[cfg(not(feature = "cuda"))]
fn no_cuda<A, T>(_: A) -> Result<Option<T>> {
    Ok(None)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    pub fn device_ok(_: &candle_core::Device) -> bool {
        false
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    use candle_core::cuda_backend::cudarc::driver::sys::{
        CUdevice_attribute, CUfunction_attribute,
    };
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaDevice, CudaStorage, Shape, Storage};
    use half::{bf16, f16};

    use super::*;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
    const MODULE: &str = "gigapath_kernels";
    /// Keys per flash-attention iteration (kernels.cu `FA_BN`).
    const FA_BN: usize = 64;
    const HEAD_DIMS: [usize; 6] = [32, 48, 64, 80, 96, 128];

    fn cuda(device: &Device) -> Option<&CudaDevice> {
        match device {
            Device::Cuda(d) => Some(d),
            _ => None,
        }
    }

    pub fn device_ok(device: &Device) -> bool {
        static ENABLED: OnceLock<bool> = OnceLock::new();
        static MAJOR: OnceLock<Mutex<HashMap<usize, i32>>> = OnceLock::new();
        let Some(dev) = cuda(device) else {
            return false;
        };
        let enabled = *ENABLED.get_or_init(|| {
            std::env::var("GIGAPATH_CUDA_KERNELS").map_or(true, |v| v.trim() != "0")
        });
        if !enabled {
            return false;
        }
        let ordinal = dev.cuda_stream().context().ordinal();
        let mut majors = MAJOR
            .get_or_init(Default::default)
            .lock()
            .expect("poisoned");
        let major = *majors.entry(ordinal).or_insert_with(|| {
            dev.cuda_stream()
                .context()
                .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                .unwrap_or(0)
        });
        major >= 8
    }

    /// A typed view of `t`'s storage from its layout's start plus `extra` elements, and the number
    /// of elements from there. `t` must be on CUDA with element type `T`.
    fn with_view<T: CudaDType + DeviceRepr, R>(
        t: &Tensor,
        extra: usize,
        f: impl FnOnce(CudaView<'_, T>, &CudaDevice) -> Result<R>,
    ) -> Result<R> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            candle_core::bail!("cuda_ops: tensor is not on a CUDA device")
        };
        let slice = cs.as_cuda_slice::<T>()?;
        let start = layout.start_offset() + extra;
        f(slice.slice(start..), &cs.device)
    }

    fn wrap<T: CudaDType + DeviceRepr>(
        slice: CudaSlice<T>,
        dev: &CudaDevice,
        shape: impl Into<Shape>,
    ) -> Tensor {
        let storage = CudaStorage::wrap_cuda_slice(slice, dev.clone());
        Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
    }

    fn suffix(dtype: DType) -> &'static str {
        if dtype == DType::BF16 {
            "bf16"
        } else {
            "f16"
        }
    }

    /// Start offset (elements) of a contiguous tensor, or `None` when it is not contiguous.
    fn contiguous_start(t: &Tensor) -> Option<usize> {
        t.layout().contiguous_offsets().map(|(start, _)| start)
    }

    pub fn flash_attention(
        q: Strided,
        k: Strided,
        v: Strided,
        shape: AttentionShape,
    ) -> Result<Option<Tensor>> {
        let AttentionShape {
            batch,
            heads,
            tokens,
            head_dim,
            ..
        } = shape;
        let dtype = q.tensor.dtype();
        let usable = [&q, &k, &v].iter().all(|s| {
            applies(s.tensor)
                && s.tensor.dtype() == dtype
                && s.tensor.device().same_device(q.tensor.device())
                && contiguous_start(s.tensor).is_some_and(|o| (o + s.offset) % 8 == 0)
                && [s.batch, s.head, s.token].iter().all(|x| x % 8 == 0)
                && s.offset
                    + (batch.max(1) - 1) * s.batch
                    + (heads.max(1) - 1) * s.head
                    + (tokens.max(1) - 1) * s.token
                    + head_dim
                    <= s.tensor.elem_count()
        });
        if !usable
            || !HEAD_DIMS.contains(&head_dim)
            || batch == 0
            || tokens == 0
            || batch > 65_535
            || heads > 65_535
            || tokens > i32::MAX as usize
        {
            return Ok(None);
        }
        match dtype {
            DType::BF16 => flash_typed::<bf16>(q, k, v, shape).map(Some),
            DType::F16 => flash_typed::<f16>(q, k, v, shape).map(Some),
            _ => Ok(None),
        }
    }

    /// kernels.cu `Geom`: element strides of batch, head, head group, token.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    struct Geom {
        b: i64,
        h: i64,
        g: i64,
        t: i64,
    }

    /// kernels.cu `FlashArgs` (same field order; passed by value).
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    struct FlashArgs {
        q: Geom,
        k: Geom,
        v: Geom,
        o: Geom,
        lse: Geom,
        pos_b: i64,
        pos_t: i64,
        seq_len: i64,
        n: i32,
        heads: i32,
        group: i32,
        scale: f32,
    }

    // Safety: plain old data with the kernel's C layout.
    unsafe impl DeviceRepr for FlashArgs {}

    /// One flash launch over (`batch`, `args.heads`) problems of `args.n` tokens.
    #[allow(clippy::too_many_arguments)]
    fn launch_flash<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        dtype: DType,
        head_dim: usize,
        batch: usize,
        (q, k, v): (&CudaView<'_, T>, &CudaView<'_, T>, &CudaView<'_, T>),
        out: &CudaSlice<T>,
        lse: Option<&CudaSlice<f32>>,
        args: FlashArgs,
    ) -> Result<()> {
        // Long problems: 8 warps (128 queries) share each key / value tile; short ones (the tile
        // encoder's 257 tokens) waste less padding with 4 warps.
        let warps: u32 = if args.n >= 1024 { 8 } else { 4 };
        let name = format!("flash_fwd_{}_{head_dim}_w{warps}", suffix(dtype));
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        // Two stages of key and value tiles, 64 rows of head_dim + 8 elements each.
        let smem = (4 * FA_BN * (head_dim + 8) * std::mem::size_of::<T>()) as u32;
        if smem > 48 * 1024 {
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .w()?;
        }
        let null: u64 = 0;
        let mut b = func.builder();
        b.arg(q);
        b.arg(k);
        b.arg(v);
        b.arg(out);
        match lse {
            Some(l) => b.arg(l),
            None => b.arg(&null),
        };
        b.arg(&args);
        let cfg = LaunchConfig {
            grid_dim: (
                (args.n as u32).div_ceil(16 * warps),
                args.heads as u32,
                batch as u32,
            ),
            block_dim: (32 * warps, 1, 1),
            shared_mem_bytes: smem,
        };
        // Safety: the callers check that every row the geometry reaches is inside its tensor.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    fn flash_typed<T: CudaDType + DeviceRepr>(
        q: Strided,
        k: Strided,
        v: Strided,
        shape: AttentionShape,
    ) -> Result<Tensor> {
        let AttentionShape {
            batch,
            heads,
            tokens,
            head_dim,
            scale,
        } = shape;
        let dtype = q.tensor.dtype();
        let geom = |s: &Strided| Geom {
            b: s.batch as i64,
            h: s.head as i64,
            g: 0,
            t: s.token as i64,
        };
        let args = FlashArgs {
            q: geom(&q),
            k: geom(&k),
            v: geom(&v),
            // out [batch, tokens, heads, head_dim]; no lse
            o: Geom {
                b: (tokens * heads * head_dim) as i64,
                h: head_dim as i64,
                g: 0,
                t: (heads * head_dim) as i64,
            },
            lse: Geom::default(),
            pos_b: 0,
            pos_t: 1,
            seq_len: tokens as i64,
            n: tokens as i32,
            heads: heads as i32,
            group: heads as i32,
            scale,
        };
        with_view::<T, _>(q.tensor, q.offset, |qv, dev| {
            with_view::<T, _>(k.tensor, k.offset, |kv, _| {
                with_view::<T, _>(v.tensor, v.offset, |vv, _| {
                    // Safety: every element is written by the kernel before it is read.
                    let out = unsafe { dev.alloc::<T>(batch * tokens * heads * head_dim)? };
                    let views = (&qv, &kv, &vv);
                    launch_flash(dev, dtype, head_dim, batch, views, &out, None, args)?;
                    Ok(wrap(out, dev, (batch, tokens, heads, head_dim)))
                })
            })
        })
    }

    pub fn dilated_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        branches: &[crate::dilated_attention::Branch],
        scale: f32,
    ) -> Result<Option<Tensor>> {
        let Ok((l, heads, dh)) = q.dims3() else {
            return Ok(None);
        };
        let dtype = q.dtype();
        // Rows of H x Dh contiguous values, any row stride (views into a packed qkv included).
        let usable = [q, k, v].iter().all(|t| {
            let stride = t.stride();
            applies(t)
                && t.dtype() == dtype
                && t.dims() == [l, heads, dh]
                && t.device().same_device(q.device())
                && stride[1..] == [dh, 1]
                && stride[0] >= heads * dh
                && stride[0] % 8 == 0
                && t.layout().start_offset() % 8 == 0
        }) && HEAD_DIMS.contains(&dh)
            && l > 0
            && heads > 0
            && heads <= 65_535
            && !branches.is_empty()
            && branches.len() <= 8
            && branches
                .iter()
                .all(|b| b.ratio > 0 && b.check_len(l).is_ok() && b.segments(l).1 <= 65_535)
            && l * heads < i32::MAX as usize
            && l * heads * dh / 8 < (1 << 31); // the mix kernel's 32-bit chunk index
        if !usable {
            return Ok(None);
        }
        match dtype {
            DType::BF16 => dilated_typed::<bf16>(q, k, v, branches, scale).map(Some),
            DType::F16 => dilated_typed::<f16>(q, k, v, branches, scale).map(Some),
            _ => Ok(None),
        }
    }

    fn dilated_typed<T: CudaDType + DeviceRepr>(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        branches: &[crate::dilated_attention::Branch],
        scale: f32,
    ) -> Result<Tensor> {
        let (l, heads, dh) = q.dims3()?;
        let dtype = q.dtype();
        let grid = l * heads;
        with_view::<T, _>(q, 0, |qv, dev| {
            with_view::<T, _>(k, 0, |kv, _| {
                with_view::<T, _>(v, 0, |vv, _| {
                    let mut outs = Vec::with_capacity(branches.len());
                    let mut lses = Vec::with_capacity(branches.len());
                    for branch in branches {
                        let r = branch.ratio;
                        let (s, segments) = branch.segments(l);
                        // [L, H, Dh] rows: position p, head h at p * row + h * Dh; the problem
                        // (segment b, head h) reads positions b * s + h / group + r * t.
                        let dense = |row: usize| Geom {
                            b: (s * row) as i64,
                            h: dh as i64,
                            g: row as i64,
                            t: (r * row) as i64,
                        };
                        let args = FlashArgs {
                            q: dense(q.stride()[0]),
                            k: dense(k.stride()[0]),
                            v: dense(v.stride()[0]),
                            o: dense(heads * dh),
                            lse: Geom {
                                b: (s * heads) as i64,
                                h: 1,
                                g: heads as i64,
                                t: (r * heads) as i64,
                            },
                            pos_b: s as i64,
                            pos_t: r as i64,
                            seq_len: l as i64,
                            n: s.div_ceil(r) as i32,
                            heads: heads as i32,
                            // The reference pads heads to a multiple of r: groups of ceil(H / r).
                            group: heads.div_ceil(r) as i32,
                            scale,
                        };
                        // Safety: rows a branch does not cover stay unwritten; their lse stays 0,
                        // which the mix reads as "not covered" and skips.
                        let out = unsafe { dev.alloc::<T>(grid * dh)? };
                        let lse = dev.alloc_zeros::<f32>(grid)?;
                        let views = (&qv, &kv, &vv);
                        launch_flash(dev, dtype, dh, segments, views, &out, Some(&lse), args)?;
                        outs.push(out);
                        lses.push(lse);
                    }
                    let func = dev.get_or_load_custom_func(
                        &format!("dilated_mix_{}", suffix(dtype)),
                        MODULE,
                        PTX,
                    )?;
                    // Safety: the kernel writes every element.
                    let y = unsafe { dev.alloc::<T>(grid * dh)? };
                    let (nb, rows, dim) = (branches.len() as i32, grid as i64, dh as i32);
                    let null: u64 = 0;
                    let mut b = func.builder();
                    for i in 0..8 {
                        match outs.get(i) {
                            Some(o) => b.arg(o),
                            None => b.arg(&null),
                        };
                    }
                    for i in 0..8 {
                        match lses.get(i) {
                            Some(x) => b.arg(x),
                            None => b.arg(&null),
                        };
                    }
                    b.arg(&nb);
                    b.arg(&y);
                    b.arg(&rows);
                    b.arg(&dim);
                    let chunks = grid * dh / 8;
                    let cfg = LaunchConfig {
                        grid_dim: (chunks.div_ceil(256).min(1 << 20) as u32, 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // Safety: every branch buffer holds grid x dh elements.
                    unsafe { b.launch(cfg) }.w()?;
                    Ok(wrap(y, dev, (l, heads, dh)))
                })
            })
        })
    }

    /// cuBLASLt with what the safe wrapper of cudarc lacks: the residual as a separate C input
    /// (`D = W x + bias + C`, no copy of the residual into the output first) and one descriptor
    /// set and heuristic choice per shape, kept for the process (the wrapper rebuilt both on every
    /// call).
    mod lt {
        use std::collections::HashMap;
        use std::sync::{Arc, Mutex, OnceLock};

        use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
        use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
        use candle_core::{CudaDevice, DType, Result};

        fn err(e: impl std::fmt::Debug) -> candle_core::Error {
            candle_core::Error::Msg(format!("cuBLASLt: {e:?}"))
        }

        /// What selects a descriptor set and an algorithm.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        struct Key {
            half: bool,
            m: u64,
            n: u64,
            k: u64,
            bias: bool,
            residual: bool,
            /// Guaranteed byte alignment of A, B, C, D (powers of two, at most 256).
            align: [u32; 4],
        }

        struct Plan {
            desc: sys::cublasLtMatmulDesc_t,
            a: sys::cublasLtMatrixLayout_t,
            b: sys::cublasLtMatrixLayout_t,
            c: sys::cublasLtMatrixLayout_t,
            algo: sys::cublasLtMatmulAlgo_t,
        }

        impl Drop for Plan {
            fn drop(&mut self) {
                // Safety: created by `Lt::plan`, destroyed once.
                unsafe {
                    let _ = result::destroy_matrix_layout(self.a);
                    let _ = result::destroy_matrix_layout(self.b);
                    let _ = result::destroy_matrix_layout(self.c);
                    let _ = result::destroy_matmul_desc(self.desc);
                }
            }
        }

        pub struct Lt {
            handle: sys::cublasLtHandle_t,
            workspace: CudaSlice<u8>,
            plans: Mutex<HashMap<Key, Plan>>,
        }

        // Safety: the handle and descriptors are only used under the `plans` lock.
        unsafe impl Send for Lt {}
        unsafe impl Sync for Lt {}

        /// Workspace NVIDIA recommends for Hopper (and more than enough before it).
        const WORKSPACE: usize = 32 << 20;

        /// One handle and workspace per candle device (each has its own stream, and a
        /// workspace must not be shared across streams).
        pub fn get(dev: &CudaDevice) -> Result<Arc<Lt>> {
            type Devices = HashMap<candle_core::cuda_backend::DeviceId, Arc<Lt>>;
            static ALL: OnceLock<Mutex<Devices>> = OnceLock::new();
            let mut all = ALL.get_or_init(Default::default).lock().expect("poisoned");
            if let Some(lt) = all.get(&dev.id()) {
                return Ok(lt.clone());
            }
            let lt = Arc::new(Lt {
                handle: result::create_handle().map_err(err)?,
                workspace: dev.alloc_zeros::<u8>(WORKSPACE)?,
                plans: Mutex::new(HashMap::new()),
            });
            all.insert(dev.id(), lt.clone());
            Ok(lt)
        }

        fn alignment(ptr: u64) -> u32 {
            1u32 << (ptr.trailing_zeros().min(8))
        }

        impl Lt {
            fn plan(&self, key: Key) -> Result<Plan> {
                let ty = match key.half {
                    true => sys::cudaDataType_t::CUDA_R_16F,
                    false => sys::cudaDataType_t::CUDA_R_16BF,
                };
                let desc = result::create_matmul_desc(
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cudaDataType_t::CUDA_R_32F,
                )
                .map_err(err)?;
                let (m, n, k) = (key.m, key.n, key.k);
                let plan = Plan {
                    desc,
                    // A = W stored [m, k] row-major = k x m column-major, used transposed.
                    a: result::create_matrix_layout(ty, k, m, k as i64).map_err(err)?,
                    b: result::create_matrix_layout(ty, k, n, k as i64).map_err(err)?,
                    c: result::create_matrix_layout(ty, m, n, m as i64).map_err(err)?,
                    // Safety: a plain-data struct (an array of integers), filled below.
                    algo: unsafe { std::mem::zeroed() },
                };
                let set_desc = |attr, value: u32| {
                    // Safety: a 4-byte attribute of a live descriptor.
                    unsafe {
                        result::set_matmul_desc_attribute(
                            desc,
                            attr,
                            (&value) as *const u32 as *const _,
                            std::mem::size_of::<u32>(),
                        )
                    }
                    .map_err(err)
                };
                use sys::cublasLtMatmulDescAttributes_t as D;
                set_desc(D::CUBLASLT_MATMUL_DESC_TRANSA, 1)?;
                set_desc(D::CUBLASLT_MATMUL_DESC_TRANSB, 0)?;
                if key.bias {
                    set_desc(
                        D::CUBLASLT_MATMUL_DESC_EPILOGUE,
                        sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as u32,
                    )?;
                }
                let pref = result::create_matmul_pref().map_err(err)?;
                let found = (|| {
                    use sys::cublasLtMatmulPreferenceAttributes_t as P;
                    let workspace = WORKSPACE as u64;
                    // Safety: attributes of a live preference, with their documented sizes.
                    unsafe {
                        result::set_matmul_pref_attribute(
                            pref,
                            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                            (&workspace) as *const u64 as *const _,
                            std::mem::size_of::<u64>(),
                        )?;
                        for (attr, align) in [
                            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                        ]
                        .into_iter()
                        .zip(key.align)
                        {
                            result::set_matmul_pref_attribute(
                                pref,
                                attr,
                                (&align) as *const u32 as *const _,
                                std::mem::size_of::<u32>(),
                            )?;
                        }
                        result::get_matmul_algo_heuristic(
                            self.handle,
                            desc,
                            plan.a,
                            plan.b,
                            plan.c,
                            plan.c,
                            pref,
                        )
                    }
                })();
                // Safety: created above, destroyed once.
                unsafe {
                    let _ = result::destroy_matmul_pref(pref);
                }
                // On an error `plan` drops here and frees its descriptors.
                let mut plan = plan;
                plan.algo = found.map_err(err)?.algo;
                Ok(plan)
            }

            /// `out [n, m] (row-major) = x [n, k] w^T + bias + residual`, all contiguous, one
            /// stream (the device's).
            #[allow(clippy::too_many_arguments)]
            pub fn linear<T, X: DevicePtr<T>>(
                &self,
                dev: &CudaDevice,
                dtype: DType,
                (rows, inner, out_dim): (usize, usize, usize),
                x: &X,
                w: &X,
                bias: Option<&X>,
                residual: Option<&X>,
                out: &mut CudaSlice<T>,
            ) -> Result<()> {
                let stream = dev.cuda_stream();
                let (xp, _gx) = x.device_ptr(&stream);
                let (wp, _gw) = w.device_ptr(&stream);
                let (op, _go) = out.device_ptr(&stream);
                let bias = bias.map(|b| b.device_ptr(&stream));
                let residual = residual.map(|r| r.device_ptr(&stream));
                let cp = residual.as_ref().map_or(op, |r| r.0);
                let key = Key {
                    half: dtype == DType::F16,
                    m: out_dim as u64,
                    n: rows as u64,
                    k: inner as u64,
                    bias: bias.is_some(),
                    residual: residual.is_some(),
                    align: [alignment(wp), alignment(xp), alignment(cp), alignment(op)],
                };
                let mut plans = self.plans.lock().expect("poisoned");
                if let std::collections::hash_map::Entry::Vacant(e) = plans.entry(key) {
                    e.insert(self.plan(key)?);
                }
                let plan = &plans[&key];
                if let Some((bp, _)) = &bias {
                    // Safety: the pointer attribute of a live descriptor, set under the lock.
                    unsafe {
                        result::set_matmul_desc_attribute(
                            plan.desc,
                            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                            bp as *const u64 as *const _,
                            std::mem::size_of::<u64>(),
                        )
                    }
                    .map_err(err)?;
                }
                let (alpha, beta) = (1f32, if residual.is_some() { 1f32 } else { 0f32 });
                let (ws, _gws) = self.workspace.device_ptr(&stream);
                // Safety: the layouts describe the contiguous operands the caller checked; the
                // algorithm was chosen for these shapes and alignments.
                unsafe {
                    result::matmul(
                        self.handle,
                        plan.desc,
                        (&alpha) as *const f32 as *const _,
                        (&beta) as *const f32 as *const _,
                        wp as *const _,
                        plan.a,
                        xp as *const _,
                        plan.b,
                        cp as *const _,
                        plan.c,
                        op as *mut _,
                        plan.c,
                        &plan.algo,
                        ws as *mut _,
                        WORKSPACE,
                        stream.cu_stream() as *mut _,
                    )
                }
                .map_err(err)
            }
        }
    }

    pub fn linear(
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let (Ok((rows, inner)), Ok((out_dim, w_inner))) = (x.dims2(), w.dims2()) else {
            return Ok(None);
        };
        let dtype = x.dtype();
        let mut operands = vec![x, w];
        operands.extend(bias);
        operands.extend(residual);
        let usable = applies(x)
            && inner == w_inner
            && rows > 0
            && operands.iter().all(|t| {
                t.dtype() == dtype
                    && !crate::nn::needs_grad(t)
                    && t.device().same_device(x.device())
                    && contiguous_start(t).is_some()
            })
            && bias.is_none_or(|b| b.dims() == [out_dim])
            && residual.is_none_or(|r| r.dims() == [rows, out_dim]);
        if !usable {
            return Ok(None);
        }
        match dtype {
            DType::BF16 => linear_typed::<bf16>(x, w, bias, residual).map(Some),
            DType::F16 => linear_typed::<f16>(x, w, bias, residual).map(Some),
            _ => Ok(None),
        }
    }

    fn linear_typed<T: CudaDType + DeviceRepr>(
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (rows, inner) = x.dims2()?;
        let out_dim = w.dim(0)?;
        let dtype = x.dtype();
        with_view::<T, _>(x, 0, |xv, dev| {
            with_view::<T, _>(w, 0, |wv, _| {
                // Safety: the product writes every element.
                let mut out = unsafe { dev.alloc::<T>(rows * out_dim)? };
                let lt = lt::get(dev)?;
                let shape = (rows, inner, out_dim);
                let run =
                    |b: Option<&CudaView<'_, T>>, r: Option<&CudaView<'_, T>>, out: &mut _| {
                        lt.linear(dev, dtype, shape, &xv, &wv, b, r, out)
                    };
                match (bias, residual) {
                    (Some(b), Some(r)) => with_view::<T, _>(b, 0, |bv, _| {
                        with_view::<T, _>(r, 0, |rv, _| run(Some(&bv), Some(&rv), &mut out))
                    })?,
                    (Some(b), None) => {
                        with_view::<T, _>(b, 0, |bv, _| run(Some(&bv), None, &mut out))?
                    }
                    (None, Some(r)) => {
                        with_view::<T, _>(r, 0, |rv, _| run(None, Some(&rv), &mut out))?
                    }
                    (None, None) => run(None, None, &mut out)?,
                }
                Ok(wrap(out, dev, (rows, out_dim)))
            })
        })
    }

    pub fn layer_norm(
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        eps: f64,
        gelu: bool,
    ) -> Result<Option<Tensor>> {
        let dim = x.dim(candle_core::D::Minus1)?;
        let usable = applies(x)
            && dim > 0
            && dim % 8 == 0
            && dim <= 8192
            && contiguous_start(x).is_some_and(|o| o % 8 == 0)
            && [weight, bias].iter().all(|t| {
                t.dtype() == DType::F32
                    && t.dims() == [dim]
                    && !crate::nn::needs_grad(t)
                    && t.device().same_device(x.device())
                    && contiguous_start(t).is_some()
            });
        let rows = x.elem_count() / dim.max(1);
        if !usable || rows == 0 || rows > i32::MAX as usize {
            return Ok(None);
        }
        let prefix = if gelu {
            "gelu_layer_norm"
        } else {
            "layer_norm"
        };
        let name = format!("{prefix}_{}", suffix(x.dtype()));
        match x.dtype() {
            DType::BF16 => ln_typed::<bf16>(x, weight, bias, eps, rows, dim, &name).map(Some),
            _ => ln_typed::<f16>(x, weight, bias, eps, rows, dim, &name).map(Some),
        }
    }

    fn ln_typed<T: CudaDType + DeviceRepr>(
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        eps: f64,
        rows: usize,
        dim: usize,
        name: &str,
    ) -> Result<Tensor> {
        with_view::<T, _>(x, 0, |xv, dev| {
            with_view::<f32, _>(weight, 0, |wv, _| {
                with_view::<f32, _>(bias, 0, |bv, _| {
                    // Up to 2048 values a row fits one warp's registers: a warp per row, eight
                    // rows per block. Longer rows: a block per row, a thread per 8 values.
                    let warp = dim <= 2048;
                    let name = match warp {
                        true => name.replace("layer_norm_", "layer_norm_warp_"),
                        false => name.to_string(),
                    };
                    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
                    // Safety: the kernel writes every element.
                    let out = unsafe { dev.alloc::<T>(rows * dim)? };
                    let (r, d, e) = (rows as i32, dim as i32, eps as f32);
                    let mut b = func.builder();
                    b.arg(&xv);
                    b.arg(&wv);
                    b.arg(&bv);
                    b.arg(&out);
                    if warp {
                        b.arg(&r);
                    }
                    b.arg(&d);
                    b.arg(&e);
                    let cfg = match warp {
                        true => LaunchConfig {
                            grid_dim: (rows.div_ceil(8) as u32, 1, 1),
                            block_dim: (256, 1, 1),
                            shared_mem_bytes: 0,
                        },
                        false => LaunchConfig {
                            grid_dim: (rows as u32, 1, 1),
                            block_dim: ((dim / 8).div_ceil(32) as u32 * 32, 1, 1),
                            shared_mem_bytes: 0,
                        },
                    };
                    // Safety: rows x dim contiguous elements, dim a multiple of 8, <= 8192.
                    unsafe { b.launch(cfg) }.w()?;
                    Ok(wrap(out, dev, x.shape().clone()))
                })
            })
        })
    }

    pub fn swiglu(x: &Tensor) -> Result<Option<Tensor>> {
        let packed = x.dim(candle_core::D::Minus1)?;
        let hidden = packed / 2;
        let usable = applies(x)
            && packed % 16 == 0
            && hidden > 0
            && x.elem_count() / 16 < (1 << 31) // the kernel's 32-bit chunk index
            && contiguous_start(x).is_some_and(|o| o % 8 == 0);
        if !usable {
            return Ok(None);
        }
        let rows = x.elem_count() / packed;
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = hidden;
        let name = format!("swiglu_{}", suffix(x.dtype()));
        let typed = |t: DType| -> Result<Tensor> {
            match t {
                DType::BF16 => swiglu_typed::<bf16>(x, rows, hidden, &dims, &name),
                _ => swiglu_typed::<f16>(x, rows, hidden, &dims, &name),
            }
        };
        typed(x.dtype()).map(Some)
    }

    fn swiglu_typed<T: CudaDType + DeviceRepr>(
        x: &Tensor,
        rows: usize,
        hidden: usize,
        dims: &[usize],
        name: &str,
    ) -> Result<Tensor> {
        with_view::<T, _>(x, 0, |xv, dev| {
            let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
            // Safety: the kernel writes every element.
            let out = unsafe { dev.alloc::<T>(rows * hidden)? };
            let (r, h) = (rows as i64, hidden as i32);
            let chunks = rows * hidden / 8;
            let mut b = func.builder();
            b.arg(&xv);
            b.arg(&out);
            b.arg(&r);
            b.arg(&h);
            let cfg = LaunchConfig {
                grid_dim: (chunks.div_ceil(256).min(1 << 20) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // Safety: rows x 2 hidden contiguous elements in, rows x hidden out.
            unsafe { b.launch(cfg) }.w()?;
            Ok(wrap(out, dev, dims))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Off CUDA every fused path declines, so callers run candle's ops (the CPU parity tests
    /// cover those); the kernels themselves are checked on a GPU by `bench_encoders kernels`.
    #[test]
    fn cpu_tensors_take_the_plain_path() -> Result<()> {
        let dev = Device::Cpu;
        assert!(!available(&dev, DType::BF16));
        assert!(!available(&dev, DType::F32));
        let x = Tensor::ones((4, 16), DType::F32, &dev)?;
        let w = Tensor::ones((8, 16), DType::F32, &dev)?;
        assert!(linear(&x, &w, None, None)?.is_none());
        let p = Tensor::ones(16, DType::F32, &dev)?;
        assert!(layer_norm(&x, &p, &p, 1e-5, true)?.is_none());
        assert!(swiglu(&x)?.is_none());
        let qkv = Tensor::ones((2, 8, 16), DType::F32, &dev)?;
        let s = Strided {
            tensor: &qkv,
            offset: 0,
            batch: 128,
            head: 0,
            token: 16,
        };
        let shape = AttentionShape {
            batch: 2,
            heads: 1,
            tokens: 8,
            head_dim: 16,
            scale: 0.25,
        };
        assert!(flash_attention(s, s, s, shape)?.is_none());
        Ok(())
    }
}
