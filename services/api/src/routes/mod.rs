//! One module per API resource; each handler validates, calls, and maps the result.

pub mod health;
pub mod ingest;
pub mod search;
pub mod slides;

use std::collections::BTreeMap;

use gigapath_store::vector::PayloadFilter;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};
use gigapath_pipeline::config::ServeConfig;

/// One value or several (any of them matches).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
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
    pub cohort: Option<OneOrMany>,
    pub site: Option<OneOrMany>,
    pub slide_id: Option<OneOrMany>,
    /// Label filters, e.g. `{"subtype": "LUAD"}`.
    #[serde(default)]
    pub labels: BTreeMap<String, OneOrMany>,
}

impl Filter {
    pub fn to_payload_filter(&self) -> ApiResult<PayloadFilter> {
        let mut f = PayloadFilter::none();
        for (key, v) in [
            ("cohort", &self.cohort),
            ("site", &self.site),
            ("slide_id", &self.slide_id),
        ] {
            if let Some(v) = v {
                f = f.any_of(key, nonempty(key, v.values())?);
            }
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

pub fn default_k() -> usize {
    10
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
