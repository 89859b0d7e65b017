//! The OpenAPI document as served at `/v1/openapi.json`: utoipa's document of the handlers and
//! types ([`crate::ApiDoc`]), completed with what the Rust types cannot say, so that a request the
//! document calls valid is one this server accepts, and every status it answers is listed:
//!
//! - the error statuses of every operation (400 for bodies and path parameters, 401 where a key
//!   may be required, 403 on admin operations, 408 and 413 for bodies, 503 with `Retry-After`
//!   when overloaded (every operation but the probes) or where the store or the models are
//!   called under the request timeout), all with the `ErrorBody` schema;
//! - the limits of this server's `[serve]` configuration (`k`, text lengths, list sizes) and the
//!   rules the handlers check (non-blank texts, one of two alternative fields, slide and report
//!   ids by [`crate::routes::ids`], label names, inline prompt sizes).
//!
//! Also the method table behind 405 answers ([`allowed_methods`]).

use std::collections::BTreeSet;
use std::sync::OnceLock;

use gigapath_pipeline::config::ServeConfig;
use serde_json::{json, Map, Value};
use utoipa::OpenApi;

/// Most classes of an inline prompt set. The inline zero-shot limits together: at most 10
/// classes x 8 names x 24 templates = 1920 prompts (the handler also refuses more than 2000).
/// 24 templates fit the MI-Zero 16 + H&E 8.
pub const MAX_INLINE_CLASSES: usize = 10;
/// Most names of one inline class (see [`MAX_INLINE_CLASSES`]).
pub const MAX_INLINE_NAMES: usize = 8;
/// Most templates of an inline prompt set (see [`MAX_INLINE_CLASSES`]).
pub const MAX_INLINE_TEMPLATES: usize = 24;
/// Most genes in one mutation request.
pub const MAX_GENES: usize = 64;
/// Longest slide or report id (characters).
pub use crate::routes::ids::MAX_ID_CHARS;
use crate::routes::ids::{schema as id_schema, IdKind};
/// Longest path in an ingest request (bytes on Linux; characters here).
pub const MAX_PATH_CHARS: usize = 4096;

/// Label names in filters (see `routes::Filter`).
const LABEL_PATTERN: &str = "^[A-Za-z0-9_-]+$";
/// At least one character that is not Unicode White_Space (what `str::trim` removes; `\S` would
/// not do: regex engines disagree on U+0085 and friends).
const NON_BLANK: &str =
    r"[^\t\n\x0B\f\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]";

/// The document served by this server, with its configured limits.
pub fn document(cfg: &ServeConfig) -> Value {
    let mut doc =
        serde_json::to_value(crate::ApiDoc::openapi()).expect("the OpenAPI document serialises");
    error_responses(&mut doc);
    path_parameters(&mut doc);
    request_constraints(&mut doc, cfg);
    doc
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    })
}

/// Adds the error statuses an operation can answer, where its own annotation does not list them.
fn error_responses(doc: &mut Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for op in item.values_mut() {
            let has_body = op.get("requestBody").is_some();
            let has_params = op
                .get("parameters")
                .and_then(Value::as_array)
                .is_some_and(|p| !p.is_empty());
            let admin = op.get("security").is_some();
            let api = path.starts_with("/v1/") && path != "/v1/openapi.json";
            let calls_store =
                (api && path != "/v1/prompt-sets") || path == "/metrics" || path == "/readyz";
            let capped = !crate::limits::EXEMPT.contains(&path.as_str());
            let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
                continue;
            };
            let mut add = |status: &str, description: &str| {
                responses
                    .entry(status)
                    .or_insert_with(|| error_response(description));
            };
            if has_body || has_params {
                add("400", "Invalid input: malformed JSON, wrong types, unknown fields, values out of range, blank texts");
            }
            if api {
                add("401", "API key missing or wrong (admin operations; reads too with serve.require_key_for_reads)");
            }
            if admin {
                add("403", "No API keys are configured, or the request reaches outside what the server allows");
            }
            if has_body {
                add(
                    "408",
                    "The request body did not arrive within serve.read_timeout_seconds",
                );
                add("413", "Request body over serve.max_body_bytes");
            }
            if capped {
                let why = if calls_store {
                    "Overloaded (serve.max_in_flight requests in flight; retry after Retry-After \
                     seconds), or the store or the models did not answer within the request timeout"
                } else {
                    "Overloaded (serve.max_in_flight requests in flight; retry after Retry-After seconds)"
                };
                let r = responses
                    .entry("503")
                    .or_insert_with(|| error_response(why));
                merge(
                    r,
                    json!({"headers": {"Retry-After": {
                        "description": "Seconds to wait before retrying, when overloaded",
                        "schema": {"type": "integer", "minimum": 1}}}}),
                );
            } else if calls_store {
                responses.entry("503").or_insert_with(|| {
                    error_response(
                        "The store or the models did not answer within the request timeout",
                    )
                });
            }
        }
    }
}

/// Slide ids and picture names in the paths of `/v1/slides/{id}...`.
fn path_parameters(doc: &mut Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        if !path.starts_with("/v1/slides/{id}") {
            continue;
        }
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for op in item.values_mut() {
            let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) else {
                continue;
            };
            for p in params {
                let schema = match p["name"].as_str() {
                    Some("id") => {
                        merge_with(&id_schema(IdKind::Slide), json!({"example": "SYN-0001"}))
                    }
                    Some("picture") => {
                        json!({"type": "string", "enum": crate::routes::slides::PICTURES})
                    }
                    _ => continue,
                };
                p["schema"] = schema;
            }
        }
    }
}

/// The schema at a JSON pointer; a missing one is a bug of this table (the types changed).
fn at<'a>(doc: &'a mut Value, pointer: &str) -> Option<&'a mut Value> {
    let found = doc.pointer_mut(pointer);
    debug_assert!(found.is_some(), "no {pointer} in the OpenAPI document");
    found
}

/// Merges `extra` into the schema of property `prop` of component `component`.
fn constrain(doc: &mut Value, component: &str, prop: &str, extra: Value) {
    if let Some(target) = at(
        doc,
        &format!("/components/schemas/{component}/properties/{prop}"),
    ) {
        merge(target, extra);
    }
}

fn merge(target: &mut Value, extra: Value) {
    if let (Some(t), Value::Object(e)) = (target.as_object_mut(), extra) {
        for (k, v) in e {
            t.insert(k, v);
        }
    }
}

/// Exactly one of two optional fields must be given (not null): `(name, JSON type)` each. Each
/// branch also requires the other field absent or null, so that extra conditions added to one
/// branch cannot make a request with both fields valid.
fn exactly_one(doc: &mut Value, component: &str, a: (&str, &str), b: (&str, &str)) {
    let branch = |(f, t): (&str, &str), other: &str| json!({"required": [f], "properties": {f: {"type": t}, other: {"type": "null"}}});
    if let Some(schema) = at(doc, &format!("/components/schemas/{component}")) {
        merge(schema, json!({"oneOf": [branch(a, b.0), branch(b, a.0)]}));
    }
}

fn request_constraints(doc: &mut Value, cfg: &ServeConfig) {
    let text = json!({"minLength": 1, "maxLength": cfg.max_text_chars, "pattern": NON_BLANK});
    let slide_id = id_schema(IdKind::Slide);
    let k = json!({"minimum": 1, "maximum": cfg.max_k});
    let slide_ids = json!({"minItems": 1, "maxItems": cfg.max_slide_ids, "items": slide_id, "example": ["SYN-0001", "SYN-0002"]});

    constrain(
        doc,
        "SlideSearch",
        "query",
        merge_with(&text, json!({"example": "clear cell renal cell carcinoma"})),
    );
    constrain(doc, "SlideSearch", "report_id", id_schema(IdKind::Report));
    constrain(doc, "SlideSearch", "k", k.clone());
    exactly_one(
        doc,
        "SlideSearch",
        ("query", "string"),
        ("report_id", "string"),
    );

    constrain(
        doc,
        "ReportSearch",
        "query",
        merge_with(&text, json!({"example": "papillary renal cell carcinoma"})),
    );
    constrain(doc, "ReportSearch", "slide_id", slide_id.clone());
    constrain(doc, "ReportSearch", "k", k);
    exactly_one(
        doc,
        "ReportSearch",
        ("query", "string"),
        ("slide_id", "string"),
    );

    constrain(
        doc,
        "Filter",
        "labels",
        json!({"propertyNames": {"type": "string", "pattern": LABEL_PATTERN}}),
    );
    // A slide id filter: one slide id or a list of them, by the id rule.
    if let Some(p) = at(doc, "/components/schemas/Filter/properties/slide_id") {
        let description = p.get("description").cloned();
        *p = json!({"oneOf": [
            {"type": "null"},
            slide_id,
            {"type": "array", "minItems": 1, "items": slide_id},
        ]});
        if let Some(d) = description {
            p["description"] = d;
        }
    }
    if let Some(one) = at(doc, "/components/schemas/OneOrMany/oneOf/0") {
        merge(one, json!({"minLength": 1}));
    }
    if let Some(many) = at(doc, "/components/schemas/OneOrMany/oneOf/1") {
        merge(
            many,
            json!({"minItems": 1, "items": {"type": "string", "minLength": 1}}),
        );
    }

    constrain(doc, "SubtypeRequest", "slide_ids", slide_ids.clone());
    constrain(
        doc,
        "SubtypeRequest",
        "prompt_set",
        json!({"minLength": 1, "example": "rcc"}),
    );
    constrain(
        doc,
        "SubtypeRequest",
        "classes",
        json!({"minProperties": 2, "maxProperties": MAX_INLINE_CLASSES,
               "propertyNames": merge_with(&text, json!({"type": "string"})),
               "additionalProperties": {"type": "array", "minItems": 1, "maxItems": MAX_INLINE_NAMES,
                                        "items": merge_with(&text, json!({"type": "string"}))}}),
    );
    constrain(
        doc,
        "SubtypeRequest",
        "templates",
        json!({"minItems": 1, "maxItems": MAX_INLINE_TEMPLATES,
               "items": {"type": "string", "maxLength": cfg.max_text_chars, "pattern": "CLASSNAME"}}),
    );
    exactly_one(
        doc,
        "SubtypeRequest",
        ("prompt_set", "string"),
        ("classes", "object"),
    );
    // A prompt set brings its own templates.
    if let Some(props) = at(doc, "/components/schemas/SubtypeRequest/oneOf/0/properties") {
        merge(props, json!({"templates": {"type": "null"}}));
    }

    constrain(doc, "ClassifyRequest", "slide_ids", slide_ids.clone());
    constrain(doc, "AttentionRequest", "slide_id", slide_id.clone());
    constrain(
        doc,
        "AttentionRequest",
        "head",
        json!({"minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]*$", "example": "rcc-abmil"}),
    );
    constrain(
        doc,
        "ClassifyRequest",
        "head",
        json!({"minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]*$", "example": "rcc-linear"}),
    );
    constrain(doc, "MutationRequest", "slide_ids", slide_ids.clone());
    constrain(
        doc,
        "MutationRequest",
        "genes",
        json!({"minItems": 1, "maxItems": MAX_GENES, "items": {"type": "string", "minLength": 1, "maxLength": 64}, "example": ["EGFR", "KRAS"]}),
    );
    constrain(
        doc,
        "MutationRequest",
        "prompt_set",
        json!({"minLength": 1, "example": "luad-mutations"}),
    );

    constrain(
        doc,
        "HeatmapRequest",
        "query",
        merge_with(&text, json!({"example": "papillary architecture"})),
    );

    constrain(
        doc,
        "IngestRequest",
        "slides",
        json!({"minItems": 1, "maxItems": cfg.max_slide_ids,
               "items": {"type": "string", "minLength": 1, "maxLength": MAX_PATH_CHARS, "pattern": r"^[^\x00]+$"}}),
    );
    constrain(
        doc,
        "IngestRequest",
        "mpp",
        json!({"exclusiveMinimum": 0, "maximum": 100}),
    );
}

fn merge_with(base: &Value, extra: Value) -> Value {
    let mut v = base.clone();
    merge(&mut v, extra);
    v
}

/// Path templates of the document (and the page at `/`) with their methods, upper case.
fn routes() -> &'static Vec<(Vec<String>, BTreeSet<String>)> {
    static ROUTES: OnceLock<Vec<(Vec<String>, BTreeSet<String>)>> = OnceLock::new();
    ROUTES.get_or_init(|| {
        let doc = serde_json::to_value(crate::ApiDoc::openapi()).unwrap_or_default();
        let mut routes: Vec<(Vec<String>, BTreeSet<String>)> = doc["paths"]
            .as_object()
            .map(Map::iter)
            .into_iter()
            .flatten()
            .map(|(path, item)| {
                let methods = item
                    .as_object()
                    .map(|m| m.keys().map(|k| k.to_ascii_uppercase()).collect())
                    .unwrap_or_default();
                (segments(path), methods)
            })
            .collect();
        for page in ["/", "/app.js", "/app.css"] {
            routes.push((segments(page), BTreeSet::from(["GET".to_string()])));
        }
        routes
    })
}

fn segments(path: &str) -> Vec<String> {
    path.trim_start_matches('/')
        .split('/')
        .map(String::from)
        .collect()
}

/// The methods served at `path` (for a 405 and its `Allow` header); empty for an unknown path.
/// Where several templates match, the most literal ones win (`/v1/slides/{id}/heatmap` over
/// `/v1/slides/{id}/{picture}`), as in the router.
pub fn allowed_methods(path: &str) -> BTreeSet<String> {
    let parts = segments(path);
    let mut best: Option<(usize, BTreeSet<String>)> = None;
    for (template, methods) in routes() {
        if template.len() != parts.len() {
            continue;
        }
        let mut literal = 0;
        let matches = template.iter().zip(&parts).all(|(t, p)| {
            if t.starts_with('{') && t.ends_with('}') {
                !p.is_empty()
            } else {
                literal += 1;
                t == p
            }
        });
        if !matches {
            continue;
        }
        match &mut best {
            Some((n, m)) if *n == literal => m.extend(methods.iter().cloned()),
            Some((n, _)) if *n > literal => {}
            _ => best = Some((literal, methods.clone())),
        }
    }
    best.map(|(_, m)| m).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_of_known_paths() {
        let m = |p: &str| {
            allowed_methods(p)
                .into_iter()
                .collect::<Vec<_>>()
                .join(", ")
        };
        assert_eq!(m("/v1/search/slides"), "POST");
        assert_eq!(m("/v1/slides/S1"), "DELETE, GET");
        assert_eq!(m("/v1/slides/S1/heatmap"), "POST");
        assert_eq!(m("/v1/slides/S1/overlay.png"), "GET");
        assert_eq!(m("/"), "GET");
        assert_eq!(m("/v1/nothing/here"), "");
    }

    #[test]
    fn the_document_lists_limits_and_errors() {
        let cfg = ServeConfig {
            max_k: 7,
            ..ServeConfig::default()
        };
        let doc = document(&cfg);
        let s = &doc["components"]["schemas"];
        assert_eq!(s["SlideSearch"]["properties"]["k"]["maximum"], 7);
        assert_eq!(s["SlideSearch"]["oneOf"].as_array().unwrap().len(), 2);
        assert_eq!(
            s["SubtypeRequest"]["properties"]["classes"]["additionalProperties"]["maxItems"],
            MAX_INLINE_NAMES
        );
        let search = &doc["paths"]["/v1/search/slides"]["post"]["responses"];
        for status in ["200", "400", "401", "404", "409", "413", "503"] {
            assert!(search.get(status).is_some(), "{status} missing");
        }
        assert!(doc["paths"]["/healthz"]["get"].get("parameters").is_none());
        let id = &doc["paths"]["/v1/slides/{id}"]["get"]["parameters"][0]["schema"];
        assert_eq!(id["pattern"], crate::routes::ids::SLIDE_ID_PATTERN);
        assert_eq!(id["maxLength"], MAX_ID_CHARS);
        assert_eq!(
            s["SlideSearch"]["properties"]["report_id"]["pattern"],
            crate::routes::ids::REPORT_ID_PATTERN
        );
        let overloaded = &search["503"];
        assert!(
            overloaded["headers"]["Retry-After"].is_object(),
            "{overloaded}"
        );
        assert!(doc["paths"]["/healthz"]["get"]["responses"]
            .get("503")
            .is_none());
    }
}
