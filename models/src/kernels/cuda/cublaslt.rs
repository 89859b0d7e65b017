//! cuBLASLt with what the safe wrapper of cudarc lacks: the residual as a separate C input
//! (`D = W x + bias + C`, no copy of the residual into the output first) and one descriptor
//! set and heuristic choice per shape, kept for the process (the wrapper rebuilt both on every
//! call).

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
// Safety: as for `Send`: every use of the handle holds the `plans` lock.
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
