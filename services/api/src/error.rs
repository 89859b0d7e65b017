//! The service's one error type, and the one place errors become HTTP status codes and the
//! `{ "error": { "code", "message" } }` body.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use gigapath_pipeline::PipelineError;
use gigapath_store::StoreError;
use serde::Serialize;
use utoipa::ToSchema;

/// Every failure a request can meet, by what the client can do about it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed or invalid input (400).
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong API key (401).
    #[error("{0}")]
    Unauthorized(String),
    /// The endpoint is disabled by configuration (403).
    #[error("{0}")]
    Forbidden(String),
    /// An unknown slide, report, prompt set or route (404).
    #[error("{0}")]
    NotFound(String),
    /// A known route asked with a method it does not serve (405, with `Allow`).
    #[error("{message}")]
    MethodNotAllowed {
        /// What was asked, for people.
        message: String,
        /// The methods the route serves, comma-separated (the `Allow` header).
        allow: String,
    },
    /// The store holds embeddings that do not match the loaded models, or the service lacks
    /// what the request needs (e.g. an alignment checkpoint) (409).
    #[error("{0}")]
    Conflict(String),
    /// The request body did not arrive within `serve.read_timeout_seconds` (408).
    #[error("{0}")]
    RequestTimeout(String),
    /// The body is over the configured limit (413).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The work did not finish within the request timeout (503).
    #[error("{0}")]
    Unavailable(String),
    /// More requests in flight than `serve.max_in_flight` (503, with `Retry-After`).
    #[error("{0}")]
    Overloaded(String),
    /// A fault of ours (500): logged with details, answered without them.
    #[error("internal error")]
    Internal(String),
}

/// What an overloaded service asks clients to wait before retrying (`Retry-After`, seconds).
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// The error body.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The `error` object of an error body.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `bad_request`, `not_found`, `fingerprint_mismatch`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
}

impl ApiError {
    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Overloaded(_) => "overloaded",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) | ApiError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(detail) = self {
            tracing::error!("internal error: {detail}");
        }
        let mut response = HttpResponse::build(self.status_code());
        match self {
            ApiError::MethodNotAllowed { allow, .. } => {
                response.insert_header((actix_web::http::header::ALLOW, allow.as_str()));
            }
            ApiError::Overloaded(_) | ApiError::Unavailable(_) => {
                response.insert_header((actix_web::http::header::RETRY_AFTER, RETRY_AFTER_SECONDS));
            }
            // The client was too slow to send its body: the connection is not reused.
            ApiError::RequestTimeout(_) => {
                response.force_close();
            }
            _ => {}
        }
        response.json(ErrorBody {
            error: ErrorDetail {
                code: self.code().to_string(),
                message: self.to_string(),
            },
        })
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let msg = e.to_string();
        match e {
            StoreError::FingerprintMismatch { .. } => ApiError::Conflict(format!(
                "{msg}: the stored embeddings come from other weights than the service's models; \
                 re-embed them (gigapath reembed) or serve with the models that made them"
            )),
            StoreError::UnknownSlide(_) => ApiError::NotFound(msg),
            StoreError::InvalidRequest(_)
            | StoreError::InvalidPoint { .. }
            | StoreError::UnknownVector { .. } => ApiError::BadRequest(msg),
            StoreError::DimensionMismatch { .. } | StoreError::SchemaMismatch { .. } => {
                ApiError::Conflict(msg)
            }
            // An outage or a full disk passes: 503, details in the log (they name server
            // addresses and data-dir paths), not in the answer.
            ref transient if transient.is_transient() => {
                tracing::warn!("store unavailable: {msg}");
                ApiError::Unavailable(
                    "the vector store or the catalog is unavailable right now (a server outage \
                     or a full disk); try again later"
                        .into(),
                )
            }
            _ => ApiError::Internal(msg),
        }
    }
}

impl From<PipelineError> for ApiError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::Store(s) => s.into(),
            PipelineError::Input(m) => ApiError::BadRequest(m),
            PipelineError::MissingModel { .. } | PipelineError::Config(_) => {
                ApiError::Conflict(e.to_string())
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        ApiError::Internal(format!("background task failed: {e}"))
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(e: actix_web::error::BlockingError) -> Self {
        ApiError::Internal(format!("blocking task failed: {e}"))
    }
}

/// Result with the service's [`ApiError`].
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_or_an_outage_is_a_503_that_names_no_path() {
        let full = StoreError::Io {
            op: "flush",
            path: "/srv/gigapath-data/vectors/slides".into(),
            err: std::io::Error::new(std::io::ErrorKind::StorageFull, "No space left on device"),
        };
        let api = ApiError::from(full);
        assert_eq!(api.status_code(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!api.to_string().contains("/srv"), "{api}");
        let response = api.error_response();
        assert!(response
            .headers()
            .contains_key(actix_web::http::header::RETRY_AFTER));
        // Errors of the request keep their own status.
        let bug = ApiError::from(StoreError::InvalidRequest("x".into()));
        assert_eq!(bug.status_code(), StatusCode::BAD_REQUEST);
    }
}
