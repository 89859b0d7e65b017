//! With the `cuda` feature: compiles src/kernels/cuda/kernels.cu to PTX with nvcc (`$CUDA_HOME/bin/nvcc`,
//! else `nvcc` on PATH) for compute capability `max(CUDA_COMPUTE_CAP, 80)`; the kernels need
//! sm_80 tensor-core instructions and are skipped at run time on older GPUs. Without the feature
//! it does nothing, so the default build needs no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/kernels/cuda/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("kernels.ptx");
    let cap: u32 = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .and_then(|c| c.trim().replace('.', "").parse().ok())
        .unwrap_or(80)
        .max(80);
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            "-std=c++17",
            &format!("-arch=compute_{cap}"),
        ])
        .arg("src/kernels/cuda/kernels.cu")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "running {}: {e} (set CUDA_HOME, see README \"GPU\")",
                nvcc.display()
            )
        });
    assert!(
        status.success(),
        "nvcc failed on src/kernels/cuda/kernels.cu"
    );
}
