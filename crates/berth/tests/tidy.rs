//! House rules checked over the source tree: every Rust file opens with a
//! `//!` line saying what it is for.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_opens_with_a_doc_line() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    rust_files(&crates, &mut files);
    assert!(
        files.len() > 10,
        "found only {} files under {}",
        files.len(),
        crates.display()
    );
    let missing: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            !text.trim_start().starts_with("//!")
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "modules without a `//!` first line:\n{}",
        missing.join("\n")
    );
}

/// Codes written in the source as `with_code("…")`, `ErrorInfo::new("…", …)`,
/// `code: "…"`, or, in a file defining `fn code(&self)`, its match arms.
fn error_codes_in(text: &str) -> Vec<String> {
    let mut markers = vec!["with_code(", "ErrorInfo::new(", "code: \""];
    if text.contains("fn code(&self)") {
        markers.push("=> ");
    }
    let mut out = Vec::new();
    for marker in markers {
        let mut rest = text;
        while let Some(i) = rest.find(marker) {
            rest = &rest[i + marker.len()..];
            let tail = rest.trim_start();
            let Some(tail) = tail
                .strip_prefix('"')
                .or(marker.ends_with('"').then_some(tail))
            else {
                continue;
            };
            let code: String = tail
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !code.is_empty() && tail[code.len()..].starts_with('"') {
                out.push(code);
            }
        }
    }
    out
}

#[test]
fn every_error_code_has_a_page_under_docs_errors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    // The crates whose errors reach an instance's `error.code` (the HTTP
    // API's request errors are documented in its OpenAPI document).
    let mut files = Vec::new();
    for krate in ["core", "store", "worker", "runtime", "flows", "docker"] {
        let src = root.join("crates").join(krate).join("src");
        if src.exists() {
            rust_files(&src, &mut files);
        }
    }
    let mut codes = std::collections::BTreeSet::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        // A unit test's made-up codes never reach a user.
        let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        for c in error_codes_in(text) {
            codes.insert(c);
        }
    }
    for expected in [
        "image_not_found",
        "flow_timeout",
        "engine_unavailable",
        "timeout",
        "conflict",
        "commit_failed",
    ] {
        assert!(
            codes.contains(expected),
            "the scan missed {expected}: {codes:?}"
        );
    }
    let missing: Vec<&String> = codes
        .iter()
        .filter(|c| !root.join("docs/errors").join(format!("{c}.md")).exists())
        .collect();
    assert!(
        missing.is_empty(),
        "error codes without a page under docs/errors/: {missing:?}"
    );
}
