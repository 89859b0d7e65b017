//! The encoders a run needs, loaded once from the configured folders, with their fingerprints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use gigapath_models::align::Alignment;
use gigapath_models::{Precision, SlideEncoder, SlidePool, TextEncoder, TextPool, TileEncoder};
use gigapath_store::vector::combined_fingerprint;
use half::f16;

use crate::config::ModelsConfig;
use crate::error::{PipelineError, Result};
use crate::fingerprint::model_fingerprint;

/// Side of the tile crops the pipeline feeds the tile encoder.
const TILE_INPUT_PX: usize = 224;

fn required<'a>(
    path: &'a Option<PathBuf>,
    what: &'static str,
    key: &'static str,
    env: &'static str,
) -> Result<&'a Path> {
    path.as_deref()
        .ok_or(PipelineError::MissingModel { what, key, env })
}

/// The tile encoder's folder: `models.tile_encoder`, else the release folder `models.weights`.
fn tile_dir(cfg: &ModelsConfig) -> Result<&Path> {
    cfg.tile_dir().ok_or(PipelineError::MissingModel {
        what: "the tile encoder",
        key: "weights (the Prov-GigaPath release folder, see `gigapath models fetch`) or \
              models.tile_encoder",
        env: "GIGAPATH_WEIGHTS / GIGAPATH_TILE_ENCODER",
    })
}

/// The slide encoder's folder: `models.slide_encoder`, else the release folder `models.weights`
/// (the slide encoder recognises the release layout, see `gigapath_models::slide_encoder`).
fn slide_dir(cfg: &ModelsConfig) -> Result<&Path> {
    cfg.slide_dir().ok_or(PipelineError::MissingModel {
        what: "the slide encoder",
        key: "weights (the Prov-GigaPath release folder, see `gigapath models fetch`) or \
              models.slide_encoder",
        env: "GIGAPATH_WEIGHTS / GIGAPATH_SLIDE_ENCODER",
    })
}

fn text_dir(cfg: &ModelsConfig) -> Result<&Path> {
    required(
        &cfg.text_encoder,
        "the text encoder",
        "text_encoder",
        "GIGAPATH_TEXT_ENCODER",
    )
}

/// Per-role fingerprints (`tile`, `slide`, and `alignment` when one is configured) of the
/// configured slide models, without loading them.
pub fn slide_fingerprints(cfg: &ModelsConfig) -> Result<BTreeMap<String, String>> {
    let tile_dir = tile_dir(cfg)?;
    let slide_dir = slide_dir(cfg)?;
    let mut fps = BTreeMap::from([
        ("tile".to_string(), model_fingerprint(tile_dir)?),
        ("slide".to_string(), model_fingerprint(slide_dir)?),
    ]);
    if let Some(dir) = &cfg.alignment {
        fps.insert("alignment".to_string(), model_fingerprint(dir)?);
    }
    Ok(fps)
}

/// Per-role fingerprints of report points: `text`, and `alignment` when one is configured.
pub fn text_fingerprints(cfg: &ModelsConfig) -> Result<BTreeMap<String, String>> {
    let dir = text_dir(cfg)?;
    let mut fps = BTreeMap::from([("text".to_string(), model_fingerprint(dir)?)]);
    if let Some(dir) = &cfg.alignment {
        fps.insert("alignment".to_string(), model_fingerprint(dir)?);
    }
    Ok(fps)
}

/// An alignment checkpoint (`models.alignment`), with its fingerprint.
pub struct AlignmentModel {
    /// The loaded projection heads (and any fine-tuned layers).
    pub alignment: Alignment,
    /// The checkpoint folder.
    pub dir: PathBuf,
    /// Fingerprint of the checkpoint's weights.
    pub fingerprint: String,
}

impl AlignmentModel {
    /// Loads the configured checkpoint, `None` when none is configured.
    pub fn load(cfg: &ModelsConfig) -> Result<Option<AlignmentModel>> {
        let Some(dir) = &cfg.alignment else {
            return Ok(None);
        };
        let precision = Precision::parse(&cfg.device, &cfg.dtype)?;
        Ok(Some(AlignmentModel {
            alignment: Alignment::load(dir, &precision)?,
            fingerprint: model_fingerprint(dir)?,
            dir: dir.clone(),
        }))
    }

    /// Errors unless the checkpoint was trained on the weights `actual` (role -> fingerprint)
    /// for every role in `roles`: embeddings from other base weights would not be aligned.
    pub fn check_base(&self, actual: &BTreeMap<String, String>, roles: &[&str]) -> Result<()> {
        let trained = self.alignment.base_fingerprints();
        for role in roles {
            let (Some(want), Some(have)) = (trained.get(*role), actual.get(*role)) else {
                continue;
            };
            if want != have {
                return Err(PipelineError::Config(format!(
                    "alignment {} was trained on {role} weights {want}, but the configured {role} \
                     encoder is {have}: re-train the alignment on these weights or configure the \
                     ones it was trained on",
                    self.dir.display()
                )));
            }
        }
        Ok(())
    }
}

/// Tile + slide encoder: pixels to tile features to a slide embedding.
pub struct SlideModels {
    /// The tile encoder.
    pub tile: TileEncoder,
    /// The slide encoder.
    pub slide: SlideEncoder,
    /// Which output of the slide encoder is the slide embedding (`models.slide_pool`).
    pub pool: SlidePool,
    /// Per role: `tile`, `slide`.
    pub fingerprints: BTreeMap<String, String>,
    precision: Precision,
}

impl SlideModels {
    /// Loads both encoders on the configured device and checks that they fit each other and the
    /// pipeline's 224 px crops.
    pub fn load(cfg: &ModelsConfig) -> Result<SlideModels> {
        let precision = Precision::parse(&cfg.device, &cfg.dtype)?;
        let tile_dir = tile_dir(cfg)?;
        let slide_dir = slide_dir(cfg)?;
        let tile = TileEncoder::load(tile_dir, &precision)?;
        if tile.img_size() != TILE_INPUT_PX {
            return Err(PipelineError::Config(format!(
                "tile encoder {} takes {} px inputs; the pipeline feeds {TILE_INPUT_PX} px crops of 256 px tiles",
                tile_dir.display(),
                tile.img_size()
            )));
        }
        let slide = SlideEncoder::load(slide_dir, &precision)?;
        if slide.config().in_chans != tile.embed_dim() {
            return Err(PipelineError::Config(format!(
                "the tile encoder ({}) gives {}-d features but the slide encoder ({}) takes {}-d",
                tile_dir.display(),
                tile.embed_dim(),
                slide_dir.display(),
                slide.config().in_chans
            )));
        }
        let fingerprints = slide_fingerprints(cfg)?;
        let pool = match cfg.slide_pool.as_str() {
            "cls" => SlidePool::Cls,
            _ => SlidePool::Mean,
        };
        Ok(SlideModels {
            tile,
            slide,
            pool,
            fingerprints,
            precision,
        })
    }

    /// Width D of the tile features.
    pub fn tile_dim(&self) -> usize {
        self.tile.embed_dim()
    }

    /// Width of the slide embedding.
    pub fn slide_dim(&self) -> usize {
        self.slide.config().embed_dim
    }

    /// The guard fingerprint of slide points embedded by these weights.
    pub fn fingerprint(&self) -> String {
        combined_fingerprint(&self.fingerprints)
    }

    /// `n` normalised 224 px crops (CHW, concatenated) to `n` x D tile features.
    pub fn encode_tiles(&self, pixels: Vec<f32>, n: usize) -> Result<Vec<f32>> {
        let x = Tensor::from_vec(
            pixels,
            (n, 3, TILE_INPUT_PX, TILE_INPUT_PX),
            &self.precision.device,
        )?
        .to_dtype(self.precision.dtype)?;
        Ok(self.tile.embed(&x)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// The slide embedding (after any layers the alignment fine-tuned) and the joint embedding
    /// of tile features (f16, row-major N x D) at grid cells (gx, gy).
    pub fn encode_slide_joint(
        &self,
        alignment: &Alignment,
        features: &[f16],
        cells: &[[u32; 2]],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let d = self.tile_dim();
        let x = Tensor::from_slice(features, (cells.len(), d), &self.precision.device)?
            .to_dtype(DType::F32)?;
        Ok(alignment.slide_joint(&self.slide, &x, cells)?)
    }

    /// The slide embedding of tile features (f16, row-major N x D) at grid cells (gx, gy).
    pub fn encode_slide(&self, features: &[f16], cells: &[[u32; 2]]) -> Result<Vec<f32>> {
        let d = self.tile_dim();
        let x = Tensor::from_slice(features, (cells.len(), d), &self.precision.device)?
            .to_dtype(DType::F32)?;
        let out = self.slide.encode_cells(&x, cells)?;
        Ok(out
            .select(self.pool, false)
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?)
    }
}

/// The text encoder with its pooling.
pub struct TextModel {
    /// The text encoder.
    pub encoder: TextEncoder,
    /// How token states become one vector (`models.text_pool`).
    pub pool: TextPool,
    /// Whether embeddings are L2-normalised (`models.text_normalize`).
    pub normalize: bool,
    /// Fingerprint of the encoder's weights.
    pub fingerprint: String,
}

impl TextModel {
    /// Loads the configured text encoder on the configured device.
    pub fn load(cfg: &ModelsConfig) -> Result<TextModel> {
        let precision = Precision::parse(&cfg.device, &cfg.dtype)?;
        let dir = text_dir(cfg)?;
        if !dir.join("config.json").is_file() {
            return Err(PipelineError::Config(format!(
                "text encoder folder {} has no config.json (the offline default is fetched by scripts/fetch-minilm.sh)",
                dir.display()
            )));
        }
        Ok(TextModel {
            encoder: TextEncoder::load(dir, &precision)?,
            pool: if cfg.text_pool == "cls" {
                TextPool::Cls
            } else {
                TextPool::Mean
            },
            normalize: cfg.text_normalize,
            fingerprint: model_fingerprint(dir)?,
        })
    }

    /// Width of the text embedding.
    pub fn dim(&self) -> usize {
        self.encoder.hidden_size()
    }

    /// One embedding per text.
    pub fn encode<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .encoder
            .encode(texts, self.pool, self.normalize)?
            .to_vec2::<f32>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gigapath_models::init::{init_slide_encoder, init_tile_encoder, TINY};

    /// The release layout (one folder for both encoders) from small generated encoders: the
    /// tile encoder's timm `config.json` and weights, the slide encoder's weights as
    /// `slide_encoder.safetensors` and its (non-official) config as `slide_config.json`.
    fn release_folder(root: &Path) -> PathBuf {
        let (tile, slide) = TINY;
        init_tile_encoder(&root.join("tile"), tile, 1).unwrap();
        init_slide_encoder(&root.join("slide"), slide, 2).unwrap();
        let release = root.join("release");
        std::fs::create_dir_all(&release).unwrap();
        for (from, to) in [
            ("tile/config.json", "config.json"),
            ("tile/model.safetensors", "model.safetensors"),
            ("slide/model.safetensors", "slide_encoder.safetensors"),
            ("slide/config.json", "slide_config.json"),
        ] {
            std::fs::copy(root.join(from), release.join(to)).unwrap();
        }
        release
    }

    #[test]
    fn one_weights_key_serves_both_encoders_and_explicit_keys_win() {
        let root = tempfile::tempdir().unwrap();
        let release = release_folder(root.path());
        let cfg = ModelsConfig {
            weights: Some(release.clone()),
            ..ModelsConfig::default()
        };
        let models = SlideModels::load(&cfg).unwrap();
        assert_eq!((models.tile_dim(), models.slide_dim()), (96, 128));
        let features = vec![f16::from_f32(0.5); 2 * 96];
        let emb = models.encode_slide(&features, &[[0, 0], [1, 0]]).unwrap();
        assert_eq!(emb.len(), 128);

        // An explicit slide folder wins over the release folder.
        let cfg = ModelsConfig {
            slide_encoder: Some(root.path().join("slide")),
            ..cfg
        };
        assert_eq!(slide_dir(&cfg).unwrap(), root.path().join("slide"));
        assert_eq!(tile_dir(&cfg).unwrap(), release);
        let fps = slide_fingerprints(&cfg).unwrap();
        assert_eq!(
            fps["slide"],
            model_fingerprint(&root.path().join("slide")).unwrap()
        );

        let err = SlideModels::load(&ModelsConfig::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("models.weights") && err.contains("GIGAPATH_WEIGHTS"),
            "{err}"
        );
    }
}
