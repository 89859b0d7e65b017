//! The jobs the CLI and the HTTP service run on a data dir: train a named head from labelled
//! stored slides (optionally cross-validating it first), and apply a head to stored slides.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use gigapath_query::Space;
use gigapath_store::Store;
use serde::{Deserialize, Serialize};

use crate::abmil::{self, Abmil, AbmilConfig};
use crate::artefact::{self, HeadModel, Input, Manifest, StoredHead, TrainingSet};
use crate::data::{load_dataset, slide_vectors, Dataset, LabelSource};
use crate::error::{ProbeError, Result};
use crate::eval::{cross_validate, fit_linear_swept, CvConfig};
use crate::heads::{HeadKind, Knn, Prototypes, SlideHead};

/// What `gigapath probe train` asks for.
#[derive(Debug, Clone)]
pub struct TrainHeadRequest {
    /// The head's name (its folder under `DATA_DIR/probes/`).
    pub name: String,
    /// Its kind.
    pub kind: HeadKind,
    /// Where the labels come from.
    pub source: LabelSource,
    /// Which slide vector a slide head reads (ignored by attention MIL, which reads tiles).
    pub space: Space,
    /// Cross-validation settings (also the linear probe's penalty sweep and kNN's k).
    pub cv: CvConfig,
    /// Attention MIL sizes and schedule.
    pub abmil: AbmilConfig,
    /// Cross-validate before the final fit and keep the scores in the manifest.
    pub evaluate: bool,
    /// Overwrite a head of the same name.
    pub replace: bool,
}

/// The folder of heads of a data dir.
pub fn probes_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(artefact::PROBES_DIR)
}

/// Trains, optionally cross-validates, and saves a head; returns its manifest.
pub async fn train_head(store: &Store, req: &TrainHeadRequest) -> Result<Manifest> {
    artefact::check_name(&req.name)?;
    let (ds, info, unlabelled) = load_dataset(store, &req.source, req.space).await?;
    if unlabelled > 0 {
        tracing::info!(
            "{unlabelled} embedded slide(s) without a `{}` label left out",
            req.source.label
        );
    }
    let (model, input, dim, input_fp, params, metrics) = match req.kind {
        HeadKind::Abmil => {
            let (bags, tile_fp) = abmil::load_bags(store, &ds.slide_ids).await?;
            let metrics = if req.evaluate {
                Some(abmil::cross_validate(&ds, &bags, &req.cv, &req.abmil)?)
            } else {
                None
            };
            let (model, losses) = Abmil::fit(&ds, &bags, &req.abmil)?;
            let params = serde_json::json!({"abmil": req.abmil, "epoch_losses": losses});
            let dim = model.dim();
            (
                HeadModel::Abmil(model),
                Input::Tiles,
                dim,
                tile_fp,
                params,
                metrics,
            )
        }
        kind => {
            let metrics = if req.evaluate {
                Some(cross_validate(&ds, kind, &req.cv)?)
            } else {
                None
            };
            let (head, params) = match kind {
                HeadKind::Linear => {
                    let (p, sweep) = fit_linear_swept(&ds, &req.cv)?;
                    let params = serde_json::json!({"lambda": p.lambda, "sweep_balanced_accuracy": sweep, "steps": req.cv.linear.steps, "lr": req.cv.linear.lr, "inner_folds": req.cv.inner_folds});
                    (SlideHead::Linear(p), params)
                }
                HeadKind::Knn => (
                    SlideHead::Knn(Knn::fit(&ds, req.cv.knn_k)?),
                    serde_json::json!({"k": req.cv.knn_k.min(ds.len())}),
                ),
                _ => (
                    SlideHead::Prototype(Prototypes::fit(&ds)?),
                    serde_json::json!({"temperature": crate::heads::PROTOTYPE_TEMPERATURE}),
                ),
            };
            let input = match req.space {
                Space::Slide => Input::Slide,
                Space::Joint => Input::Joint,
            };
            (
                HeadModel::Slide(head),
                input,
                info.dim,
                info.fingerprint.clone(),
                params,
                metrics,
            )
        }
    };
    let manifest = Manifest {
        format: String::new(),
        name: req.name.clone(),
        kind: req.kind,
        label: ds.label.clone(),
        classes: ds.classes.clone(),
        input,
        dim,
        input_fingerprint: input_fp,
        fingerprint: String::new(),
        params,
        training_set: training_set(&ds, &req.source),
        metrics,
        created_at: artefact::utc_now(),
        gigapath_version: env!("CARGO_PKG_VERSION").into(),
    };
    artefact::save(
        &probes_dir(&store.config.data_dir),
        manifest,
        &model,
        req.replace,
    )
}

fn training_set(ds: &Dataset, source: &LabelSource) -> TrainingSet {
    TrainingSet {
        slides: ds.len(),
        patients: ds.groups.iter().collect::<BTreeSet<_>>().len(),
        support: ds.classes.iter().cloned().zip(ds.support()).collect(),
        fingerprint: ds.fingerprint(),
        labels_from: source
            .csv
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "catalog".into()),
    }
}

/// A head's answer for one slide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Classification {
    /// Slide id.
    pub slide_id: String,
    /// Probability per class.
    pub probabilities: BTreeMap<String, f32>,
    /// The most probable class.
    pub predicted: String,
    /// The slide's stored value of the head's label, if any.
    pub known_label: Option<String>,
    /// Attention MIL only: `[gx, gy, weight]` per tile (weights sum to 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention: Option<Vec<(u32, u32, f32)>>,
}

/// Applies `head` to stored slides `ids`. Inputs made by other weights than the head was trained
/// on are refused ([`ProbeError::Fingerprint`]), an unknown slide is [`ProbeError::UnknownSlide`].
pub async fn classify(
    store: &Store,
    head: &StoredHead,
    ids: &[String],
) -> Result<Vec<Classification>> {
    let m = &head.manifest;
    let answer = |id: &str, probs: Vec<f32>, known: Option<String>, attention| {
        let best = gigapath_zeroshot::classify::argmax(&probs);
        Classification {
            slide_id: id.to_string(),
            predicted: m.classes[best].clone(),
            probabilities: m.classes.iter().cloned().zip(probs).collect(),
            known_label: known,
            attention,
        }
    };
    let guard = |id: &str, fp: &str| {
        if fp != m.input_fingerprint {
            return Err(ProbeError::Fingerprint(format!(
                "slide `{id}` has {} inputs from weights {fp}, but head `{}` was trained on {}: retrain the head or re-embed the slide",
                m.input, m.name, m.input_fingerprint
            )));
        }
        Ok(())
    };
    match &head.model {
        HeadModel::Slide(h) => {
            let space = if m.input == Input::Joint {
                Space::Joint
            } else {
                Space::Slide
            };
            let vectors = slide_vectors(store, ids, space).await?;
            vectors
                .into_iter()
                .map(|v| {
                    guard(&v.slide_id, &v.fingerprint)?;
                    let probs = h.predict_proba(&v.x)?;
                    Ok(answer(
                        &v.slide_id,
                        probs,
                        v.labels.get(&m.label).cloned(),
                        None,
                    ))
                })
                .collect()
        }
        HeadModel::Abmil(model) => {
            let (bags, tile_fp) = abmil::load_bags(store, ids).await?;
            let mut out = Vec::with_capacity(ids.len());
            for (id, bag) in ids.iter().zip(&bags) {
                guard(id, &tile_fp)?;
                let p = model.predict(bag)?;
                let known = store
                    .catalog
                    .slide(id)
                    .await?
                    .and_then(|r| r.labels.get(&m.label).cloned());
                let attention = bag
                    .grid
                    .iter()
                    .zip(&p.attention)
                    .map(|(g, &a)| (g[0], g[1], a))
                    .collect();
                out.push(answer(id, p.probabilities, known, Some(attention)));
            }
            Ok(out)
        }
    }
}
