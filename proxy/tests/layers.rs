//! The crate's layers (see `src/lib.rs`): the HTTP ingress depends on the
//! routing core, the core and the ingress on the leaves (`metrics`,
//! `percent`), never the other way round, so no module circle crosses them.
//! This reads the sources: a file of a lower part that names a module above
//! it (`crate::http`, a root re-export like `crate::Proxy`, `super::` up to
//! the crate root, or `serval_proxy::` in a doc example) fails here. And
//! the Python SDK takes the router from `serval_proxy::routing` alone.

use std::path::{Path, PathBuf};

use regex::Regex;

/// Each lower part of the crate and the top-level modules its files may name.
const LOWER_PARTS: &[(&str, &[&str])] = &[
    ("routing", &["routing", "metrics", "percent"]),
    ("metrics", &["metrics"]),
    ("percent", &["percent"]),
];

/// The `.rs` files under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The files of top-level module `part`: `src/part.rs` and everything under
/// `src/part/`.
fn files_of(src: &Path, part: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let file = src.join(format!("{part}.rs"));
    if file.is_file() {
        files.push(file);
    }
    let dir = src.join(part);
    if dir.is_dir() {
        rust_files(&dir, &mut files);
    }
    assert!(!files.is_empty(), "no sources for module `{part}`");
    files
}

/// How many modules deep `file` is below the crate root (`src/a.rs` and
/// `src/a/mod.rs`: 1, `src/a/b.rs`: 2). A path with that many `super::`
/// reaches the crate root, and through its re-exports everything.
fn depth(src: &Path, file: &Path) -> usize {
    let relative = file.strip_prefix(src).expect("file under src");
    let components = relative.components().count();
    if relative.file_name().is_some_and(|n| n == "mod.rs") {
        components - 1
    } else {
        components
    }
}

/// What `text` (the source of a file `depth` modules deep) names outside
/// `allowed`, one line each.
fn violations(text: &str, depth: usize, allowed: &[&str]) -> Vec<String> {
    let crate_path = Regex::new(r"\bcrate::(\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)").expect("regex");
    let supers = Regex::new(r"\b(?:super::)+").expect("regex");
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = |what: String| format!("line {}: {what}: {}", n + 1, line.trim());
        for c in crate_path.captures_iter(line) {
            let named = &c[1];
            let modules: Vec<&str> = match named.strip_prefix('{') {
                Some(group) => group
                    .trim_end_matches('}')
                    .split(',')
                    .map(|item| item.trim().split("::").next().unwrap_or("").trim())
                    .filter(|m| !m.is_empty())
                    .collect(),
                None => vec![named],
            };
            for m in modules {
                if !allowed.contains(&m) {
                    found.push(at(format!("names `crate::{m}`")));
                }
            }
        }
        for s in supers.find_iter(line) {
            // Conservative: an inline `mod tests` adds a level this does not
            // count; name such a path from `crate::` instead.
            if s.as_str().matches("super::").count() >= depth {
                found.push(at("reaches the crate root through `super::`".into()));
            }
        }
        if line.contains("serval_proxy::") {
            found.push(at("names the crate by `serval_proxy::`".into()));
        }
    }
    found
}

#[test]
fn the_routing_core_and_the_leaves_name_no_module_above_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    for (part, allowed) in LOWER_PARTS {
        for file in files_of(&src, part) {
            let text = std::fs::read_to_string(&file).expect("read source");
            for v in violations(&text, depth(&src, &file), allowed) {
                found.push(format!("{}: {v}", file.display()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "a lower part of the proxy names a module above it:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_sdk_takes_the_router_from_the_routing_core_alone() {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python-sdk/src");
    let mut files = Vec::new();
    rust_files(&sdk, &mut files);
    let uses = Regex::new(r"\bserval_proxy::([A-Za-z_][A-Za-z0-9_]*)").expect("regex");
    let mut seen = 0;
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read source");
        for c in uses.captures_iter(&text) {
            seen += 1;
            if &c[1] != "routing" {
                found.push(format!("{}: serval_proxy::{}", file.display(), &c[1]));
            }
        }
    }
    assert!(
        seen > 0,
        "the SDK no longer uses serval_proxy: drop this test"
    );
    assert!(
        found.is_empty(),
        "the SDK uses the proxy beyond `routing`:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_catches_what_it_is_for() {
    let allowed = &["routing", "metrics", "percent"][..];
    let bad = "use crate::http::REQUESTS_TOTAL;\n\
               use crate::{metrics, proxy::Proxy};\n\
               /// [`crate::Router`]\n\
               use super::super::Proxy;\n\
               /// serval_proxy::serve(..)";
    let found = violations(bad, 2, allowed);
    assert_eq!(found.len(), 5, "{found:#?}");
    let good = "use crate::metrics::{self, BATCH_SIZE};\n\
                use crate::{metrics, percent::decode_path};\n\
                use super::policy::ReplicaChoice;\n\
                use crate::routing::Router;";
    assert_eq!(violations(good, 2, allowed), Vec::<String>::new());
}
