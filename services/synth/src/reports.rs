//! Pathology reports for synthetic slides: a diagnosis among distractor sentences, with
//! synonyms, abbreviations, section headers, typos and the odd negated mention of another
//! subtype, so that an alignment model has to find the diagnosis rather than match a template.
//!
//! The diagnosis phrasings deliberately avoid every class name of `prompts/subtype-rcc.toml`
//! ("clear cell renal cell carcinoma", "papillary RCC", ...): zero-shot evaluation with those
//! prompts then measures generalisation to phrasings never seen in training. A test checks it.

use crate::rng::Rng;
use crate::subtypes::Subtype;

/// Diagnosis phrasings used in reports, per subtype.
pub fn diagnoses(subtype: Subtype) -> &'static [&'static str] {
    match subtype {
        Subtype::Ccrcc => &[
            "renal carcinoma composed of nests of cells with optically clear cytoplasm",
            "conventional (clear-cell) renal carcinoma",
            "ccRCC with a delicate branching capillary network",
            "carcinoma of the kidney, clear-cell morphology",
            "renal cell carcinoma with clear cytoplasm, conventional type",
        ],
        Subtype::Prcc => &[
            "renal carcinoma with papillary architecture",
            "papillary-pattern carcinoma of the kidney with fibrovascular cores",
            "pRCC with foamy macrophages within the papillary cores",
            "renal cell carcinoma forming papillae lined by cuboidal cells",
            "carcinoma of kidney, papillary morphology (type 1)",
        ],
        Subtype::Chrcc => &[
            "chromophobe-type renal carcinoma",
            "renal carcinoma of pale eosinophilic cells with perinuclear halos and raisinoid nuclei (chromophobe morphology)",
            "chRCC growing in solid sheets with prominent cell borders",
            "carcinoma of the kidney, chromophobe variant",
            "eosinophilic renal neoplasm consistent with chromophobe carcinoma",
        ],
    }
}

/// A sentence ruling out `other`, used rarely as a hard distractor.
fn negation(other: Subtype) -> &'static str {
    match other {
        Subtype::Ccrcc => "No clear-cytoplasm component is identified.",
        Subtype::Prcc => "No papillary component is seen.",
        Subtype::Chrcc => "Chromophobe features are absent.",
    }
}

const DISTRACTORS: &[&str] = &[
    "Surgical margins are negative for carcinoma.",
    "No lymphovascular invasion is identified.",
    "Tumor is confined to the kidney.",
    "Perinephric fat is uninvolved.",
    "The adrenal gland is not present in the specimen.",
    "Background kidney shows mild arteriosclerosis and focal chronic inflammation.",
    "Renal vein margin is free of tumor.",
    "Specimen received fresh and labeled with the patient's name.",
    "Sections show a well-circumscribed tumor.",
    "Immunohistochemistry results will be reported in an addendum.",
    "Block A3 was submitted for molecular testing.",
    "Hilar lymph nodes: no tumor identified.",
    "The ureter margin is unremarkable.",
    "Focal hemorrhage and necrosis are present.",
    "Gerota fascia is intact.",
];

const PROCEDURES: &[&str] = &[
    "radical nephrectomy",
    "partial nephrectomy",
    "core needle biopsy",
];

/// Writes one report for a slide of `subtype`.
pub fn write(subtype: Subtype, rng: &mut Rng) -> String {
    let mut parts: Vec<String> = Vec::new();
    if rng.chance(0.7) {
        parts.push(format!(
            "{}: {}-year-old {} with a {:.1} cm renal mass.",
            *rng.pick(&["Clinical history", "CLINICAL HISTORY", "Hx"]),
            40 + rng.below(45),
            *rng.pick(&["man", "woman", "patient"]),
            rng.range(1.5, 11.0)
        ));
    }
    parts.push(format!(
        "{}: {} kidney, {}.",
        *rng.pick(&["SPECIMEN", "Specimen", "Received"]),
        *rng.pick(&["left", "right", "Left", "Right"]),
        *rng.pick(PROCEDURES)
    ));
    let grade = format!("WHO/ISUP grade {}", 1 + rng.below(4));
    let diagnosis = format!(
        "{}: {}, {}.",
        *rng.pick(&["FINAL DIAGNOSIS", "Diagnosis", "DIAGNOSIS", "Dx"]),
        rng.pick(diagnoses(subtype)),
        grade
    );
    let mut body: Vec<String> = Vec::new();
    let mut pool: Vec<&str> = DISTRACTORS.to_vec();
    rng.shuffle(&mut pool);
    for d in pool.iter().take(2 + rng.below(4)) {
        body.push(typo(d, rng));
    }
    body.push(format!(
        "Tumor size: {:.1} cm in greatest dimension.",
        rng.range(1.0, 12.0)
    ));
    if rng.chance(0.5) {
        body.push(format!(
            "Pathologic stage: pT{} pN{}.",
            rng.pick(&["1a", "1b", "2a", "2b", "3a"]),
            rng.pick(&["0", "x"])
        ));
    }
    if rng.chance(0.1) {
        let others: Vec<Subtype> = Subtype::ALL.into_iter().filter(|s| *s != subtype).collect();
        body.push(negation(*rng.pick(&others)).to_string());
    }
    // The diagnosis sits anywhere among the other findings.
    let at = rng.below(body.len() + 1);
    body.insert(at, diagnosis);
    parts.extend(body);
    let sep = *rng.pick(&[" ", "\n", "\n\n"]);
    let text = parts.join(sep);
    if rng.chance(0.15) {
        text.to_uppercase()
    } else {
        text
    }
}

/// Swaps two adjacent letters of one longer word, sometimes (scanned and dictated reports).
fn typo(sentence: &str, rng: &mut Rng) -> String {
    if !rng.chance(0.25) {
        return sentence.to_string();
    }
    let mut words: Vec<String> = sentence.split(' ').map(str::to_string).collect();
    let long: Vec<usize> = (0..words.len()).filter(|&i| words[i].len() > 5).collect();
    if long.is_empty() {
        return sentence.to_string();
    }
    let w = &mut words[*rng.pick(&long)];
    let mut chars: Vec<char> = w.chars().collect();
    let i = 1 + rng.below(chars.len() - 3);
    chars.swap(i, i + 1);
    *w = chars.into_iter().collect();
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_report_carries_its_diagnosis_and_varies() {
        let mut rng = Rng::new(3);
        let mut texts = std::collections::HashSet::new();
        for s in Subtype::ALL {
            for _ in 0..50 {
                let t = write(s, &mut rng);
                let lower = t.to_lowercase();
                assert!(
                    diagnoses(s)
                        .iter()
                        .any(|d| lower.contains(&d.to_lowercase())),
                    "no diagnosis in {t}"
                );
                texts.insert(t);
            }
        }
        assert_eq!(texts.len(), 150, "reports repeat");
    }
}
