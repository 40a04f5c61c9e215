//! Build script: with the `cuda` feature, turns `kernels/*.cu` (at the workspace root) into PTX
//! in `OUT_DIR`, which `src/cuda` embeds with `include_str!`.
//!
//! nvcc is taken from `NVCC` or `PATH` (`CUDA_HOME/bin` too). Without nvcc the PTX checked in
//! under `kernels/ptx/` (made by `scripts/build-ptx.sh` with the same flags) is used, so a
//! `cuda` build needs no CUDA toolkit. Without the feature nothing happens: CPU builds and CI
//! never see CUDA.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel sources, one PTX module each.
const MODULES: &[&str] = &["moe_gate", "moe_dispatch", "moe_experts", "paged_attention"];

/// Must stay in step with scripts/build-ptx.sh. sm_90 (H100/H200): PTX for compute_90 that the
/// driver JIT-compiles once per process; nvcc 13.0 emits PTX ISA 9.0, which driver 580 accepts.
const NVCC_FLAGS: &[&str] = &["--ptx", "-arch=sm_90", "-O3", "-std=c++17"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=SWITCHYARD_USE_CHECKED_IN_PTX");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let src_dir = manifest.join("../../kernels");
    let ptx_dir = src_dir.join("ptx");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets it"));
    let nvcc = if env::var_os("SWITCHYARD_USE_CHECKED_IN_PTX").is_some() {
        None
    } else {
        find_nvcc()
    };
    for m in MODULES {
        let cu = src_dir.join(format!("{m}.cu"));
        let checked_in = ptx_dir.join(format!("{m}.ptx"));
        println!("cargo:rerun-if-changed={}", cu.display());
        println!("cargo:rerun-if-changed={}", checked_in.display());
        let dst = out.join(format!("{m}.ptx"));
        match &nvcc {
            Some(nvcc) => compile(nvcc, &cu, &dst),
            None => {
                if let Err(e) = std::fs::copy(&checked_in, &dst) {
                    panic!(
                        "the `cuda` feature needs nvcc (set NVCC or put it on PATH) or the \
                         checked-in PTX {} (make it with scripts/build-ptx.sh): {e}",
                        checked_in.display()
                    );
                }
                println!(
                    "cargo:warning=no nvcc (or SWITCHYARD_USE_CHECKED_IN_PTX set): using checked-in {}",
                    checked_in.display()
                );
            }
        }
    }
}

fn compile(nvcc: &Path, cu: &Path, dst: &Path) {
    let status = Command::new(nvcc)
        .args(NVCC_FLAGS)
        .arg("-o")
        .arg(dst)
        .arg(cu)
        .status()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", nvcc.display()));
    if !status.success() {
        panic!("nvcc failed on {} ({status})", cu.display());
    }
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
    }
    let mut dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = env::var_os("CUDA_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("nvcc"))
        .find(|p| p.is_file())
}
