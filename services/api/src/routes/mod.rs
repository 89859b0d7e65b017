//! One module per API resource; each handler validates, calls, and maps the result.

pub mod classify;
pub mod health;
pub mod ids;
pub mod ingest;
pub mod jobs;
pub mod search;
pub mod slides;
pub mod zeroshot;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use actix_web::{dev::Payload, web, FromRequest, HttpRequest};
use gigapath_pipeline::config::ServeConfig;
use gigapath_store::vector::PayloadFilter;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};

/// A JSON request body that must be an object, deserialized into `T`. Like `web::Json<T>` (same
/// limits, content type and errors), but a top-level array is refused: serde would otherwise
/// fill a struct's fields from it by position, accepting bodies the OpenAPI document calls
/// invalid. The whole body must arrive within `serve.read_timeout_seconds` of the handler
/// starting to read it, else 408 (a client trickling its body cannot hold a worker's request
/// slot and buffer for longer).
pub struct Body<T>(pub T);

impl<T> Body<T> {
    /// The deserialized body.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for Body<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: DeserializeOwned + 'static> FromRequest for Body<T> {
    type Error = actix_web::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let json = web::Json::<serde_json::Value>::from_request(req, payload);
        let deadline = req
            .app_data::<web::Data<crate::state::AppState>>()
            .map(|s| s.config.serve.read_timeout_seconds);
        Box::pin(async move {
            let value = match deadline {
                Some(secs) => actix_web::rt::time::timeout(Duration::from_secs(secs), json)
                    .await
                    .map_err(|_| {
                        ApiError::RequestTimeout(format!(
                            "the request body did not arrive within {secs} s (serve.read_timeout_seconds)"
                        ))
                    })??,
                None => json.await?,
            }
            .into_inner();
            Ok(Body(body_from_value(value)?))
        })
    }
}

/// A parsed JSON body as [`Body`] takes it: a JSON object, deserialized into `T`; anything else
/// is 400 "invalid JSON body". Pure, so the fuzz targets call it on arbitrary JSON.
pub fn body_from_value<T: DeserializeOwned>(value: serde_json::Value) -> ApiResult<T> {
    if !value.is_object() {
        return Err(ApiError::BadRequest(
            "invalid JSON body: expected a JSON object".into(),
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// One value or several (any of them matches).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single value.
    One(String),
    /// Several values, any of which matches.
    Many(Vec<String>),
}

impl OneOrMany {
    fn values(&self) -> Vec<String> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// Payload filters: every given field must match (exact keyword match; a list matches any).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Cohort name(s) (on reports: the report's `cohort` label).
    pub cohort: Option<OneOrMany>,
    /// Site(s), e.g. `kidney` (on reports: the report's `site` label).
    pub site: Option<OneOrMany>,
    /// Slide id(s) (on reports: the slide the report describes).
    pub slide_id: Option<OneOrMany>,
    /// Label filters, e.g. `{"subtype": "LUAD"}`.
    #[serde(default)]
    pub labels: BTreeMap<String, OneOrMany>,
}

/// Which collection a filter applies to: slide points carry `cohort` and `site` at the top of
/// their payload, report points carry them among their labels (`labels.cohort`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterTarget {
    /// The `slides` collection.
    Slides,
    /// The `reports` collection.
    Reports,
}

impl Filter {
    /// The store filter for `target`; 400 on an empty value, a bad slide id or a bad label name.
    pub fn to_payload_filter(&self, target: FilterTarget) -> ApiResult<PayloadFilter> {
        let mut f = PayloadFilter::none();
        let (cohort, site) = match target {
            FilterTarget::Slides => ("cohort", "site"),
            FilterTarget::Reports => ("labels.cohort", "labels.site"),
        };
        for (name, key, v) in [
            ("cohort", cohort, &self.cohort),
            ("site", site, &self.site),
            ("slide_id", "slide_id", &self.slide_id),
        ] {
            if let Some(v) = v {
                f = f.any_of(key, nonempty(name, v.values())?);
            }
        }
        if let Some(v) = &self.slide_id {
            ids::check_all(ids::IdKind::Slide, "filter.slide_id", &v.values())?;
        }
        for (k, v) in &self.labels {
            if k.is_empty()
                || !k
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(ApiError::BadRequest(format!(
                    "label name `{k}`: letters, digits, `_` and `-` only"
                )));
            }
            f = f.any_of(format!("labels.{k}"), nonempty(k, v.values())?);
        }
        Ok(f)
    }
}

fn nonempty(key: &str, values: Vec<String>) -> ApiResult<Vec<String>> {
    if values.is_empty() || values.iter().any(|v| v.is_empty()) {
        return Err(ApiError::BadRequest(format!(
            "filter `{key}` needs non-empty values"
        )));
    }
    Ok(values)
}

/// `k` within 1..=serve.max_k.
pub fn check_k(k: usize, cfg: &ServeConfig) -> ApiResult<usize> {
    if k == 0 || k > cfg.max_k {
        return Err(ApiError::BadRequest(format!(
            "k = {k}: must be between 1 and {}",
            cfg.max_k
        )));
    }
    Ok(k)
}

/// A query text: not blank, not longer than serve.max_text_chars.
pub fn check_text(what: &str, text: &str, cfg: &ServeConfig) -> ApiResult<String> {
    let t = text.trim();
    if t.is_empty() {
        return Err(ApiError::BadRequest(format!("{what} is empty")));
    }
    let n = t.chars().count();
    if n > cfg.max_text_chars {
        return Err(ApiError::BadRequest(format!(
            "{what} has {n} characters; the limit is {}",
            cfg.max_text_chars
        )));
    }
    Ok(t.to_string())
}

/// `k` when a request gives none: 10.
pub fn default_k() -> usize {
    10
}

/// A count such as `k`: a whole number, also when written `10.0` (JSON Schema counts 10.0 as an
/// integer, so clients may send it).
pub fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    if let Some(u) = n.as_u64() {
        return usize::try_from(u)
            .map_err(|_| serde::de::Error::custom(format!("invalid value: {n} is too large")));
    }
    match n.as_f64() {
        Some(f) if f >= 0.0 && f.fract() == 0.0 && f <= u32::MAX as f64 => Ok(f as usize),
        _ => Err(serde::de::Error::custom(format!(
            "invalid value: {n}, expected a whole number"
        ))),
    }
}

/// One search result.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Hit {
    /// Slide or report id.
    pub id: String,
    /// Cosine similarity.
    pub score: f32,
    /// Stored payload (slide: cohort, site, labels, mpp, tile_count, fingerprints; report:
    /// slide_id, text, labels).
    #[schema(value_type = Object)]
    pub payload: serde_json::Map<String, serde_json::Value>,
}

impl From<gigapath_store::vector::SearchHit> for Hit {
    fn from(h: gigapath_store::vector::SearchHit) -> Self {
        Hit {
            id: h.id,
            score: h.score,
            payload: h.payload,
        }
    }
}
