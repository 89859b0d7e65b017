//! Small randomly initialised model folders, for tests and the demo, where real weights cannot
//! be downloaded. They are built by the same constructors that load real checkpoints (so the key
//! names are the real ones), then every tensor is set from a seeded generator: the same seed
//! gives the same bytes, hence the same fingerprint, on every machine.
//!
//! Initialisation: LayerNorm weights 1 and biases 0; linear and patch weights normal with std
//! sqrt(1 / fan_in); other biases 0; LayerScale gammas 0.5 (not timm's 1e-5, which would make
//! every block nearly the identity and the CLS output almost independent of the image);
//! CLS and position tokens normal with std 0.02.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gigapath_rng::SplitMix64;
use serde_json::json;

use crate::{slide_encoder, tile_encoder, Error, Result};

/// Sizes of a generated tile encoder (timm ViT, patch 16, 224 px, SwiGLU).
#[derive(Debug, Clone, Copy)]
pub struct TileSize {
    /// Token width (the tile feature width D).
    pub embed_dim: usize,
    /// Transformer blocks.
    pub depth: usize,
    /// Attention heads; must divide `embed_dim`.
    pub num_heads: usize,
}

/// Sizes of a generated LongNet slide encoder (official segment lengths and ratios).
#[derive(Debug, Clone, Copy)]
pub struct SlideSize {
    /// Tile feature width it takes (the tile encoder's `embed_dim`).
    pub in_chans: usize,
    /// Token width (the slide embedding width).
    pub embed_dim: usize,
    /// LongNet layers.
    pub depth: usize,
    /// A multiple of 16, so that every dilation ratio splits the heads evenly.
    pub num_heads: usize,
}

/// `gigapath models init --preset tiny`: tile 96-d x 2 blocks x 3 heads, slide 128-d x 2 layers.
pub const TINY: (TileSize, SlideSize) = (
    TileSize {
        embed_dim: 96,
        depth: 2,
        num_heads: 3,
    },
    SlideSize {
        in_chans: 96,
        embed_dim: 128,
        depth: 2,
        num_heads: 16,
    },
);

/// `gigapath models init --preset small`: tile 192-d x 4 blocks x 3 heads, slide 256-d x 4 layers.
pub const SMALL: (TileSize, SlideSize) = (
    TileSize {
        embed_dim: 192,
        depth: 4,
        num_heads: 3,
    },
    SlideSize {
        in_chans: 192,
        embed_dim: 256,
        depth: 4,
        num_heads: 16,
    },
);

/// Writes `config.json` + `model.safetensors` of a random tile encoder into `dir`.
pub fn init_tile_encoder(dir: &Path, size: TileSize, seed: u64) -> Result<()> {
    let config = json!({
        "architecture": "vit_giant_patch14_dinov2",
        "num_classes": 0,
        "num_features": size.embed_dim,
        "global_pool": "token",
        "model_args": {
            "img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": size.embed_dim,
            "depth": size.depth, "num_heads": size.num_heads, "init_values": 1e-05,
            "mlp_ratio": 5.33334, "num_classes": 0
        },
        "pretrained_cfg": {
            "input_size": [3, 224, 224], "interpolation": "bicubic",
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]
        },
        "gigapath_note": format!("random weights (seed {seed}) for tests and the demo; not a trained model")
    });
    write_model(dir, &config, seed, |vb, path| {
        let cfg = tile_encoder::Config::from_file(path)?;
        tile_encoder::TileEncoder::new(&cfg, vb)
            .map(|_| ())
            .map_err(Error::from)
    })
}

/// Writes `config.json` + `model.safetensors` of a random slide encoder into `dir`.
pub fn init_slide_encoder(dir: &Path, size: SlideSize, seed: u64) -> Result<()> {
    if !size.num_heads.is_multiple_of(16) || !size.embed_dim.is_multiple_of(size.num_heads) {
        return Err(Error::input(format!(
            "slide encoder with {} heads and {} dims: heads must be a multiple of 16 dividing the dims",
            size.num_heads, size.embed_dim
        )));
    }
    let config = json!({
        "in_chans": size.in_chans, "embed_dim": size.embed_dim, "depth": size.depth,
        "num_heads": size.num_heads, "mlp_ratio": 4.0, "tile_size": 256, "slide_ngrids": 1000,
        "segment_length": [1024, 5792, 32768, 185363, 1048576],
        "dilated_ratio": [1, 2, 4, 8, 16],
        "layernorm_eps": 1e-05, "norm_eps": 1e-06
    });
    write_model(dir, &config, seed, |vb, path| {
        let cfg = slide_encoder::Config::from_file(path)?;
        slide_encoder::SlideEncoder::new(&cfg, vb)
            .map(|_| ())
            .map_err(Error::from)
    })
}

/// Writes `config`, builds the model over a [`VarMap`] to learn its tensors, fills them and
/// saves them. Files are written beside the folder and renamed, so a folder is whole or absent.
fn write_model(
    dir: &Path,
    config: &serde_json::Value,
    seed: u64,
    build: impl Fn(VarBuilder, &Path) -> Result<()>,
) -> Result<()> {
    let io = |path: &Path, e: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        cause: e,
    };
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    let staging = parent.join(format!(
        ".{}.partial-{}",
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| io(&staging, e))?;
    let result = (|| {
        let config_path = staging.join("config.json");
        let text = serde_json::to_string_pretty(config).expect("config serialises");
        std::fs::write(&config_path, text).map_err(|e| io(&config_path, e))?;
        let varmap = VarMap::new();
        build(
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
            &config_path,
        )?;
        fill(&varmap, seed)?;
        varmap.save(staging.join("model.safetensors"))?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        std::fs::rename(&staging, dir).map_err(|e| io(dir, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

fn fill(varmap: &VarMap, seed: u64) -> Result<()> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for (k, name) in names.into_iter().enumerate() {
        let var = &data[name];
        let shape = var.shape().clone();
        let n = shape.elem_count();
        let is_norm = ["norm", "_ln", "LayerNorm", "layernorm"]
            .iter()
            .any(|p| name.contains(p));
        let values: Vec<f32> = if is_norm && name.ends_with("weight") {
            vec![1.0; n]
        } else if name.ends_with("bias") {
            vec![0.0; n]
        } else if name.ends_with("gamma") {
            vec![0.5; n]
        } else {
            let dims = shape.dims();
            let std = if dims.len() >= 2 && !name.contains("token") && !name.contains("pos_embed") {
                (1.0 / (n / dims[0]) as f64).sqrt()
            } else {
                0.02
            };
            let mut rng =
                SplitMix64::new(seed ^ (k as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            (0..n).map(|_| (rng.normal() * std) as f32).collect()
        };
        var.set(&Tensor::from_vec(values, shape, &Device::Cpu)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Precision, SlideEncoder, TileEncoder};

    #[test]
    fn generated_models_load_run_and_are_reproducible() {
        let d = tempfile::tempdir().unwrap();
        let tile = TileSize {
            embed_dim: 48,
            depth: 2,
            num_heads: 3,
        };
        init_tile_encoder(&d.path().join("tile"), tile, 7).unwrap();
        init_tile_encoder(&d.path().join("tile2"), tile, 7).unwrap();
        let a = std::fs::read(d.path().join("tile/model.safetensors")).unwrap();
        let b = std::fs::read(d.path().join("tile2/model.safetensors")).unwrap();
        assert_eq!(a, b, "same seed, same bytes");

        let enc = TileEncoder::load(&d.path().join("tile"), &Precision::cpu()).unwrap();
        // Two different images must give different embeddings (the CLS token sees the pixels).
        let x = Tensor::randn(0f32, 1.0, (2, 3, 224, 224), &Device::Cpu).unwrap();
        let e = enc.embed(&x).unwrap().to_vec2::<f32>().unwrap();
        let diff: f32 = e[0]
            .iter()
            .zip(&e[1])
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / 48.0;
        assert!(diff > 0.05, "embeddings barely depend on the input: {diff}");

        let slide = SlideSize {
            in_chans: 48,
            embed_dim: 64,
            depth: 2,
            num_heads: 16,
        };
        init_slide_encoder(&d.path().join("slide"), slide, 7).unwrap();
        let enc = SlideEncoder::load(&d.path().join("slide"), &Precision::cpu()).unwrap();
        let feats = Tensor::randn(0f32, 1.0, (5, 48), &Device::Cpu).unwrap();
        let out = enc
            .encode_cells(&feats, &[[0, 0], [1, 0], [2, 0], [0, 1], [1, 1]])
            .unwrap();
        assert_eq!(out.pool.dims(), [64]);
        assert!(init_slide_encoder(
            &d.path().join("bad"),
            SlideSize {
                num_heads: 12,
                ..slide
            },
            1
        )
        .is_err());
        assert!(!d.path().join("bad").exists());
    }
}
