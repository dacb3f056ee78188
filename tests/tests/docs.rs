//! The project's map (`docs/ARCHITECTURE.md`) against the code: every file it names exists,
//! every `file::function` it names is defined in that file, and no source cites a design
//! document outside the repository.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// Code spans of a Markdown text that name a repository path, optionally with `::item`.
fn pointers(markdown: &str) -> Vec<(String, Option<String>)> {
    markdown
        .split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|span| {
            let (path, item) = match span.split_once("::") {
                Some((path, item)) => (path, Some(item.to_owned())),
                None => (span, None),
            };
            let looks_like_path = path.contains('/')
                && !path.contains(' ')
                && !path.contains('<')
                && path.rsplit('/').next().is_some_and(|file| file.contains('.'));
            looks_like_path.then(|| (path.to_owned(), item))
        })
        .collect()
}

/// Whether `source` defines `item` (a function, type, trait or module).
fn defines(source: &str, item: &str) -> bool {
    ["fn", "struct", "enum", "trait", "mod", "type"].iter().any(|kind| {
        source
            .match_indices(&format!("{kind} {item}"))
            .any(|(at, matched)| !source[at + matched.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_'))
    })
}

#[test]
fn every_pointer_in_the_architecture_document_exists() {
    let doc = std::fs::read_to_string(repo().join("docs/ARCHITECTURE.md")).expect("docs/ARCHITECTURE.md");
    let pointers = pointers(&doc);
    assert!(
        pointers.len() > 40,
        "the walks name the code they follow ({} pointers)",
        pointers.len()
    );
    let mut missing = Vec::new();
    for (path, item) in &pointers {
        let Ok(source) = std::fs::read_to_string(repo().join(path)) else {
            missing.push(format!("{path}: no such file"));
            continue;
        };
        if let Some(item) = item {
            if !defines(&source, item) {
                missing.push(format!("{path}::{item}: not defined there"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md names what is not there:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_pointer_reader_finds_paths_and_items_only() {
    let found = pointers("see `a/b.rs::run` and `c/d.rs`, not `cargo test` nor `consumer/<id>` nor `x::y`");
    assert_eq!(
        found,
        [
            ("a/b.rs".to_owned(), Some("run".to_owned())),
            ("c/d.rs".to_owned(), None)
        ]
    );
    assert!(defines("pub async fn run(x: u8)", "run"));
    assert!(!defines("pub async fn run_blocking()", "run"));
}

#[test]
fn sources_cite_the_map_in_the_repository() {
    let mut citing = Vec::new();
    let mut stack = vec![repo()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !matches!(name.as_str(), "target" | ".git" | ".stack" | "node_modules") {
                    stack.push(path);
                }
            } else if [".rs", ".sh", ".toml", ".yml", ".py"]
                .iter()
                .any(|ext| name.ends_with(ext))
                || name == "stack"
            {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                // Spelled in two parts so this file does not cite it either.
                if text.contains(concat!("DESIGN", ".md")) {
                    citing.push(path.display().to_string());
                }
            }
        }
    }
    assert!(
        citing.is_empty(),
        "cite docs/ARCHITECTURE.md instead of a planning file outside the repo: {citing:?}"
    );
}
