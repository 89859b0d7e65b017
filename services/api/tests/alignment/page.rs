//! The OpenAPI document, the web page and its script, and the prompt sets.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use serde_json::json;

use crate::common::{get, text};
use crate::fixture::*;

#[test]
fn openapi_page_and_prompt_sets() {
    let s = shared();
    page_and_prompt_sets(s.addr, &s.fx);
}

fn page_and_prompt_sets(addr: SocketAddr, fx: &Fixture) {
    // The OpenAPI document carries this server's limits and every error status.
    let doc = ok(get(addr, "/v1/openapi.json"), "openapi");
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["SlideSearch"]["properties"]["k"]["maximum"],
        fx.cfg.serve.max_k
    );
    assert_eq!(
        schemas["SubtypeRequest"]["properties"]["slide_ids"]["maxItems"],
        fx.cfg.serve.max_slide_ids
    );
    for status in ["200", "400", "401", "404", "409", "413", "503"] {
        assert!(
            doc["paths"]["/v1/zero-shot/subtype"]["post"]["responses"]
                .get(status)
                .is_some(),
            "{status} not documented"
        );
    }
    // The web page.
    let page = get(addr, "/");
    assert_eq!(page.status, 200);
    assert!(
        page.content_type.starts_with("text/html"),
        "{}",
        page.content_type
    );
    let html = text(&page);
    assert!(html.to_lowercase().contains("<html"), "not a page");
    // Its script is a file of its own (the Content-Security-Policy allows no inline script).
    assert!(html.contains(r#"<script src="/app.js">"#), "{html}");
    let script = get(addr, "/app.js");
    assert_eq!(script.status, 200);
    let script = text(&script);
    for endpoint in [
        "/v1/search/",
        "/v1/zero-shot/subtype",
        "/v1/prompt-sets",
        "heatmap",
    ] {
        assert!(
            script.contains(endpoint),
            "the page does not call {endpoint}"
        );
    }

    // Prompt sets: what the prompts folder holds, with their sizes.
    let sets = ok(get(addr, "/v1/prompt-sets"), "prompt sets");
    let subtype = sets["subtype_sets"].as_array().unwrap();
    let names: BTreeSet<&str> = subtype
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    let expected: BTreeSet<&str> = fx.prompts.subtype_sets().map(|s| s.name.as_str()).collect();
    assert_eq!(names, expected);
    for name in ["rcc", "nsclc", "brca"] {
        assert!(names.contains(name), "{name} missing: {names:?}");
    }
    let rcc = subtype.iter().find(|s| s["name"] == "rcc").unwrap();
    let lib_rcc = fx.prompts.subtype("rcc").unwrap();
    assert_eq!(rcc["labels"], json!(SUBTYPES));
    assert_eq!(rcc["templates"], lib_rcc.templates.len());
    assert!(lib_rcc.templates.len() >= 16, "MI-Zero 16 + H&E variants");
    assert_eq!(
        rcc["names_per_class"],
        json!(lib_rcc
            .classes
            .iter()
            .map(|c| c.names.len())
            .collect::<Vec<_>>())
    );
    let mutation = sets["mutation_sets"].as_array().unwrap();
    let luad = mutation
        .iter()
        .find(|s| s["name"] == "luad-mutations")
        .unwrap();
    for gene in ["EGFR", "KRAS", "TP53", "FAT1", "LRP1B"] {
        assert!(
            luad["genes"].as_array().unwrap().contains(&json!(gene)),
            "{gene}: {luad}"
        );
    }
    assert!(luad["templates"].as_u64().unwrap() >= 16);
}
