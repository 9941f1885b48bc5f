//! The documents say what the code does: every environment variable they tell a person to set is
//! read by the code, and the README's `bitsfarm serve` table lists exactly the flags the binary
//! takes (read from its `--help`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Files below `dir` (recursively) whose name ends with one of `exts`, skipping build output.
fn files(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            if !matches!(
                name.as_str(),
                "target" | "target-fuzz" | ".venv" | ".git" | "artifacts"
            ) {
                files(&p, exts, out);
            }
        } else if exts.iter().any(|x| name.ends_with(x)) {
            out.push(p);
        }
    }
}

/// `BITSFARM_…` names in `text`.
fn variables(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("BITSFARM_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        found.insert(tail[..end].trim_end_matches('_').to_string());
        rest = &tail[end..];
    }
    found
}

#[test]
fn every_variable_the_documents_name_is_read_by_the_code() {
    let mut docs = Vec::new();
    files(root(), &[".md"], &mut docs);
    let mut code = Vec::new();
    for dir in [
        "src", "scripts", "tests", "benches", ".ci", "fuzz", "charts",
    ] {
        files(
            &root().join(dir),
            &[".rs", ".sh", ".py", ".yaml", ".tpl", "run", "test", "fuzz"],
            &mut code,
        );
    }
    let this_file = root().join("tests/docs.rs");
    let read: BTreeSet<String> = code
        .iter()
        .filter(|p| **p != this_file)
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| variables(&t))
        .collect();
    let mut unread = Vec::new();
    for doc in &docs {
        let text = std::fs::read_to_string(doc).expect("a document");
        for v in variables(&text) {
            if !read.contains(&v) {
                unread.push(format!(
                    "{}: {v}",
                    doc.strip_prefix(root()).unwrap().display()
                ));
            }
        }
    }
    assert!(
        docs.len() > 3,
        "no documents found below {}",
        root().display()
    );
    assert!(
        unread.is_empty(),
        "documents name variables no code reads:\n{}",
        unread.join("\n")
    );
}

/// `--flag` names at the start of each row of the README's `bitsfarm serve` table.
fn readme_serve_flags() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let section = readme
        .split("\n## `bitsfarm serve`\n")
        .nth(1)
        .expect("the README has a `bitsfarm serve` section");
    let mut flags = BTreeSet::new();
    for row in section
        .lines()
        .take_while(|l| l.starts_with('|'))
        .filter(|l| !l.starts_with("|---"))
    {
        let first = row.split('|').nth(1).unwrap_or("");
        for word in first.split(['`', ' ', ',', '(']) {
            if let Some(name) = word.strip_prefix("--")
                && !name.is_empty()
            {
                flags.insert(format!("--{name}"));
            }
        }
    }
    flags
}

fn help_flags(subcommand: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_bitsfarm"))
        .args([subcommand, "--help"])
        .output()
        .expect("bitsfarm runs");
    assert!(out.status.success(), "{subcommand} --help: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            // `-c, --config <FILE>`: the long name after a short one.
            let l = match l.split_once(", --") {
                Some((short, _)) if short.starts_with('-') && short.len() == 2 => &l[4..],
                _ => l,
            };
            let name = l.strip_prefix("--")?.split([' ', '=', '<']).next()?;
            Some(format!("--{name}"))
        })
        .filter(|f| f != "--help" && f != "--log-format")
        .collect()
}

#[test]
fn the_readme_serve_table_lists_exactly_the_flags_serve_takes() {
    let documented = readme_serve_flags();
    let real = help_flags("serve");
    assert!(real.len() > 10, "too few flags read from --help: {real:?}");
    let missing: Vec<_> = real.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&real).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "README's serve table: missing {missing:?}, not a flag of serve {unknown:?}"
    );
}
