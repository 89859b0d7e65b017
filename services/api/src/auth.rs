//! API keys: required on ingest, delete and admin endpoints, optional on reads
//! (`serve.require_key_for_reads`). A key travels as `Authorization: Bearer KEY` or
//! `X-Api-Key: KEY` and is compared in constant time.

use std::future::{ready, Ready};

use actix_web::{web, FromRequest, HttpRequest};

use crate::error::ApiError;
use crate::state::AppState;

/// Proof that the request carries an admin key (extractor for write endpoints).
pub struct AdminKey;

/// Proof that the request may read (extractor for read endpoints).
pub struct ReadAccess;

fn presented(req: &HttpRequest) -> Option<String> {
    let h = req.headers();
    if let Some(v) = h.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_string());
    }
    h.get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|v| v.trim().to_string())
}

/// Equal-length, data-independent comparison, so timing does not reveal a key's prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn check(req: &HttpRequest, what: &str) -> Result<(), ApiError> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::Internal("application state missing".into()))?;
    let keys = &state.config.serve.api_keys;
    if keys.is_empty() {
        return Err(ApiError::Forbidden(format!(
            "{what} is disabled: no API keys are configured (serve.api_keys or GIGAPATH_API_KEYS)"
        )));
    }
    let Some(given) = presented(req) else {
        return Err(ApiError::Unauthorized(format!(
            "{what} needs an API key (Authorization: Bearer KEY or X-Api-Key: KEY)"
        )));
    };
    if keys
        .iter()
        .any(|k| constant_time_eq(k.as_bytes(), given.as_bytes()))
    {
        Ok(())
    } else {
        Err(ApiError::Unauthorized("invalid API key".into()))
    }
}

impl FromRequest for AdminKey {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        ready(check(req, "this endpoint").map(|_| AdminKey))
    }
}

impl FromRequest for ReadAccess {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let needs_key = req
            .app_data::<web::Data<AppState>>()
            .is_some_and(|s| s.config.serve.require_key_for_reads);
        ready(if needs_key {
            check(req, "reading").map(|_| ReadAccess)
        } else {
            Ok(ReadAccess)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison_needs_every_byte() {
        assert!(constant_time_eq(b"abcdefgh", b"abcdefgh"));
        assert!(!constant_time_eq(b"abcdefgh", b"abcdefgX"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
