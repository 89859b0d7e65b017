//! Files the pipeline reads back from disk (a data dir may be copied, damaged or hand-edited):
//!
//! First byte selects:
//! - even: the rest is a grid file, `tiles.safetensors`: `gigapath_wsi::gridfile::parse_grid`
//!   (what `read_grid` does after reading the file): the safetensors header, the metadata (format
//!   tag, the tile plan as JSON, threshold) and the three tensors;
//! - odd: the rest is a feature file: `gigapath_store::FeatureFile::from_bytes` (the same reader
//!   as `FeatureFile::read`, over the bytes instead of a file: header length, JSON header,
//!   `__metadata__` strings and their checks, dtypes, shapes, offsets, finite values) and
//!   `FeatureFile::metadata_from_bytes` (`read_metadata`: header only).
#![no_main]

use std::path::Path;

use gigapath_store::FeatureFile;
use gigapath_wsi::gridfile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if selector % 2 == 0 {
        if let Ok(grid) = gridfile::parse_grid(rest, Path::new("tiles.safetensors")) {
            // What was read serialises again (the writer's path) and reads back the same tiles.
            if let Ok(bytes) = gridfile::grid_safetensors(&grid) {
                let back = gridfile::parse_grid(&bytes, Path::new("again.safetensors"))
                    .expect("a written grid file reads back");
                assert_eq!(back.tiles.len(), grid.tiles.len());
            }
            let _ = gridfile::grid_csv(&grid.tiles);
        }
        return;
    }
    let path = Path::new("features.safetensors");
    let meta = FeatureFile::metadata_from_bytes(rest, path);
    if let Ok(f) = FeatureFile::from_bytes(rest, path) {
        let (m, rows) = meta.expect("a readable feature file has readable metadata");
        assert_eq!(m, f.metadata);
        assert_eq!(rows as usize, f.len());
        assert!(f.dim > 0 && !f.is_empty());
        assert_eq!(f.origins_level0.len(), f.len());
        assert_eq!(f.features_f16().len(), f.len() * f.dim);
        for i in 0..f.len() {
            assert_eq!(f.row(i).len(), f.dim);
        }
        assert!(f.features_f32().iter().all(|v| v.is_finite()));
    }
});
