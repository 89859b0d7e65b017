//! The id rules, in one place: every slide or report id in a request path or body is checked
//! here, and the OpenAPI document states the same limits with [`schema`], so that an id the
//! document calls invalid is answered 400 before any lookup (not 404 "unknown").

use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};

/// Longest slide or report id (characters).
pub const MAX_ID_CHARS: usize = 512;

/// Slide ids become folder names: no `/`, `\` or NUL, not `.` or `..`.
pub const SLIDE_ID_PATTERN: &str = r"^(?!\.\.?$)[^/\\\x00]+$";
/// Report ids are catalog keys (from a reports file's `report_id` column): any text without NUL
/// (which neither SQLite's nor Postgres's text holds reliably).
pub const REPORT_ID_PATTERN: &str = r"^[^\x00]+$";

/// Which kind of id a field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    Slide,
    Report,
}

impl IdKind {
    fn pattern(self) -> &'static str {
        match self {
            IdKind::Slide => SLIDE_ID_PATTERN,
            IdKind::Report => REPORT_ID_PATTERN,
        }
    }

    fn forbidden(self, id: &str) -> Option<&'static str> {
        match self {
            IdKind::Slide if id == "." || id == ".." => Some("`.` and `..` are not slide ids"),
            IdKind::Slide if id.contains(['/', '\\', '\0']) => {
                Some("a slide id has no `/`, `\\` or NUL")
            }
            IdKind::Report if id.contains('\0') => Some("a report id has no NUL"),
            _ => None,
        }
    }
}

/// `id` (the value of request field `field`) follows the rule of its kind, else 400 naming the
/// field and the broken rule (a long id is shown cut).
pub fn check(kind: IdKind, field: &str, id: &str) -> ApiResult<()> {
    let n = id.chars().count();
    let why = if n == 0 {
        Some(format!("`{field}` is empty"))
    } else if n > MAX_ID_CHARS {
        Some(format!(
            "`{field}` has {n} characters; the limit is {MAX_ID_CHARS}"
        ))
    } else {
        kind.forbidden(id).map(|rule| {
            format!(
                "`{field}` = \"{}\" is not a valid id: {rule}",
                id.escape_debug()
            )
        })
    };
    match why {
        Some(message) => Err(ApiError::BadRequest(message)),
        None => Ok(()),
    }
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
        assert_eq!(
            e.to_string(),
            "`report_id` has 100000 characters; the limit is 512"
        );
        let e = check_all(IdKind::Slide, "slide_ids", &["a".into(), String::new()]).unwrap_err();
        assert_eq!(e.to_string(), "`slide_ids[1]` is empty");
    }
}
