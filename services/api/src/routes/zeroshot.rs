//! Zero-shot prediction over stored slides: `/v1/zero-shot/subtype`, `/v1/zero-shot/mutation`,
//! and the prompt sets they use (`/v1/prompt-sets`).
//!
//! Class embedding = mean of the L2-normalised aligned text embeddings over (class names x
//! templates), renormalised; probabilities = softmax(logit_scale x cosine) (MI-Zero / CLIP), or
//! softmax(cosine) with `"no_temperature": true` (TITAN). Prompt-set embeddings are computed once
//! per set and cached: a request touches the text encoder only for inline classes.

use std::collections::BTreeMap;

use actix_web::{get, post, web};
use gigapath_pipeline::config::ServeConfig;
use gigapath_store::vector::{JOINT, SLIDES};
use gigapath_zeroshot::{ClassPrompts, PromptLibrary, SubtypeSet};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::ReadAccess;
use crate::error::{ApiError, ApiResult};
use crate::state::{zeroshot_error, AppState};

/// The body of `POST /v1/zero-shot/subtype`: stored slides and the classes to choose from.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubtypeRequest {
    /// Stored slides to classify, 1 to `serve.max_slide_ids`.
    pub slide_ids: Vec<String>,
    /// A prompt set of `/v1/prompt-sets`, e.g. `nsclc`, `rcc`.
    pub prompt_set: Option<String>,
    /// Or classes given inline: label -> its pool of names, e.g.
    /// `{"LUAD": ["lung adenocarcinoma", "adenocarcinoma of the lung"], "LUSC": [...]}`, with
    /// `templates` (default: the MI-Zero 16). Answers list the labels in sorted order.
    pub classes: Option<BTreeMap<String, Vec<String>>>,
    /// Templates for inline classes (`CLASSNAME` is replaced by each name); not with `prompt_set`.
    pub templates: Option<Vec<String>>,
    /// softmax over raw cosines (TITAN) instead of the alignment's logit scale.
    #[serde(default)]
    pub no_temperature: bool,
}

/// The answer for one slide.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubtypeResult {
    /// The slide.
    pub slide_id: String,
    /// Probability per class label.
    pub probabilities: BTreeMap<String, f32>,
    /// The most probable class label.
    pub predicted: String,
    /// Cosine similarity per class label.
    pub cosines: BTreeMap<String, f32>,
    /// The slide's known label for comparison, if any (`labels.subtype`).
    pub known_label: Option<String>,
}

/// The prompt ensemble an answer used.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ensemble {
    /// The set's name (`inline` for inline classes).
    pub prompt_set: String,
    /// Class labels, in the order of the set's classes.
    pub labels: Vec<String>,
    /// Templates per class name.
    pub templates: usize,
    /// Names in each class's pool, in `labels` order.
    pub names_per_class: Vec<usize>,
    /// The scale applied to cosines (1 with `no_temperature`).
    pub logit_scale: f32,
}

/// The answer of `POST /v1/zero-shot/subtype`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubtypeResponse {
    /// One per requested slide, in request order.
    pub results: Vec<SubtypeResult>,
    /// The prompts used.
    pub ensemble: Ensemble,
}

/// The body of `POST /v1/zero-shot/mutation`: stored slides and the genes to score.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MutationRequest {
    /// Stored slides to score, 1 to `serve.max_slide_ids`.
    pub slide_ids: Vec<String>,
    /// Genes, e.g. ["EGFR", "KRAS"]; default: every gene of the set.
    pub genes: Option<Vec<String>>,
    /// A mutation prompt set (default `luad-mutations`).
    pub prompt_set: Option<String>,
    /// softmax over raw cosines (TITAN) instead of the alignment's logit scale.
    #[serde(default)]
    pub no_temperature: bool,
}

/// The answer for one slide.
#[derive(Debug, Serialize, ToSchema)]
pub struct MutationResult {
    /// The slide.
    pub slide_id: String,
    /// P(mutated phrasing) versus the wild-type phrasing, per gene.
    pub probability_mutated: BTreeMap<String, f32>,
}

/// The answer of `POST /v1/zero-shot/mutation`.
#[derive(Debug, Serialize, ToSchema)]
pub struct MutationResponse {
    /// One per requested slide, in request order.
    pub results: Vec<MutationResult>,
    /// The mutation set used.
    pub prompt_set: String,
    /// Templates per phrasing.
    pub templates: usize,
    /// The scale applied to cosines (1 with `no_temperature`).
    pub logit_scale: f32,
}

/// A subtype prompt set, as `GET /v1/prompt-sets` lists it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubtypeSetInfo {
    /// The name requests give as `prompt_set`.
    pub name: String,
    /// What it is for; empty when not given.
    pub description: String,
    /// Its class labels.
    pub labels: Vec<String>,
    /// Templates per class name.
    pub templates: usize,
    /// Names in each class's pool, in `labels` order.
    pub names_per_class: Vec<usize>,
}

/// A mutation prompt set, as `GET /v1/prompt-sets` lists it.
#[derive(Debug, Serialize, ToSchema)]
pub struct MutationSetInfo {
    /// The name requests give as `prompt_set`.
    pub name: String,
    /// What it is for; empty when not given.
    pub description: String,
    /// Its genes.
    pub genes: Vec<String>,
    /// Templates per phrasing.
    pub templates: usize,
}

/// The answer of `GET /v1/prompt-sets`: every set of the service's prompts folder.
#[derive(Debug, Serialize, ToSchema)]
pub struct PromptSets {
    /// Subtype sets, by name.
    pub subtype_sets: Vec<SubtypeSetInfo>,
    /// Mutation sets, by name.
    pub mutation_sets: Vec<MutationSetInfo>,
}

/// A subtype request that passed the checks its handler runs before any lookup.
#[derive(Debug)]
pub struct CheckedSubtype {
    /// The prompt set (from the library, or built from the inline classes).
    pub set: SubtypeSet,
    /// Whether the set's class embeddings may be cached (a library set).
    pub cache: bool,
    /// The request's own labels of inline classes, in the set's class order.
    pub inline_labels: Option<Vec<String>>,
}

impl SubtypeRequest {
    /// The checks `POST /v1/zero-shot/subtype` runs before touching the store or an encoder,
    /// in its order: the prompt set or the inline classes (within the documented limits), then
    /// the slide ids.
    pub fn check(&self, prompts: &PromptLibrary, cfg: &ServeConfig) -> ApiResult<CheckedSubtype> {
        let req = self;
        // Inline labels are the request's keys, any two distinct strings (the prompt library's
        // rule of case-insensitively unique labels is for files): the set gets positional ones.
        let mut inline_labels = None;
        let (set, cache) = match (&req.prompt_set, req.classes.clone()) {
            (Some(_), Some(_)) => {
                return Err(ApiError::BadRequest(
                    "give `prompt_set` or `classes`, not both".into(),
                ))
            }
            (None, None) => {
                return Err(ApiError::BadRequest(
                    "give `prompt_set` or `classes`".into(),
                ))
            }
            (Some(_), None) if req.templates.is_some() => {
                return Err(ApiError::BadRequest(
                    "`templates` go with inline `classes`; a prompt set brings its own".into(),
                ))
            }
            (Some(name), None) => (prompts.subtype(name).map_err(zeroshot_error)?.clone(), true),
            (None, Some(classes)) => {
                let templates = req.templates.clone().unwrap_or_else(|| {
                    prompts
                        .template_groups
                        .get("mi-zero")
                        .map(|g| g.templates.clone())
                        .unwrap_or_default()
                });
                check_inline(&classes, &templates, cfg.max_text_chars)?;
                inline_labels = Some(classes.keys().cloned().collect::<Vec<_>>());
                let classes = classes
                    .into_values()
                    .enumerate()
                    .map(|(i, names)| ClassPrompts {
                        label: format!("class-{i}"),
                        names,
                    })
                    .collect();
                (
                    SubtypeSet::inline("inline", classes, templates).map_err(zeroshot_error)?,
                    false,
                )
            }
        };
        check_slide_ids(&req.slide_ids, cfg)?;
        Ok(CheckedSubtype {
            set,
            cache,
            inline_labels,
        })
    }
}

/// A mutation request that passed the checks its handler runs before any lookup.
#[derive(Debug)]
pub struct CheckedMutation {
    /// The prompt set's name.
    pub name: String,
    /// The genes asked for (upper case), all of the set's by default.
    pub genes: Vec<String>,
    /// The set's template count.
    pub templates: usize,
}

impl MutationRequest {
    /// The checks `POST /v1/zero-shot/mutation` runs before touching the store or an encoder,
    /// in its order: the prompt set, the genes, then the slide ids.
    pub fn check(&self, prompts: &PromptLibrary, cfg: &ServeConfig) -> ApiResult<CheckedMutation> {
        let req = self;
        let name = req
            .prompt_set
            .clone()
            .unwrap_or_else(|| "luad-mutations".into());
        let set = prompts.mutation(&name).map_err(zeroshot_error)?;
        let known: Vec<String> = set.genes.iter().map(|g| g.gene.clone()).collect();
        let genes: Vec<String> = match &req.genes {
            Some(g) if g.is_empty() => return Err(ApiError::BadRequest("`genes` is empty".into())),
            Some(g) if g.len() > crate::openapi::MAX_GENES => {
                return Err(ApiError::BadRequest(format!(
                    "{} genes; the limit is {}",
                    g.len(),
                    crate::openapi::MAX_GENES
                )))
            }
            Some(g) => g.iter().map(|x| x.trim().to_uppercase()).collect(),
            None => known.clone(),
        };
        if let Some(bad) = genes.iter().find(|g| !known.contains(g)) {
            return Err(ApiError::NotFound(format!(
                "gene `{bad}` is not in prompt set `{name}` (known: {})",
                known.join(", ")
            )));
        }
        check_slide_ids(&req.slide_ids, cfg)?;
        Ok(CheckedMutation {
            name,
            genes,
            templates: set.templates.len(),
        })
    }
}

/// The `slide_ids` of a zero-shot request: 1 to `serve.max_slide_ids`, each a valid slide id.
pub fn check_slide_ids(ids: &[String], cfg: &ServeConfig) -> ApiResult<()> {
    if ids.is_empty() {
        return Err(ApiError::BadRequest("`slide_ids` is empty".into()));
    }
    if ids.len() > cfg.max_slide_ids {
        return Err(ApiError::BadRequest(format!(
            "{} slide ids; the limit is {}",
            ids.len(),
            cfg.max_slide_ids
        )));
    }
    super::ids::check_all(super::ids::IdKind::Slide, "slide_ids", ids)
}

/// The prompt sets loaded from the prompts folder.
#[utoipa::path(responses((status = 200, body = PromptSets)))]
#[get("/v1/prompt-sets")]
pub async fn prompt_sets(_r: ReadAccess, state: web::Data<AppState>) -> web::Json<PromptSets> {
    let p = &state.prompts;
    web::Json(PromptSets {
        subtype_sets: p
            .subtype_sets()
            .map(|s| SubtypeSetInfo {
                name: s.name.clone(),
                description: s.description.clone(),
                labels: s.labels(),
                templates: s.templates.len(),
                names_per_class: s.classes.iter().map(|c| c.names.len()).collect(),
            })
            .collect(),
        mutation_sets: p
            .mutation_sets()
            .map(|s| MutationSetInfo {
                name: s.name.clone(),
                description: s.description.clone(),
                genes: s.genes.iter().map(|g| g.gene.clone()).collect(),
                templates: s.templates.len(),
            })
            .collect(),
    })
}

/// The stored joint vectors (and known subtype labels) of `ids` (checked by
/// [`check_slide_ids`]), in order; unknown ids are 404 and slides without an aligned embedding
/// 409.
async fn slide_joints(
    state: &AppState,
    ids: &[String],
) -> ApiResult<Vec<(Vec<f32>, Option<String>)>> {
    let fingerprints = state.fingerprints().await?;
    let store = state.pipeline.store.clone();
    let wanted = ids.to_vec();
    let points = state
        .store(async move { store.vectors.retrieve(SLIDES, &wanted, true).await })
        .await?;
    let by_id: BTreeMap<&str, _> = points.iter().map(|p| (p.id.as_str(), p)).collect();
    let missing: Vec<&str> = ids
        .iter()
        .map(String::as_str)
        .filter(|id| !by_id.contains_key(id))
        .collect();
    if !missing.is_empty() {
        return Err(ApiError::NotFound(format!(
            "unknown slide ids: {}",
            missing.join(", ")
        )));
    }
    ids.iter()
        .map(|id| {
            let p = by_id[id.as_str()];
            if p.fingerprint != fingerprints.slides {
                return Err(ApiError::Conflict(format!(
                    "slide `{id}` was embedded with other weights ({}) than the service's models ({}); re-embed it",
                    p.fingerprint, fingerprints.slides
                )));
            }
            let joint = p.vectors.get(JOINT).cloned().ok_or_else(|| {
                ApiError::Conflict(format!("slide `{id}` has no aligned embedding yet (gigapath reembed)"))
            })?;
            let label = p.payload.get("labels").and_then(|l| l.get("subtype")).and_then(|v| v.as_str()).map(String::from);
            Ok((joint, label))
        })
        .collect()
}

/// Inline classes and templates within the limits the OpenAPI document states
/// (`crate::openapi::MAX_INLINE_*`): at most 1920 prompts, so the text encoder's work per request
/// stays bounded. Filled prompts longer than `serve.max_text_chars` are cut there when embedded
/// (the encoder truncates long texts anyway).
fn check_inline(
    classes: &BTreeMap<String, Vec<String>>,
    templates: &[String],
    max_chars: usize,
) -> ApiResult<()> {
    use crate::openapi::{MAX_INLINE_CLASSES, MAX_INLINE_NAMES, MAX_INLINE_TEMPLATES};
    if classes.len() < 2 || classes.len() > MAX_INLINE_CLASSES {
        return Err(ApiError::BadRequest(format!(
            "inline zero-shot needs 2 to {MAX_INLINE_CLASSES} classes, not {}",
            classes.len()
        )));
    }
    if templates.len() > MAX_INLINE_TEMPLATES {
        return Err(ApiError::BadRequest(format!(
            "{} templates; the limit is {MAX_INLINE_TEMPLATES}",
            templates.len()
        )));
    }
    for (label, names) in classes {
        if names.is_empty() || names.len() > MAX_INLINE_NAMES {
            return Err(ApiError::BadRequest(format!(
                "class `{label}` has {} names; give 1 to {MAX_INLINE_NAMES}",
                names.len()
            )));
        }
    }
    let texts = classes
        .iter()
        .flat_map(|(label, names)| names.iter().chain([label]))
        .chain(templates);
    for t in texts {
        if t.trim().is_empty() || t.chars().count() > max_chars {
            return Err(ApiError::BadRequest(format!(
                "class names, labels and templates must be non-blank and at most {max_chars} characters"
            )));
        }
    }
    Ok(())
}

/// Per-class probabilities of stored slides, from a prompt set or inline classes.
#[utoipa::path(
    request_body = SubtypeRequest,
    responses((status = 200, body = SubtypeResponse), (status = 400, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody))
)]
#[post("/v1/zero-shot/subtype")]
pub async fn subtype(
    _r: ReadAccess,
    state: web::Data<AppState>,
    req: super::Body<SubtypeRequest>,
) -> ApiResult<web::Json<SubtypeResponse>> {
    let req = req.into_inner();
    let CheckedSubtype {
        set,
        cache,
        inline_labels,
    } = req.check(&state.prompts, &state.config.serve)?;
    let slides = slide_joints(&state, &req.slide_ids).await?;
    let temperature = state.temperature(req.no_temperature).await?;
    let labels = inline_labels.unwrap_or_else(|| set.labels());
    let ensemble = Ensemble {
        prompt_set: set.name.clone(),
        labels: labels.clone(),
        templates: set.templates.len(),
        names_per_class: set.classes.iter().map(|c| c.names.len()).collect(),
        logit_scale: match temperature {
            gigapath_zeroshot::Temperature::LogitScale(s) => s,
            gigapath_zeroshot::Temperature::None => 1.0,
        },
    };
    let classes = state.class_embeddings(set, cache).await?;
    let results = req
        .slide_ids
        .iter()
        .zip(slides)
        .map(|(id, (joint, known))| {
            let p = classes
                .classify(&joint, temperature)
                .map_err(zeroshot_error)?;
            Ok(SubtypeResult {
                slide_id: id.clone(),
                probabilities: labels
                    .iter()
                    .cloned()
                    .zip(p.probabilities.iter().copied())
                    .collect(),
                cosines: labels
                    .iter()
                    .cloned()
                    .zip(p.cosines.iter().copied())
                    .collect(),
                predicted: labels[p.index].clone(),
                known_label: known,
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(web::Json(SubtypeResponse { results, ensemble }))
}

/// P(mutated) per gene for stored slides, from mutation prompts.
#[utoipa::path(
    request_body = MutationRequest,
    responses((status = 200, body = MutationResponse), (status = 400, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody))
)]
#[post("/v1/zero-shot/mutation")]
pub async fn mutation(
    _r: ReadAccess,
    state: web::Data<AppState>,
    req: super::Body<MutationRequest>,
) -> ApiResult<web::Json<MutationResponse>> {
    let req = req.into_inner();
    let CheckedMutation {
        name,
        genes,
        templates,
    } = req.check(&state.prompts, &state.config.serve)?;
    let slides = slide_joints(&state, &req.slide_ids).await?;
    let temperature = state.temperature(req.no_temperature).await?;
    let embeddings = state.gene_embeddings(&name).await?;
    let results = req
        .slide_ids
        .iter()
        .zip(slides)
        .map(|(id, (joint, _))| {
            let mut probability_mutated = BTreeMap::new();
            for g in embeddings.iter().filter(|g| genes.contains(&g.gene)) {
                probability_mutated.insert(
                    g.gene.clone(),
                    g.probability(&joint, temperature).map_err(zeroshot_error)?,
                );
            }
            Ok(MutationResult {
                slide_id: id.clone(),
                probability_mutated,
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(web::Json(MutationResponse {
        results,
        prompt_set: name,
        templates,
        logit_scale: match temperature {
            gigapath_zeroshot::Temperature::LogitScale(s) => s,
            gigapath_zeroshot::Temperature::None => 1.0,
        },
    }))
}
