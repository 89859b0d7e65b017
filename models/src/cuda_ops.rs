//! Fused CUDA paths for half-precision inference (bf16 / f16 on sm_80 and newer).
//!
//! candle 0.11 runs a linear layer as a cuBLAS product plus a separate broadcast bias add, a
//! LayerNorm as three kernels through f32, and attention by materialising every score. On an H200
//! the ViT-g block spent more time in those extra passes than in its products, and the slide
//! encoder's dilated attention wrote ~11.5 G f32 scores per layer at 100k tiles. Here:
//!
//! - [`linear`]: one cuBLASLt product with the bias in its epilogue, and the residual added by the
//!   product itself (`beta = 1`), as PyTorch's `addmm` does;
//! - [`flash_attention`]: a FlashAttention-2 style kernel (tensor cores, online softmax, the
//!   log-sum-exp the dilated-attention branch mix needs), reading any (batch, head, token)
//!   strides, so the tile encoder's packed qkv is read in place;
//! - [`layer_norm`] and [`swiglu`]: one pass each, half precision in and out.
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
/// (contiguous) and, when `with_lse`, the natural-log log-sum-exp `[batch, heads, tokens]` (f32).
pub fn flash_attention(
    q: Strided,
    k: Strided,
    v: Strided,
    shape: AttentionShape,
    with_lse: bool,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    imp::flash_attention(q, k, v, shape, with_lse)
}

/// `x [rows, in] @ w^T [in, out] + bias (+ residual [rows, out])` in one cuBLASLt call.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    imp::linear(x, w, bias, residual)
}

/// LayerNorm over the last dimension with f32 `weight` / `bias`; output in `x`'s dtype.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    imp::layer_norm(x, weight, bias, eps)
}

/// `silu(x[.., :H]) * x[.., H:]` of a packed `[.., 2H]` tensor -> `[.., H]`.
pub fn swiglu(x: &Tensor) -> Result<Option<Tensor>> {
    imp::swiglu(x)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;

    pub fn device_ok(_: &Device) -> bool {
        false
    }
    pub fn flash_attention(
        _: Strided,
        _: Strided,
        _: Strided,
        _: AttentionShape,
        _: bool,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
        Ok(None)
    }
    pub fn linear(
        _: &Tensor,
        _: &Tensor,
        _: Option<&Tensor>,
        _: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn layer_norm(_: &Tensor, _: &Tensor, _: &Tensor, _: f64) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn swiglu(_: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::cuda_backend::cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
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
    /// Query rows per flash-attention block (kernels.cu `FA_BM`) and threads per block.
    const FA_BM: usize = 64;
    const FA_THREADS: u32 = 128;
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
        with_lse: bool,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
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
            DType::BF16 => flash_typed::<bf16>(q, k, v, shape, with_lse).map(Some),
            DType::F16 => flash_typed::<f16>(q, k, v, shape, with_lse).map(Some),
            _ => Ok(None),
        }
    }

    fn flash_typed<T: CudaDType + DeviceRepr>(
        q: Strided,
        k: Strided,
        v: Strided,
        shape: AttentionShape,
        with_lse: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let AttentionShape {
            batch,
            heads,
            tokens,
            head_dim,
            scale,
        } = shape;
        let name = format!("flash_fwd_{}_{head_dim}", suffix(q.tensor.dtype()));
        with_view::<T, _>(q.tensor, q.offset, |qv, dev| {
            with_view::<T, _>(k.tensor, k.offset, |kv, _| {
                with_view::<T, _>(v.tensor, v.offset, |vv, _| {
                    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
                    // Safety: every element is written by the kernel before it is read.
                    let out = unsafe { dev.alloc::<T>(batch * tokens * heads * head_dim)? };
                    let lse = if with_lse {
                        Some(unsafe { dev.alloc::<f32>(batch * heads * tokens)? })
                    } else {
                        None
                    };
                    let (n, h) = (tokens as i32, heads as i32);
                    let strides = |s: &Strided| [s.batch as i64, s.head as i64, s.token as i64];
                    let (qs, ks, vs) = (strides(&q), strides(&k), strides(&v));
                    let os = [
                        (tokens * heads * head_dim) as i64,
                        head_dim as i64,
                        (heads * head_dim) as i64,
                    ];
                    let null: u64 = 0;
                    let mut b = func.builder();
                    b.arg(&qv);
                    b.arg(&kv);
                    b.arg(&vv);
                    b.arg(&out);
                    match &lse {
                        Some(l) => b.arg(l),
                        None => b.arg(&null),
                    };
                    b.arg(&n);
                    b.arg(&h);
                    for s in qs.iter().chain(&ks).chain(&vs).chain(&os) {
                        b.arg(s);
                    }
                    b.arg(&scale);
                    let cfg = LaunchConfig {
                        grid_dim: (tokens.div_ceil(FA_BM) as u32, heads as u32, batch as u32),
                        block_dim: (FA_THREADS, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // Safety: shapes, strides and bounds were checked by the caller.
                    unsafe { b.launch(cfg) }.w()?;
                    let out = wrap(out, dev, (batch, tokens, heads, head_dim));
                    let lse = lse.map(|l| wrap(l, dev, (batch, heads, tokens)));
                    Ok((out, lse))
                })
            })
        })
    }

    /// One cuBLASLt handle (and its workspace) per device.
    fn blas_lt(dev: &CudaDevice) -> Result<Arc<CudaBlasLT>> {
        static HANDLES: OnceLock<Mutex<HashMap<usize, Arc<CudaBlasLT>>>> = OnceLock::new();
        let ordinal = dev.cuda_stream().context().ordinal();
        let mut handles = HANDLES
            .get_or_init(Default::default)
            .lock()
            .expect("poisoned");
        if let Some(h) = handles.get(&ordinal) {
            return Ok(h.clone());
        }
        let handle = Arc::new(
            CudaBlasLT::new(dev.cuda_stream())
                .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt: {e:?}")))?,
        );
        handles.insert(ordinal, handle.clone());
        Ok(handle)
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
    ) -> Result<Tensor>
    where
        CudaBlasLT: Matmul<T>,
    {
        let (rows, inner) = x.dims2()?;
        let out_dim = w.dim(0)?;
        with_view::<T, _>(x, 0, |xv, dev| {
            with_view::<T, _>(w, 0, |wv, _| {
                let mut out = match residual {
                    Some(r) => with_view::<T, _>(r, 0, |rv, _| {
                        let mut out = unsafe { dev.alloc::<T>(rows * out_dim)? };
                        dev.memcpy_dtod(&rv.slice(..rows * out_dim), &mut out)?;
                        Ok(out)
                    })?,
                    // Safety: beta = 0, the product writes every element.
                    None => unsafe { dev.alloc::<T>(rows * out_dim)? },
                };
                // Row-major out [rows, out] is column-major out^T [out, rows] = w [out, in] (row-major,
                // i.e. transposed column-major) x x^T.
                let cfg = MatmulConfig {
                    transa: true,
                    transb: false,
                    transc: false,
                    m: out_dim as u64,
                    n: rows as u64,
                    k: inner as u64,
                    alpha: 1.0,
                    lda: inner as i64,
                    ldb: inner as i64,
                    beta: if residual.is_some() { 1.0 } else { 0.0 },
                    ldc: out_dim as i64,
                    stride_a: None,
                    stride_b: None,
                    stride_c: None,
                    stride_bias: None,
                    batch_size: None,
                };
                let lt = blas_lt(dev)?;
                let run = |bias: Option<&CudaView<'_, T>>, out: &mut CudaSlice<T>| {
                    // Safety: dimensions and leading dimensions describe the contiguous operands.
                    unsafe { lt.matmul(cfg, &wv, &xv, out, bias, None) }
                        .map_err(|e| candle_core::Error::Msg(format!("cuBLASLt: {e:?}")))
                };
                match bias {
                    Some(b) => with_view::<T, _>(b, 0, |bv, _| run(Some(&bv), &mut out))?,
                    None => run(None, &mut out)?,
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
    ) -> Result<Option<Tensor>> {
        let dim = x.dim(candle_core::D::Minus1)?;
        let usable = applies(x)
            && dim > 0
            && dim % 8 == 0
            && contiguous_start(x).is_some_and(|o| o % 8 == 0)
            && [weight, bias].iter().all(|t| {
                t.dtype() == DType::F32
                    && t.dims() == [dim]
                    && !crate::nn::needs_grad(t)
                    && t.device().same_device(x.device())
                    && contiguous_start(t).is_some()
            });
        if !usable {
            return Ok(None);
        }
        let rows = x.elem_count() / dim;
        let name = format!("layer_norm_{}", suffix(x.dtype()));
        let run = |t: DType| -> Result<Tensor> {
            match t {
                DType::BF16 => ln_typed::<bf16>(x, weight, bias, eps, rows, dim, &name),
                _ => ln_typed::<f16>(x, weight, bias, eps, rows, dim, &name),
            }
        };
        run(x.dtype()).map(Some)
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
                    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
                    // Safety: the kernel writes every element.
                    let out = unsafe { dev.alloc::<T>(rows * dim)? };
                    let (r, d, e) = (rows as i32, dim as i32, eps as f32);
                    let mut b = func.builder();
                    b.arg(&xv);
                    b.arg(&wv);
                    b.arg(&bv);
                    b.arg(&out);
                    b.arg(&r);
                    b.arg(&d);
                    b.arg(&e);
                    let cfg = LaunchConfig {
                        grid_dim: (rows.div_ceil(4) as u32, 1, 1),
                        block_dim: (128, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // Safety: rows x dim contiguous elements, dim a multiple of 8.
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
