//! Prompt sets as data: loading and validating the TOML files of a prompts folder.
//!
//! A folder (see `prompts/README.md`) holds `templates.toml` (named template groups, every
//! template containing `CLASSNAME`), `subtype-*.toml` (`kind = "subtype"`: classes with a label
//! and a pool of names) and `mutation-*.toml` (`kind = "mutation"`: genes with mutated and
//! wild-type phrasings). A set names the template groups it uses. Every file is checked when the
//! folder is loaded; an error names the file and the key (`classes[2].names`, `templates[0]`).
//! Users add a set by dropping a file in.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, ZeroShotError};

/// The placeholder a template's class name or phrasing replaces.
pub const PLACEHOLDER: &str = "CLASSNAME";
/// File of the template groups.
pub const TEMPLATES_FILE: &str = "templates.toml";

/// A named group of templates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateGroup {
    /// What the group is for; empty when not given.
    #[serde(default)]
    pub description: String,
    /// The templates, each containing [`PLACEHOLDER`].
    pub templates: Vec<String>,
}

/// One class of a subtype set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassPrompts {
    /// The label slides carry (e.g. `CCRCC`), matched case-insensitively.
    pub label: String,
    /// The pool of class names (each one is put into every template).
    pub names: Vec<String>,
}

/// A zero-shot classification task: classes, their names and the templates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubtypeSet {
    /// The set's name (how users pick it).
    pub name: String,
    /// What the set is for; empty when not given.
    pub description: String,
    /// The file it came from (empty for inline sets).
    pub file: PathBuf,
    /// Template groups named by the file (empty for inline sets).
    pub template_groups: Vec<String>,
    /// The templates, resolved from the groups, in order, without duplicates.
    pub templates: Vec<String>,
    /// The classes, in file order.
    pub classes: Vec<ClassPrompts>,
}

/// Mutated and wild-type phrasings of one gene.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenePrompts {
    /// The gene's name (`EGFR`, ...).
    pub gene: String,
    /// Phrasings of the mutated state, each put into every template.
    pub mutated: Vec<String>,
    /// Phrasings of the wild-type state, each put into every template.
    pub wild_type: Vec<String>,
}

/// Mutation prompts: for each gene, the mutated phrasing versus the wild-type one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MutationSet {
    /// The set's name (how users pick it).
    pub name: String,
    /// What the set is for; empty when not given.
    pub description: String,
    /// The file it came from.
    pub file: PathBuf,
    /// Template groups named by the file.
    pub template_groups: Vec<String>,
    /// The templates, resolved from the groups, in order, without duplicates.
    pub templates: Vec<String>,
    /// The genes, in file order.
    pub genes: Vec<GenePrompts>,
}

/// `template` with its placeholder replaced by `name`.
pub fn fill(template: &str, name: &str) -> String {
    template.replace(PLACEHOLDER, name)
}

/// Every (name x template) prompt of one pool of names.
pub fn prompts(names: &[String], templates: &[String]) -> Vec<String> {
    names
        .iter()
        .flat_map(|n| templates.iter().map(move |t| fill(t, n)))
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubtypeFile {
    name: String,
    kind: String,
    #[serde(default)]
    description: String,
    templates: Vec<String>,
    classes: Vec<ClassPrompts>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MutationFile {
    name: String,
    kind: String,
    #[serde(default)]
    description: String,
    templates: Vec<String>,
    genes: Vec<GenePrompts>,
}

/// All prompt sets of a folder, validated.
#[derive(Debug, Clone, Serialize)]
pub struct PromptLibrary {
    /// The folder it was loaded from.
    pub dir: PathBuf,
    /// The groups of `templates.toml`, by name.
    pub template_groups: BTreeMap<String, TemplateGroup>,
    subtypes: BTreeMap<String, SubtypeSet>,
    mutations: BTreeMap<String, MutationSet>,
}

impl PromptLibrary {
    /// The prompts folder to use when none is given: `GIGAPATH_PROMPTS_DIR`, else `prompts/`
    /// under the working directory, else the one of this checkout.
    pub fn default_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("GIGAPATH_PROMPTS_DIR") {
            return PathBuf::from(dir);
        }
        let relative = PathBuf::from("prompts");
        if relative.join(TEMPLATES_FILE).is_file() {
            return relative;
        }
        let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../prompts");
        if checkout.join(TEMPLATES_FILE).is_file() {
            return checkout;
        }
        relative
    }

    /// Loads and validates `dir/templates.toml` and every `subtype-*.toml` / `mutation-*.toml`.
    pub fn load(dir: &Path) -> Result<Self> {
        let templates_path = dir.join(TEMPLATES_FILE);
        let template_groups = read_templates(&templates_path, &read_text(&templates_path)?)?;
        let entries = std::fs::read_dir(dir).map_err(|e| io(dir, e))?;
        let files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        Self::build(dir, template_groups, files, read_text)
    }

    /// [`PromptLibrary::load`] of a folder held in memory: `templates` is the text of its
    /// `templates.toml`, `files` the (file name, text) of its other `.toml` files. The same
    /// checks, in the same order; `dir` only names the files in errors.
    pub fn from_texts(dir: &Path, templates: &str, files: &[(String, String)]) -> Result<Self> {
        let template_groups = read_templates(&dir.join(TEMPLATES_FILE), templates)?;
        let texts: BTreeMap<PathBuf, &str> = files
            .iter()
            .filter(|(name, _)| name.ends_with(".toml") && !name.contains('/'))
            .map(|(name, text)| (dir.join(name), text.as_str()))
            .collect();
        let paths = texts.keys().cloned().collect();
        Self::build(dir, template_groups, paths, |p| {
            Ok(texts.get(p).copied().unwrap_or_default().to_string())
        })
    }

    fn build(
        dir: &Path,
        template_groups: BTreeMap<String, TemplateGroup>,
        mut files: Vec<PathBuf>,
        text: impl Fn(&Path) -> Result<String>,
    ) -> Result<Self> {
        let mut lib = PromptLibrary {
            dir: dir.to_path_buf(),
            template_groups,
            subtypes: BTreeMap::new(),
            mutations: BTreeMap::new(),
        };
        files.sort();
        let mut names: BTreeMap<String, PathBuf> = BTreeMap::new();
        for path in files {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let set_name = if stem.starts_with("subtype-") {
                let set = lib.read_subtype(&path, &text(&path)?)?;
                let name = set.name.clone();
                lib.subtypes.insert(name.clone(), set);
                name
            } else if stem.starts_with("mutation-") {
                let set = lib.read_mutation(&path, &text(&path)?)?;
                let name = set.name.clone();
                lib.mutations.insert(name.clone(), set);
                name
            } else {
                // templates.toml and anything a user keeps beside the sets.
                continue;
            };
            if let Some(other) = names.insert(set_name.clone(), path.clone()) {
                return Err(ZeroShotError::prompt(
                    &path,
                    "name",
                    format!("`{set_name}` is also the name of {}", other.display()),
                ));
            }
        }
        Ok(lib)
    }

    /// Subtype sets by name.
    pub fn subtype_sets(&self) -> impl Iterator<Item = &SubtypeSet> {
        self.subtypes.values()
    }

    /// Mutation sets by name.
    pub fn mutation_sets(&self) -> impl Iterator<Item = &MutationSet> {
        self.mutations.values()
    }

    /// A subtype set by its `name`, or by its file name (`subtype-rcc`, `subtype-rcc.toml`).
    pub fn subtype(&self, name: &str) -> Result<&SubtypeSet> {
        self.subtypes
            .get(name)
            .or_else(|| self.subtypes.values().find(|s| file_matches(&s.file, name)))
            .ok_or_else(|| ZeroShotError::UnknownSet {
                name: name.into(),
                known: self.subtypes.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }

    /// A mutation set by its `name` or file name.
    pub fn mutation(&self, name: &str) -> Result<&MutationSet> {
        self.mutations
            .get(name)
            .or_else(|| {
                self.mutations
                    .values()
                    .find(|s| file_matches(&s.file, name))
            })
            .ok_or_else(|| ZeroShotError::UnknownSet {
                name: name.into(),
                known: self
                    .mutations
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The templates of `groups`, in order, without duplicates; unknown groups are errors
    /// naming `file` and `templates[i]`.
    fn resolve(&self, file: &Path, groups: &[String]) -> Result<Vec<String>> {
        if groups.is_empty() {
            return Err(ZeroShotError::prompt(
                file,
                "templates",
                "names no template group",
            ));
        }
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for (i, g) in groups.iter().enumerate() {
            let Some(group) = self.template_groups.get(g) else {
                return Err(ZeroShotError::prompt(
                    file,
                    format!("templates[{i}]"),
                    format!(
                        "no template group `{g}` in {TEMPLATES_FILE} (known: {})",
                        self.template_groups
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            };
            for t in &group.templates {
                if seen.insert(t.clone()) {
                    out.push(t.clone());
                }
            }
        }
        Ok(out)
    }

    fn read_subtype(&self, path: &Path, text: &str) -> Result<SubtypeSet> {
        let f: SubtypeFile = parse_toml(path, text)?;
        check_kind(path, &f.kind, "subtype")?;
        check_name(path, &f.name)?;
        let templates = self.resolve(path, &f.templates)?;
        let set = SubtypeSet {
            name: f.name,
            description: f.description,
            file: path.to_path_buf(),
            template_groups: f.templates,
            templates,
            classes: f.classes,
        };
        validate_classes(path, &set.classes)?;
        Ok(set)
    }

    fn read_mutation(&self, path: &Path, text: &str) -> Result<MutationSet> {
        let f: MutationFile = parse_toml(path, text)?;
        check_kind(path, &f.kind, "mutation")?;
        check_name(path, &f.name)?;
        let templates = self.resolve(path, &f.templates)?;
        if f.genes.is_empty() {
            return Err(ZeroShotError::prompt(path, "genes", "no [[genes]]"));
        }
        let mut seen = BTreeSet::new();
        for (i, g) in f.genes.iter().enumerate() {
            if g.gene.trim().is_empty() {
                return Err(ZeroShotError::prompt(
                    path,
                    format!("genes[{i}].gene"),
                    "is empty",
                ));
            }
            check_no_outer_space(path, &format!("genes[{i}].gene"), &g.gene)?;
            if !seen.insert(g.gene.to_ascii_uppercase()) {
                return Err(ZeroShotError::prompt(
                    path,
                    format!("genes[{i}].gene"),
                    format!("`{}` appears twice", g.gene),
                ));
            }
            check_phrases(path, &format!("genes[{i}].mutated"), &g.mutated)?;
            check_phrases(path, &format!("genes[{i}].wild_type"), &g.wild_type)?;
        }
        Ok(MutationSet {
            name: f.name,
            description: f.description,
            file: path.to_path_buf(),
            template_groups: f.templates,
            templates,
            genes: f.genes,
        })
    }
}

impl SubtypeSet {
    /// A set given inline (e.g. in an API request): classes and literal templates, validated
    /// like a file.
    pub fn inline(name: &str, classes: Vec<ClassPrompts>, templates: Vec<String>) -> Result<Self> {
        let file = PathBuf::from("<inline>");
        if templates.is_empty() {
            return Err(ZeroShotError::prompt(&file, "templates", "no templates"));
        }
        for (i, t) in templates.iter().enumerate() {
            check_template(&file, &format!("templates[{i}]"), t)?;
        }
        validate_classes(&file, &classes)?;
        Ok(SubtypeSet {
            name: name.into(),
            description: String::new(),
            file: PathBuf::new(),
            template_groups: Vec::new(),
            templates,
            classes,
        })
    }

    /// The class labels, in order.
    pub fn labels(&self) -> Vec<String> {
        self.classes.iter().map(|c| c.label.clone()).collect()
    }

    /// The index of `label` (case-insensitive).
    pub fn class_index(&self, label: &str) -> Option<usize> {
        self.classes
            .iter()
            .position(|c| c.label.eq_ignore_ascii_case(label.trim()))
    }
}

impl MutationSet {
    /// The genes named (case-insensitive), in the order asked; all genes for `None`. Unknown
    /// genes are an error listing the set's genes.
    pub fn select(&self, genes: Option<&[String]>) -> Result<Vec<&GenePrompts>> {
        let Some(wanted) = genes else {
            return Ok(self.genes.iter().collect());
        };
        wanted
            .iter()
            .map(|w| {
                self.genes
                    .iter()
                    .find(|g| g.gene.eq_ignore_ascii_case(w.trim()))
                    .ok_or_else(|| {
                        ZeroShotError::Input(format!(
                            "gene `{w}` is not in prompt set `{}` (genes: {})",
                            self.name,
                            self.genes
                                .iter()
                                .map(|g| g.gene.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    })
            })
            .collect()
    }
}

fn file_matches(file: &Path, name: &str) -> bool {
    let name = name.strip_suffix(".toml").unwrap_or(name);
    file.file_stem().is_some_and(|s| s == name)
}

fn io(path: &Path, e: impl std::fmt::Display) -> ZeroShotError {
    ZeroShotError::Io {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| io(path, e))
}

fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| {
        // toml's message carries the line, column and the key it expected or did not know.
        ZeroShotError::prompt(path, "(parse)", e.to_string().trim().replace('\n', " "))
    })
}

fn read_templates(path: &Path, text: &str) -> Result<BTreeMap<String, TemplateGroup>> {
    let groups: BTreeMap<String, TemplateGroup> = parse_toml(path, text)?;
    if groups.is_empty() {
        return Err(ZeroShotError::prompt(path, "(file)", "no template groups"));
    }
    for (name, g) in &groups {
        if g.templates.is_empty() {
            return Err(ZeroShotError::prompt(
                path,
                format!("{name}.templates"),
                "is empty",
            ));
        }
        for (i, t) in g.templates.iter().enumerate() {
            check_template(path, &format!("{name}.templates[{i}]"), t)?;
        }
    }
    Ok(groups)
}

fn check_template(path: &Path, key: &str, t: &str) -> Result<()> {
    if !t.contains(PLACEHOLDER) {
        return Err(ZeroShotError::prompt(
            path,
            key,
            format!("template {t:?} has no {PLACEHOLDER}"),
        ));
    }
    Ok(())
}

fn check_kind(path: &Path, kind: &str, expected: &str) -> Result<()> {
    if kind != expected {
        return Err(ZeroShotError::prompt(
            path,
            "kind",
            format!("`{kind}` in a {expected}-*.toml file (expected `{expected}`)"),
        ));
    }
    Ok(())
}

fn check_name(path: &Path, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(ZeroShotError::prompt(
            path,
            "name",
            format!("{name:?}: use letters, digits, `-`, `_` or `.`"),
        ));
    }
    Ok(())
}

fn check_phrases(path: &Path, key: &str, phrases: &[String]) -> Result<()> {
    if phrases.is_empty() {
        return Err(ZeroShotError::prompt(path, key, "is empty"));
    }
    if let Some(i) = phrases.iter().position(|p| p.trim().is_empty()) {
        return Err(ZeroShotError::prompt(
            path,
            format!("{key}[{i}]"),
            "is empty",
        ));
    }
    Ok(())
}

/// Labels and genes are looked up trimmed (`class_index`, `select`, the labels of reports): one
/// with spaces at its ends would never be found (found with the `text_inputs` fuzz target).
fn check_no_outer_space(path: &Path, key: &str, name: &str) -> Result<()> {
    if name.trim() != name {
        return Err(ZeroShotError::prompt(
            path,
            key,
            format!("{name:?} has spaces at its start or end"),
        ));
    }
    Ok(())
}

fn validate_classes(path: &Path, classes: &[ClassPrompts]) -> Result<()> {
    if classes.len() < 2 {
        return Err(ZeroShotError::prompt(
            path,
            "classes",
            format!(
                "{} class(es): zero-shot classification needs at least 2",
                classes.len()
            ),
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, c) in classes.iter().enumerate() {
        if c.label.trim().is_empty() {
            return Err(ZeroShotError::prompt(
                path,
                format!("classes[{i}].label"),
                "is empty",
            ));
        }
        check_no_outer_space(path, &format!("classes[{i}].label"), &c.label)?;
        if !seen.insert(c.label.to_ascii_uppercase()) {
            return Err(ZeroShotError::prompt(
                path,
                format!("classes[{i}].label"),
                format!("`{}` appears twice", c.label),
            ));
        }
        check_phrases(path, &format!("classes[{i}].names"), &c.names)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found with the `text_inputs` fuzz target (docs/FUZZING.md): a label (or gene) with
    /// spaces at its ends loaded, and then `class_index` (which trims what it looks up, as the
    /// evaluation's report labels are) could not find the set's own label.
    #[test]
    fn fuzz_labels_and_genes_with_outer_spaces_are_refused() {
        let templates = "[t]\ntemplates = [\"an image of CLASSNAME\"]\n";
        let subtype = |label: &str| {
            format!(
                "name = \"s\"\nkind = \"subtype\"\ntemplates = [\"t\"]\n[[classes]]\nlabel = \"{label}\"\nnames = [\"a\"]\n[[classes]]\nlabel = \"ILC\"\nnames = [\"b\"]\n"
            )
        };
        let dir = Path::new("prompts");
        for label in [" IDC", "IDC ", "\\tIDC"] {
            let files = [("subtype-s.toml".to_string(), subtype(label))];
            let err = PromptLibrary::from_texts(dir, templates, &files).unwrap_err();
            assert!(
                err.to_string().contains("classes[0].label"),
                "{label:?}: {err}"
            );
        }
        let files = [("subtype-s.toml".to_string(), subtype("IDC"))];
        let lib = PromptLibrary::from_texts(dir, templates, &files).unwrap();
        let set = lib.subtype("s").unwrap();
        for label in set.labels() {
            assert!(set.class_index(&label).is_some(), "{label}");
        }
        let mutation = "name = \"m\"\nkind = \"mutation\"\ntemplates = [\"t\"]\n[[genes]]\ngene = \" EGFR\"\nmutated = [\"x\"]\nwild_type = [\"y\"]\n";
        let files = [("mutation-m.toml".to_string(), mutation.to_string())];
        let err = PromptLibrary::from_texts(dir, templates, &files).unwrap_err();
        assert!(err.to_string().contains("genes[0].gene"), "{err}");
    }

    fn repo_prompts() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../prompts")
    }

    #[test]
    fn the_shipped_prompt_sets_load() {
        let lib = PromptLibrary::load(&repo_prompts()).unwrap();
        assert_eq!(lib.template_groups["mi-zero"].templates.len(), 16);
        let rcc = lib.subtype("rcc").unwrap();
        assert_eq!(rcc.labels(), ["CCRCC", "PRCC", "CHRCC"]);
        assert_eq!(rcc.templates.len(), 24, "mi-zero + he");
        assert_eq!(lib.subtype("subtype-rcc.toml").unwrap().name, "rcc");
        assert_eq!(rcc.class_index("prcc"), Some(1));
        let luad = lib.mutation_sets().next().unwrap();
        let genes = luad.select(Some(&["egfr".into(), "TP53".into()])).unwrap();
        assert_eq!(genes[1].gene, "TP53");
        assert!(luad
            .select(Some(&["BRAF".into()]))
            .unwrap_err()
            .to_string()
            .contains("EGFR"));
        let err = lib.subtype("lung").unwrap_err().to_string();
        assert!(
            err.contains("unknown prompt set `lung`") && err.contains("rcc"),
            "{err}"
        );
    }

    /// A copy of the shipped folder with one file replaced or added.
    fn with_file(name: &str, text: &str) -> (tempfile::TempDir, Result<PromptLibrary>) {
        let d = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(repo_prompts()).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, d.path().join(p.file_name().unwrap())).unwrap();
        }
        std::fs::write(d.path().join(name), text).unwrap();
        let lib = PromptLibrary::load(d.path());
        (d, lib)
    }

    #[test]
    fn a_dropped_in_file_is_a_new_set() {
        let (_d, lib) = with_file(
            "subtype-glioma.toml",
            "name = \"glioma\"\nkind = \"subtype\"\ntemplates = [\"he\"]\n\
             [[classes]]\nlabel = \"GBM\"\nnames = [\"glioblastoma\"]\n\
             [[classes]]\nlabel = \"LGG\"\nnames = [\"low-grade glioma\"]\n",
        );
        let lib = lib.unwrap();
        assert_eq!(lib.subtype("glioma").unwrap().templates.len(), 8);
    }

    #[test]
    fn bad_files_name_the_file_and_key() {
        let cases = [
            (
                "subtype-x.toml",
                "name = \"x\"\nkind = \"subtype\"\ntemplates = [\"nope\"]\n[[classes]]\nlabel = \"A\"\nnames = [\"a\"]\n[[classes]]\nlabel = \"B\"\nnames = [\"b\"]\n",
                "templates[0]",
            ),
            (
                "subtype-x.toml",
                "name = \"x\"\nkind = \"subtype\"\ntemplates = [\"he\"]\n[[classes]]\nlabel = \"A\"\nnames = [\"a\"]\n[[classes]]\nlabel = \"a\"\nnames = [\"b\"]\n",
                "classes[1].label",
            ),
            (
                "subtype-x.toml",
                "name = \"x\"\nkind = \"subtype\"\ntemplates = [\"he\"]\n[[classes]]\nlabel = \"A\"\nnames = [\"a\"]\n[[classes]]\nlabel = \"B\"\nnames = []\n",
                "classes[1].names",
            ),
            (
                "subtype-x.toml",
                "name = \"x\"\nkind = \"mutation\"\ntemplates = [\"he\"]\nclasses = []\n",
                "kind",
            ),
            (
                "subtype-x.toml",
                "name = \"rcc\"\nkind = \"subtype\"\ntemplates = [\"he\"]\n[[classes]]\nlabel = \"A\"\nnames = [\"a\"]\n[[classes]]\nlabel = \"B\"\nnames = [\"b\"]\n",
                "also the name of",
            ),
            (
                "subtype-x.toml",
                "name = \"x\"\nkind = \"subtype\"\ntemplates = [\"he\"]\ncolour = 1\n",
                "unknown field `colour`",
            ),
            (
                "mutation-x.toml",
                "name = \"x\"\nkind = \"mutation\"\ntemplates = [\"he\"]\n[[genes]]\ngene = \"KRAS\"\nmutated = [\"m\"]\nwild_type = [\"\"]\n",
                "genes[0].wild_type[0]",
            ),
            (
                "templates.toml",
                "[a]\ntemplates = [\"an image of\"]\n",
                "a.templates[0]",
            ),
        ];
        for (file, text, key) in cases {
            let (_d, lib) = with_file(file, text);
            let err = lib.unwrap_err().to_string();
            assert!(err.contains(file), "{err}");
            assert!(err.contains(key), "expected `{key}` in: {err}");
        }
        let err = PromptLibrary::load(Path::new("/nonexistent/prompts")).unwrap_err();
        assert!(err.to_string().contains("templates.toml"), "{err}");
    }

    #[test]
    fn inline_sets_are_validated_too() {
        let classes = vec![
            ClassPrompts {
                label: "A".into(),
                names: vec!["alpha".into()],
            },
            ClassPrompts {
                label: "B".into(),
                names: vec!["beta".into(), "bravo".into()],
            },
        ];
        let set = SubtypeSet::inline("mine", classes.clone(), vec!["a CLASSNAME.".into()]).unwrap();
        assert_eq!(
            prompts(&set.classes[1].names, &set.templates),
            ["a beta.", "a bravo."]
        );
        let err = SubtypeSet::inline("mine", classes, vec!["no placeholder".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("templates[0]"), "{err}");
    }
}
