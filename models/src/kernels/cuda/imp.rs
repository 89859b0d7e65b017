//! The fused CUDA kernels behind [`super`]'s functions (with the `cuda` feature): launches of
//! `kernels.cu`, compiled to PTX by build.rs, and the cuBLASLt products of [`super::cublaslt`].

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Shape, Storage};
use half::{bf16, f16};

use super::cublaslt as lt;
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
    let enabled = *ENABLED
        .get_or_init(|| std::env::var("GIGAPATH_CUDA_KERNELS").map_or(true, |v| v.trim() != "0"));
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
        candle_core::bail!("cuda kernels: tensor is not on a CUDA device")
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
    branches: &[Branch],
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
    branches: &[Branch],
    scale: f32,
) -> Result<Tensor> {
    let (l, heads, dh) = q.dims3()?;
    let dtype = q.dtype();
    let grid = l * heads;
    let rows = [q.stride()[0], k.stride()[0], v.stride()[0]];
    let attend = |views: (&CudaView<'_, T>, &CudaView<'_, T>, &CudaView<'_, T>),
                  dev: &CudaDevice| {
        let mut outs = Vec::with_capacity(branches.len());
        let mut lses = Vec::with_capacity(branches.len());
        for branch in branches {
            let (args, segments) = branch_args(branch, l, heads, dh, rows, scale);
            // Safety: rows a branch does not cover stay unwritten; their lse stays 0, which the
            // mix reads as "not covered" and skips.
            let out = unsafe { dev.alloc::<T>(grid * dh)? };
            let lse = dev.alloc_zeros::<f32>(grid)?;
            launch_flash(dev, dtype, dh, segments, views, &out, Some(&lse), args)?;
            outs.push(out);
            lses.push(lse);
        }
        let y = mix_branches::<T>(dev, dtype, &outs, &lses, grid, dh)?;
        Ok(wrap(y, dev, (l, heads, dh)))
    };
    with_view::<T, _>(q, 0, |qv, dev| {
        with_view::<T, _>(k, 0, |kv, _| {
            with_view::<T, _>(v, 0, |vv, _| attend((&qv, &kv, &vv), dev))
        })
    })
}

/// The flash launch of one branch over `[L, H, Dh]` q / k / v whose position rows are
/// `rows[i]` elements apart (dense outputs and lses `[L, H]`), and its number of segments.
fn branch_args(
    branch: &Branch,
    l: usize,
    heads: usize,
    dh: usize,
    rows: [usize; 3],
    scale: f32,
) -> (FlashArgs, usize) {
    let r = branch.ratio;
    let (s, segments) = branch.segments(l);
    // [L, H, Dh] rows: position p, head h at p * row + h * Dh; the problem (segment b, head h)
    // reads positions b * s + h / group + r * t.
    let dense = |row: usize| Geom {
        b: (s * row) as i64,
        h: dh as i64,
        g: row as i64,
        t: (r * row) as i64,
    };
    let args = FlashArgs {
        q: dense(rows[0]),
        k: dense(rows[1]),
        v: dense(rows[2]),
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
    (args, segments)
}

/// The branch mix kernel: per (position, head) the branch outputs weighted by the softmax of
/// their lses (at most 8 branches, each `grid x dh` outputs and `grid` lses).
fn mix_branches<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    dtype: DType,
    outs: &[CudaSlice<T>],
    lses: &[CudaSlice<f32>],
    grid: usize,
    dh: usize,
) -> Result<CudaSlice<T>> {
    let func =
        dev.get_or_load_custom_func(&format!("dilated_mix_{}", suffix(dtype)), MODULE, PTX)?;
    // Safety: the kernel writes every element.
    let y = unsafe { dev.alloc::<T>(grid * dh)? };
    let (nb, rows, dim) = (outs.len() as i32, grid as i64, dh as i32);
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
    Ok(y)
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
                && !t.track_op()
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
            let run = |b: Option<&CudaView<'_, T>>, r: Option<&CudaView<'_, T>>, out: &mut _| {
                lt.linear(dev, dtype, shape, &xv, &wv, b, r, out)
            };
            match (bias, residual) {
                (Some(b), Some(r)) => with_view::<T, _>(b, 0, |bv, _| {
                    with_view::<T, _>(r, 0, |rv, _| run(Some(&bv), Some(&rv), &mut out))
                })?,
                (Some(b), None) => with_view::<T, _>(b, 0, |bv, _| run(Some(&bv), None, &mut out))?,
                (None, Some(r)) => with_view::<T, _>(r, 0, |rv, _| run(None, Some(&rv), &mut out))?,
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
                && !t.track_op()
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
