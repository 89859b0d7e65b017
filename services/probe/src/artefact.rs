//! A trained head as a named, fingerprinted artefact in the data dir:
//! `DATA_DIR/probes/<name>/head.safetensors` (its tensors) and `manifest.json` (what it
//! predicts, from which inputs made by which weights, the training set's fingerprint, its
//! cross-validated metrics with intervals, when and by which gigapath it was made). Both files
//! appear together: they are written in a staging folder renamed into place.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::abmil::Abmil;
use crate::data::hex16;
use crate::error::{ProbeError, Result};
use crate::eval::CvResult;
use crate::heads::{HeadKind, Knn, LinearProbe, Prototypes, SlideHead};

/// Folder of the heads in a data dir.
pub const PROBES_DIR: &str = "probes";
/// Weights file of a head.
pub const WEIGHTS_FILE: &str = "head.safetensors";
/// Manifest file of a head.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Manifest format tag.
pub const FORMAT: &str = "gigapath-probe/1";

/// What a head reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// The slide encoder's vector (`slide` in the `slides` collection).
    Slide,
    /// The aligned vector (`joint`).
    Joint,
    /// The tile features of the slide's feature file (attention MIL).
    Tiles,
}

impl std::fmt::Display for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Input::Slide => "slide",
            Input::Joint => "joint",
            Input::Tiles => "tiles",
        })
    }
}

/// The labelled slides a head learned from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSet {
    /// Slides.
    pub slides: usize,
    /// Patient groups.
    pub patients: usize,
    /// Slides per class.
    pub support: BTreeMap<String, usize>,
    /// [`crate::Dataset::fingerprint`].
    pub fingerprint: String,
    /// `catalog` or the labels CSV's path.
    pub labels_from: String,
}

/// Everything about a head but its tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The head's name (its folder).
    pub name: String,
    /// Its kind.
    pub kind: HeadKind,
    /// The label it predicts.
    pub label: String,
    /// Class names, in output order.
    pub classes: Vec<String>,
    /// What it reads.
    pub input: Input,
    /// Input width.
    pub dim: usize,
    /// The weights behind its inputs (slide vectors: tile + slide encoders, plus the alignment
    /// for joint; tiles: the tile encoder). Inputs from other weights are refused.
    pub input_fingerprint: String,
    /// SHA-256 (16 hex) of `head.safetensors`.
    pub fingerprint: String,
    /// Hyper-parameters (penalty and its sweep, neighbours, MIL sizes).
    pub params: serde_json::Value,
    /// What it learned from.
    pub training_set: TrainingSet,
    /// Cross-validated scores of this kind of head on the training set, if run.
    pub metrics: Option<CvResult>,
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub created_at: String,
    /// The gigapath version that trained it.
    pub gigapath_version: String,
}

/// A head's model.
#[derive(Debug, Clone)]
pub enum HeadModel {
    /// On slide vectors.
    Slide(SlideHead),
    /// On tile features.
    Abmil(Abmil),
}

/// A head read from the data dir.
#[derive(Debug, Clone)]
pub struct StoredHead {
    /// Its manifest.
    pub manifest: Manifest,
    /// Its model.
    pub model: HeadModel,
}

/// Refuses names that are not 1-64 of `A-Z a-z 0-9 _ . -` starting with a letter or digit.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ProbeError::Invalid(format!(
            "head name `{name}`: use 1-64 letters, digits, `_`, `.` or `-`, starting with a letter or digit"
        )))
    }
}

/// The current time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    gigapath_store::time::rfc3339(gigapath_store::time::now_ms())
}

fn tensors_of(model: &HeadModel) -> Result<HashMap<String, Tensor>> {
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    match model {
        HeadModel::Slide(SlideHead::Linear(p)) => {
            t.insert("mean".into(), Tensor::new(p.mean.clone(), &dev)?);
            t.insert("std".into(), Tensor::new(p.std.clone(), &dev)?);
            t.insert("weight".into(), Tensor::new(p.weight.clone(), &dev)?);
            t.insert("bias".into(), Tensor::new(p.bias.clone(), &dev)?);
        }
        HeadModel::Slide(SlideHead::Knn(k)) => {
            t.insert("x".into(), Tensor::new(k.x.clone(), &dev)?);
            let y: Vec<u32> = k.y.iter().map(|&v| v as u32).collect();
            t.insert("y".into(), Tensor::new(y, &dev)?);
        }
        HeadModel::Slide(SlideHead::Prototype(p)) => {
            t.insert(
                "prototypes".into(),
                Tensor::new(p.prototypes.clone(), &dev)?,
            );
        }
        HeadModel::Abmil(a) => t.extend(a.tensors.clone()),
    }
    Ok(t)
}

fn model_of(m: &Manifest, mut t: HashMap<String, Tensor>) -> Result<HeadModel> {
    let mut take = |k: &str| {
        t.remove(k).ok_or_else(|| {
            ProbeError::Invalid(format!("head `{}`: {WEIGHTS_FILE} lacks `{k}`", m.name))
        })
    };
    let model = match m.kind {
        HeadKind::Linear => HeadModel::Slide(SlideHead::Linear(LinearProbe {
            mean: take("mean")?.to_vec1()?,
            std: take("std")?.to_vec1()?,
            weight: take("weight")?.to_vec2()?,
            bias: take("bias")?.to_vec1()?,
            lambda: m
                .params
                .get("lambda")
                .and_then(|v| v.as_f64())
                .unwrap_or(0.0),
        })),
        HeadKind::Knn => HeadModel::Slide(SlideHead::Knn(Knn {
            k: m.params.get("k").and_then(|v| v.as_u64()).unwrap_or(5) as usize,
            x: take("x")?.to_vec2()?,
            y: take("y")?
                .to_vec1::<u32>()?
                .into_iter()
                .map(|v| v as usize)
                .collect(),
            classes: m.classes.len(),
        })),
        HeadKind::Prototype => HeadModel::Slide(SlideHead::Prototype(Prototypes {
            prototypes: take("prototypes")?.to_vec2()?,
        })),
        HeadKind::Abmil => HeadModel::Abmil(Abmil::from_tensors(t)?),
    };
    Ok(model)
}

/// Writes a head as `probes_dir/<name>/`; an existing head of that name is an error unless
/// `replace`. Fills in the manifest's `fingerprint`, `format` and returns it.
pub fn save(
    probes_dir: &Path,
    mut manifest: Manifest,
    model: &HeadModel,
    replace: bool,
) -> Result<Manifest> {
    check_name(&manifest.name)?;
    let target = probes_dir.join(&manifest.name);
    if target.exists() && !replace {
        return Err(ProbeError::Invalid(format!(
            "a head named `{}` exists in {} (choose another name or replace it)",
            manifest.name,
            probes_dir.display()
        )));
    }
    std::fs::create_dir_all(probes_dir).map_err(|e| ProbeError::io(probes_dir, e))?;
    let staging = probes_dir.join(format!(".{}.staging-{}", manifest.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| ProbeError::io(&staging, e))?;
    let weights = staging.join(WEIGHTS_FILE);
    candle_core::safetensors::save(&tensors_of(model)?, &weights)?;
    let bytes = std::fs::read(&weights).map_err(|e| ProbeError::io(&weights, e))?;
    manifest.fingerprint = hex16(&Sha256::digest(&bytes));
    manifest.format = FORMAT.into();
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| ProbeError::Invalid(e.to_string()))?;
    let mpath = staging.join(MANIFEST_FILE);
    std::fs::write(&mpath, json).map_err(|e| ProbeError::io(&mpath, e))?;
    if target.exists() {
        let old = probes_dir.join(format!(".{}.old-{}", manifest.name, std::process::id()));
        std::fs::rename(&target, &old).map_err(|e| ProbeError::io(&target, e))?;
        std::fs::rename(&staging, &target).map_err(|e| ProbeError::io(&target, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&staging, &target).map_err(|e| ProbeError::io(&target, e))?;
    }
    Ok(manifest)
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| ProbeError::io(&path, e))?;
    let m: Manifest = serde_json::from_str(&text)
        .map_err(|e| ProbeError::io(&path, format!("not a head manifest: {e}")))?;
    if m.format != FORMAT {
        return Err(ProbeError::io(
            &path,
            format!("format `{}`, expected `{FORMAT}`", m.format),
        ));
    }
    Ok(m)
}

/// Reads head `name`: [`ProbeError::UnknownHead`] when there is none; the weights must match
/// the manifest's fingerprint.
pub fn load(probes_dir: &Path, name: &str) -> Result<StoredHead> {
    check_name(name)?;
    let dir = probes_dir.join(name);
    if !dir.join(MANIFEST_FILE).is_file() {
        return Err(ProbeError::UnknownHead {
            name: name.into(),
            dir: probes_dir.to_path_buf(),
        });
    }
    let manifest = read_manifest(&dir)?;
    let weights = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&weights).map_err(|e| ProbeError::io(&weights, e))?;
    let actual = hex16(&Sha256::digest(&bytes));
    if actual != manifest.fingerprint {
        return Err(ProbeError::Fingerprint(format!(
            "head `{name}`: {WEIGHTS_FILE} has fingerprint {actual}, its manifest says {}: the files do not belong together",
            manifest.fingerprint
        )));
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let model = model_of(&manifest, tensors)?;
    Ok(StoredHead { manifest, model })
}

/// Manifests of every head in `probes_dir`, by name (unreadable folders are skipped with a
/// warning).
pub fn list(probes_dir: &Path) -> Result<Vec<Manifest>> {
    let entries = match std::fs::read_dir(probes_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ProbeError::io(probes_dir, e)),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path: PathBuf = e.path();
        let hidden = e.file_name().to_string_lossy().starts_with('.');
        if hidden || !path.is_dir() {
            continue;
        }
        match read_manifest(&path) {
            Ok(m) => out.push(m),
            Err(err) => tracing::warn!("skipping {}: {err}", path.display()),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heads::tests::blobs;
    use crate::heads::LinearConfig;

    fn manifest(name: &str, kind: HeadKind) -> Manifest {
        Manifest {
            format: String::new(),
            name: name.into(),
            kind,
            label: "subtype".into(),
            classes: vec!["C0".into(), "C1".into()],
            input: Input::Slide,
            dim: 6,
            input_fingerprint: "abc".into(),
            fingerprint: String::new(),
            params: serde_json::json!({"lambda": 0.01, "k": 3}),
            training_set: TrainingSet {
                slides: 16,
                patients: 16,
                support: BTreeMap::new(),
                fingerprint: "f".into(),
                labels_from: "catalog".into(),
            },
            metrics: None,
            created_at: utc_now(),
            gigapath_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    #[test]
    fn heads_round_trip_with_fingerprints() {
        let dir = tempfile::tempdir().unwrap();
        let ds = blobs(8, 2, 6, 3.0, false, 5);
        let heads = [
            (
                "lin",
                HeadModel::Slide(SlideHead::Linear(
                    LinearProbe::fit(
                        &ds,
                        &LinearConfig {
                            steps: 50,
                            ..Default::default()
                        },
                    )
                    .unwrap(),
                )),
            ),
            (
                "knn",
                HeadModel::Slide(SlideHead::Knn(Knn::fit(&ds, 3).unwrap())),
            ),
            (
                "proto",
                HeadModel::Slide(SlideHead::Prototype(Prototypes::fit(&ds).unwrap())),
            ),
        ];
        for (name, model) in &heads {
            let HeadModel::Slide(h) = model else {
                unreachable!()
            };
            let saved = save(dir.path(), manifest(name, h.kind()), model, false).unwrap();
            assert_eq!(saved.fingerprint.len(), 16);
            let back = load(dir.path(), name).unwrap();
            assert_eq!(back.manifest, saved);
            let HeadModel::Slide(b) = back.model else {
                panic!()
            };
            assert_eq!(&b, h, "{name}");
        }
        assert_eq!(
            list(dir.path())
                .unwrap()
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>(),
            ["knn", "lin", "proto"]
        );
        let err = save(
            dir.path(),
            manifest("lin", HeadKind::Linear),
            &heads[0].1,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("a head named `lin` exists"), "{err}");
        save(
            dir.path(),
            manifest("lin", HeadKind::Linear),
            &heads[0].1,
            true,
        )
        .unwrap();
        let err = load(dir.path(), "nope").unwrap_err();
        assert!(matches!(err, ProbeError::UnknownHead { .. }), "{err}");
        assert!(
            check_name("../x").is_err()
                && check_name("").is_err()
                && check_name("rcc-linear_v2.1").is_ok()
        );
        // Weights swapped under a manifest are refused.
        std::fs::copy(
            dir.path().join("knn").join(WEIGHTS_FILE),
            dir.path().join("proto").join(WEIGHTS_FILE),
        )
        .unwrap();
        let err = load(dir.path(), "proto").unwrap_err().to_string();
        assert!(err.contains("do not belong together"), "{err}");
        assert!(utc_now().ends_with('Z') && utc_now().len() == 20);
    }
}
