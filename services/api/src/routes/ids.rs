//! The id rules, in one place: every slide or report id in a request path or body is checked
//! here, and the OpenAPI document states the same limits with [`schema`], so that an id the
//! document calls invalid is answered 400 before any lookup (not 404 "unknown").

use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};

/// Longest slide or report id (characters): the ingest's limit for ids from file names too.
pub use gigapath_pipeline::discover::MAX_ID_CHARS;

/// Slide ids become folder names: no `/`, `\` or NUL, not `.` or `..`
/// (`gigapath_pipeline::discover::check_slide_id`, which ingest applies to file names too).
pub const SLIDE_ID_PATTERN: &str = r"^(?!\.\.?$)[^/\\\x00]+$";
/// Report ids are catalog keys (from a reports file's `report_id` column): any text without NUL
/// (which neither SQLite's nor Postgres's text holds reliably).
pub const REPORT_ID_PATTERN: &str = r"^[^\x00]+$";

/// Which kind of id a field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    /// A slide id ([`SLIDE_ID_PATTERN`]).
    Slide,
    /// A report id ([`REPORT_ID_PATTERN`]).
    Report,
}

impl IdKind {
    fn pattern(self) -> &'static str {
        match self {
            IdKind::Slide => SLIDE_ID_PATTERN,
            IdKind::Report => REPORT_ID_PATTERN,
        }
    }
}

/// The report id rule, worded as `check_slide_id` words the slide one.
fn check_report_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        Err("is empty".into())
    } else if id.chars().count() > MAX_ID_CHARS {
        Err(format!("is longer than {MAX_ID_CHARS} characters"))
    } else if id.contains('\0') {
        Err("contains NUL".into())
    } else {
        Ok(())
    }
}

/// `id` (the value of request field `field`) follows the rule of its kind, else 400 naming the
/// field and the broken rule (the id itself is not repeated: it may be long).
pub fn check(kind: IdKind, field: &str, id: &str) -> ApiResult<()> {
    let rule = match kind {
        IdKind::Slide => gigapath_pipeline::discover::check_slide_id(id),
        IdKind::Report => check_report_id(id),
    };
    rule.map_err(|why| ApiError::BadRequest(format!("`{field}` {why}")))
}

/// Every id of a list field (`slide_ids`), each by the same rule.
pub fn check_all<'a>(
    kind: IdKind,
    field: &str,
    ids: impl IntoIterator<Item = &'a String>,
) -> ApiResult<()> {
    ids.into_iter()
        .enumerate()
        .try_for_each(|(i, id)| check(kind, &format!("{field}[{i}]"), id))
}

/// The JSON schema of an id of `kind`, as the OpenAPI document states it.
pub fn schema(kind: IdKind) -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS, "pattern": kind.pattern()})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_by_kind() {
        let ok = |k, id: &str| check(k, "id", id).is_ok();
        assert!(ok(IdKind::Slide, "SYN-0001"));
        assert!(ok(IdKind::Slide, "a.b c#2"));
        assert!(ok(IdKind::Report, "R/1"), "reports may hold `/`");
        for bad in ["", ".", "..", "a/b", "a\\b", "a\0b"] {
            assert!(!ok(IdKind::Slide, bad), "{bad:?}");
        }
        assert!(!ok(IdKind::Report, ""));
        assert!(!ok(IdKind::Report, "a\0b"));
        let long = "é".repeat(MAX_ID_CHARS);
        assert!(ok(IdKind::Slide, &long), "characters, not bytes");
        let e = check(IdKind::Report, "report_id", &"x".repeat(100_000)).unwrap_err();
        assert_eq!(e.to_string(), "`report_id` is longer than 512 characters");
        let e = check_all(IdKind::Slide, "slide_ids", &["a".into(), String::new()]).unwrap_err();
        assert_eq!(e.to_string(), "`slide_ids[1]` is empty");
    }
}
