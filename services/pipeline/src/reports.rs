//! Reading a reports file: CSV or JSONL rows of `slide_id` and `report_text` (or `text`), with an
//! optional `report_id` and `patient_id`; every other column is a label (`subtype`, `site`,
//! `cohort`, ...). Bad rows are reported one by one and the valid rows go on.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::error::{PipelineError, Result};

/// Longest report accepted (the text encoder truncates at 512 tokens anyway).
pub const MAX_REPORT_BYTES: usize = 1 << 20;

/// A valid row.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportRow {
    /// 1-based line (JSONL) or record (CSV) number, for messages.
    pub line: usize,
    /// The report id (unique).
    pub report_id: String,
    /// The slide it describes.
    pub slide_id: String,
    /// The report text, at most [`MAX_REPORT_BYTES`].
    pub text: String,
    /// Everything else the row says, e.g. `subtype`, `site`, `cohort`, `patient_id`.
    pub labels: BTreeMap<String, String>,
}

/// A row that was not ingested, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RowError {
    /// 1-based line (JSONL) or record (CSV) number.
    pub line: usize,
    /// Why it was rejected.
    pub message: String,
}

/// Parses `path` (format from the extension: `.csv`, else JSONL).
pub fn read_reports(path: &Path) -> Result<(Vec<ReportRow>, Vec<RowError>)> {
    let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))?;
    let csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    parse_reports(&text, csv, path)
}

/// Parses the text of a reports file ([`read_reports`] without the file read): CSV when `csv`,
/// else JSONL; `path` only names the file in errors.
pub fn parse_reports(
    text: &str,
    csv: bool,
    path: &Path,
) -> Result<(Vec<ReportRow>, Vec<RowError>)> {
    let records = if csv {
        csv_records(text).map_err(|e| PipelineError::Input(format!("{}: {e}", path.display())))?
    } else {
        jsonl_records(text)
    };
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    let mut per_slide: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen_ids = std::collections::HashSet::new();
    for (line, record) in records {
        match record.and_then(|fields| to_row(line, fields, &mut per_slide)) {
            Ok(row) if !seen_ids.insert(row.report_id.clone()) => errors.push(RowError {
                line,
                message: format!("duplicate report_id `{}`", row.report_id),
            }),
            Ok(row) => rows.push(row),
            Err(message) => errors.push(RowError { line, message }),
        }
    }
    if rows.is_empty() && errors.is_empty() {
        return Err(PipelineError::Input(format!(
            "{}: no reports in the file",
            path.display()
        )));
    }
    Ok((rows, errors))
}

type Record = std::result::Result<BTreeMap<String, String>, String>;

fn jsonl_records(text: &str) -> Vec<(usize, Record)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let record = match serde_json::from_str::<serde_json::Value>(l) {
                Ok(serde_json::Value::Object(map)) => Ok(map
                    .into_iter()
                    .filter_map(|(k, v)| match v {
                        serde_json::Value::String(s) => Some((k, s)),
                        serde_json::Value::Null => None,
                        other => Some((k, other.to_string())),
                    })
                    .collect()),
                Ok(_) => Err("not a JSON object".to_string()),
                Err(e) => Err(format!("malformed JSON: {e}")),
            };
            (i + 1, record)
        })
        .collect()
}

fn csv_records(text: &str) -> std::result::Result<Vec<(usize, Record)>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(text.as_bytes());
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| format!("unreadable CSV header: {e}"))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    Ok(reader
        .records()
        .enumerate()
        .map(|(i, r)| {
            let record = match r {
                Ok(r) if r.len() != headers.len() => Err(format!(
                    "{} fields, the header has {}",
                    r.len(),
                    headers.len()
                )),
                Ok(r) => Ok(headers
                    .iter()
                    .cloned()
                    .zip(r.iter().map(str::to_string))
                    .filter(|(_, v)| !v.is_empty())
                    .collect()),
                Err(e) => Err(format!("malformed CSV: {e}")),
            };
            // Record i is on line i + 2 unless a quoted field spans lines; the record number is what we know.
            (i + 2, record)
        })
        .collect())
}

fn to_row(
    line: usize,
    mut f: BTreeMap<String, String>,
    per_slide: &mut BTreeMap<String, usize>,
) -> std::result::Result<ReportRow, String> {
    let slide_id = f
        .remove("slide_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    if slide_id.is_empty() {
        return Err("missing slide_id".into());
    }
    let text = f
        .remove("report_text")
        .or_else(|| f.remove("text"))
        .unwrap_or_default();
    if text.trim().is_empty() {
        return Err(format!(
            "empty report text for slide `{slide_id}` (column report_text or text)"
        ));
    }
    if text.len() > MAX_REPORT_BYTES {
        return Err(format!(
            "report of {} bytes is over the {MAX_REPORT_BYTES}-byte limit",
            text.len()
        ));
    }
    let n = per_slide.entry(slide_id.clone()).or_default();
    *n += 1;
    let report_id = match f.remove("report_id").map(|s| s.trim().to_string()) {
        Some(id) if !id.is_empty() => id,
        // One report per slide is the common case: its id is the slide's; later ones get #2, #3.
        _ if *n == 1 => slide_id.clone(),
        _ => format!("{slide_id}#{n}"),
    };
    Ok(ReportRow {
        line,
        report_id,
        slide_id,
        text,
        labels: f
            .into_iter()
            .map(|(k, v)| (k, v.trim().to_string()))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_rows_with_labels_and_per_row_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.jsonl");
        std::fs::write(
            &p,
            concat!(
                "{\"slide_id\": \"s1\", \"report_text\": \"Adenocarcinoma.\", \"subtype\": \"LUAD\", \"site\": \"lung\"}\n",
                "{\"slide_id\": \"s1\", \"text\": \"Addendum: EGFR mutated.\"}\n",
                "{\"slide_id\": \"s2\", \"report_text\": \"   \"}\n",
                "{\"report_text\": \"no slide\"}\n",
                "not json\n",
                "\n",
                "{\"slide_id\": \"s3\", \"report_id\": \"r3\", \"report_text\": \"Squamous.\", \"grade\": 2}\n",
            ),
        )
        .unwrap();
        let (rows, errors) = read_reports(&p).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(
            (
                rows[0].report_id.as_str(),
                rows[1].report_id.as_str(),
                rows[2].report_id.as_str()
            ),
            ("s1", "s1#2", "r3")
        );
        assert_eq!(rows[0].labels["subtype"], "LUAD");
        assert_eq!(rows[2].labels["grade"], "2");
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [3, 4, 5]);
        assert!(errors[0].message.contains("empty report text"));
        assert!(errors[1].message.contains("missing slide_id"));
        assert!(errors[2].message.contains("malformed JSON"));
    }

    #[test]
    fn csv_with_quotes_and_missing_columns() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.csv");
        std::fs::write(&p, "slide_id,report_text,subtype\ns1,\"Carcinoma, clear-cell type.\",CCRCC\ns2,,PRCC\ns3,\"ok\"\n").unwrap();
        let (rows, errors) = read_reports(&p).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].text, "Carcinoma, clear-cell type.");
        assert_eq!(errors.len(), 2);
        assert!(
            errors[0].message.contains("empty report text"),
            "{:?}",
            errors
        );
        assert!(
            errors[1].message.contains("2 fields, the header has 3"),
            "{:?}",
            errors
        );
        std::fs::write(&p, "slide_id,report_text\n").unwrap();
        assert!(read_reports(&p)
            .unwrap_err()
            .to_string()
            .contains("no reports"));
    }
}
