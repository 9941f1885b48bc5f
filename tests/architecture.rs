//! The house's plan, kept: which room may use which (the layout at the top of src/lib.rs), no
//! circle between rooms or between the server's parts, and no production file too long to hold in
//! one's head. It reads `use` paths in src/, so it fails the day an import runs the wrong way.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest production source file, in lines (test files are exempt).
const MAX_LINES: usize = 700;

/// What each top-level module may use of the others (besides itself). `cli` and `main` sit on
/// top and may use everything; nothing uses them.
const MAY_USE: &[(&str, &[&str])] = &[
    ("bits", &[]),
    ("tls", &[]),
    ("shutdown", &[]),
    ("telemetry", &[]),
    ("config", &["bits"]),
    ("client", &["bits", "tls"]),
    ("server", &["bits", "config", "tls"]),
    ("receiver", &["bits"]),
    ("api", &["bits", "config"]),
    ("operator", &["api", "bits", "config", "shutdown"]),
    ("farm", &["api", "config", "shutdown", "tls"]),
];

struct SourceFile {
    path: PathBuf,
    /// The module path below `src`, e.g. ["server", "session", "store"].
    module: Vec<String>,
    /// The text without its `#[cfg(test)] mod tests` block.
    code: String,
    lines: usize,
    is_test: bool,
}

fn sources() -> Vec<SourceFile> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path
                .strip_prefix(&root)
                .expect("below src")
                .with_extension("");
            let mut module: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if module.last().map(String::as_str) == Some("mod") {
                module.pop();
            }
            let text = std::fs::read_to_string(&path).expect("read a source file");
            let is_test = module.last().map(String::as_str) == Some("tests")
                || module.iter().any(|m| m == "fixtures");
            let code = match text.find("#[cfg(test)]\nmod tests") {
                Some(i) => text[..i].to_string(),
                None => text.clone(),
            };
            out.push(SourceFile {
                lines: text.lines().count(),
                path,
                module,
                code,
                is_test,
            });
        }
    }
    out
}

/// The modules a file names as `crate::a::b`, or `super::x` for a sibling, as paths from `src`.
fn uses(file: &SourceFile) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let words = |rest: &str| -> Vec<String> {
        rest.split("::")
            .map(|w| {
                w.chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
                    .collect::<String>()
            })
            .take_while(|w| !w.is_empty())
            .collect()
    };
    for (i, _) in file.code.match_indices("crate::") {
        let path = words(&file.code[i + "crate::".len()..]);
        if !path.is_empty() {
            out.insert(path);
        }
    }
    // `super::` from module a::b::c names a::b; each further `super::` one level up.
    for (i, _) in file.code.match_indices("super::") {
        if file.code[..i].ends_with("::") {
            continue;
        }
        let mut rest = &file.code[i..];
        let mut base = file.module.clone();
        while let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
        }
        let named = words(rest);
        if let Some(first) = named.first() {
            base.push(first.clone());
            out.insert(base);
        }
    }
    out
}

fn has_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn each_room_uses_only_the_rooms_below_it() {
    let allowed: BTreeMap<&str, &[&str]> = MAY_USE.iter().copied().collect();
    let mut wrong = Vec::new();
    for f in sources() {
        let Some(top) = f.module.first().map(String::as_str) else {
            continue;
        };
        if matches!(top, "lib" | "main" | "cli") || f.is_test {
            continue;
        }
        let Some(may) = allowed.get(top) else {
            wrong.push(format!(
                "{}: the top-level module {top} is not in this test's plan (MAY_USE)",
                f.path.display()
            ));
            continue;
        };
        for used in uses(&f) {
            let other = used[0].as_str();
            if other != top && !may.contains(&other) {
                wrong.push(format!(
                    "{} uses crate::{}",
                    f.path.display(),
                    used.join("::")
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the plan:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn neither_the_rooms_nor_the_servers_parts_form_a_circle() {
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut server: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in sources().into_iter().filter(|f| !f.is_test) {
        let Some(me) = f.module.first().cloned() else {
            continue;
        };
        for used in uses(&f) {
            if used[0] != me {
                top.entry(me.clone()).or_default().insert(used[0].clone());
            }
            if me == "server" && used[0] == "server" && f.module.len() > 1 && used.len() > 1 {
                let (a, b) = (&f.module[1], &used[1]);
                if a != b {
                    server.entry(a.clone()).or_default().insert(b.clone());
                }
            }
        }
    }
    assert_eq!(has_cycle(&top), None, "a circle between modules: {top:#?}");
    assert_eq!(
        has_cycle(&server),
        None,
        "a circle between the server's parts: {server:#?}"
    );
}

#[test]
fn no_production_file_is_longer_than_the_limit() {
    let long: Vec<String> = sources()
        .into_iter()
        .filter(|f| !f.is_test && f.lines > MAX_LINES)
        .map(|f| format!("{} ({} lines)", f.path.display(), f.lines))
        .collect();
    assert!(
        long.is_empty(),
        "over {MAX_LINES} lines: split by job:\n{}",
        long.join("\n")
    );
}
