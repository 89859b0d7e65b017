//! Peak memory of loading a safetensors tile encoder: about the model, not twice the file.
//!
//! candle's memory-mapped loader copied every tensor out of a mapping whose touched pages stayed
//! resident until the load ended: the 4.5 GB release peaked at 8.9 GB. The load runs in a child
//! process (this test binary again) so that its peak RSS (`VmHWM`) is its own.
#![cfg(target_os = "linux")]

use std::path::Path;
use std::process::Command;

use gigapath_models::init::{init_tile_encoder, TileSize};
use gigapath_models::{Precision, TileEncoder};

const CHILD_ENV: &str = "GIGAPATH_RSS_CHILD_MODEL";

/// `VmRSS` and `VmHWM` of this process, bytes.
fn rss_and_peak() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} not in /proc/self/status"));
        let kb: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap();
        kb * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// In the child: load the model, report the RSS before and the peak after.
fn child(dir: &Path) {
    let (before, _) = rss_and_peak();
    let model = TileEncoder::load(dir, &Precision::cpu()).unwrap();
    let (after, peak) = rss_and_peak();
    println!("RSS before={before} after={after} peak={peak}");
    assert_eq!(model.embed_dim(), 768);
}

#[test]
fn safetensors_load_peaks_near_the_model_size_not_twice_the_file() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        return child(Path::new(&dir));
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tile");
    // ~170 MB of f32: big enough that a second copy stands out from the process's own memory.
    let size = TileSize {
        embed_dim: 768,
        depth: 6,
        num_heads: 12,
    };
    init_tile_encoder(&dir, size, 3).unwrap();
    let file = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(file > 150 << 20, "{file}");

    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "safetensors_load_peaks_near_the_model_size_not_twice_the_file",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // libtest prints the test's name on the same line first.
    let line = stdout
        .lines()
        .find_map(|l| l.find("RSS before=").map(|at| &l[at..]))
        .unwrap_or_else(|| panic!("no RSS line in {stdout}"));
    let value = |key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let (before, after, peak) = (value("before="), value("after="), value("peak="));
    let growth = peak.saturating_sub(before) as f64 / file as f64;
    let held = after.saturating_sub(before) as f64 / file as f64;
    eprintln!(
        "file {:.0} MB: peak growth {growth:.2}x the file, held after the load {held:.2}x",
        file as f64 / 1e6
    );
    assert!(held > 0.8, "the loaded model holds its weights: {held:.2}x");
    assert!(
        growth < 1.25,
        "peak RSS grew by {growth:.2}x the file size while loading (a second copy is 2x)"
    );
}
