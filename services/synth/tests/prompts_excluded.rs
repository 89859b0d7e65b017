//! The zero-shot prompts of `prompts/subtype-rcc.toml` never appear in synthetic training
//! reports, and its labels are the generator's.

use gigapath_synth::{plan, CohortSpec, Subtype};

#[test]
fn rcc_prompt_class_names_never_appear_in_reports() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../prompts/subtype-rcc.toml"
    );
    let set: toml::Value = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let classes = set["classes"].as_array().unwrap();
    let mut names = Vec::new();
    for c in classes {
        let label = c["label"].as_str().unwrap();
        assert!(
            Subtype::from_label(label).is_some(),
            "label {label} unknown to the generator"
        );
        names.extend(
            c["names"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap().to_lowercase()),
        );
    }
    assert_eq!(names.len(), 12);
    // Many cohorts' worth of reports, every seed different.
    for seed in 0..10 {
        let spec = CohortSpec {
            seed,
            ..CohortSpec::default()
        };
        let (_, reports) = plan(&spec).unwrap();
        for r in reports {
            let text = r.report_text.to_lowercase();
            for n in &names {
                assert!(
                    !text.contains(n.as_str()),
                    "prompt phrasing {n:?} in report {}",
                    r.report_text
                );
            }
        }
    }
}
