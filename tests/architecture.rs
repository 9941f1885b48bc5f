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

/// The module path that starts `rest` (lower-case words joined by `::`), and, for a brace group
/// such as `{auth, handoff::Peers}`, each member's path.
fn paths_at(rest: &str) -> Vec<Vec<String>> {
    if let Some(group) = rest.strip_prefix('{') {
        let mut depth = 0;
        let mut items = Vec::new();
        let mut start = 0;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    items.push(&group[start..i]);
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(&group[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return items
            .into_iter()
            .flat_map(|item| paths_at(item.trim_start()))
            .collect();
    }
    let mut words = Vec::new();
    let mut rest = rest;
    loop {
        let word: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
            .collect();
        if word.is_empty() {
            break;
        }
        rest = &rest[word.len()..];
        words.push(word);
        match rest.strip_prefix("::") {
            Some(r) if r.starts_with('{') => {
                // The module itself is used too, if only for an item of its own (`a::{Item}`).
                let mut all = vec![words.clone()];
                all.extend(
                    paths_at(r)
                        .into_iter()
                        .map(|tail| [words.clone(), tail].concat()),
                );
                return all;
            }
            Some(r) => rest = r,
            None => break,
        }
    }
    if words.is_empty() {
        Vec::new()
    } else {
        vec![words]
    }
}

/// The modules a file names, as paths from `src`: `crate::a::b`, and `super::x` (from module
/// a::b::c that is a::b::x; each further `super::` one level up).
fn uses(file: &SourceFile) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    for (i, _) in file.code.match_indices("crate::") {
        if file.code[..i].ends_with("::") {
            continue;
        }
        for path in paths_at(&file.code[i + "crate::".len()..]) {
            out.insert(path);
        }
    }
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
        for path in paths_at(rest) {
            out.insert([base.clone(), path].concat());
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
fn no_modules_form_a_circle_at_any_level() {
    // One graph per folder: its children, and which of them uses which (through any of their
    // descendants). src/ itself is the top folder.
    let mut graphs: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for f in sources().into_iter().filter(|f| !f.is_test) {
        for used in uses(&f) {
            let common = f
                .module
                .iter()
                .zip(&used)
                .take_while(|(a, b)| a == b)
                .count();
            let (Some(from), Some(to)) = (f.module.get(common), used.get(common)) else {
                continue; // a module using its own descendant, or its own items
            };
            graphs
                .entry(f.module[..common].to_vec())
                .or_default()
                .entry(from.clone())
                .or_default()
                .insert(to.clone());
        }
    }
    assert!(
        graphs.contains_key(&Vec::new()),
        "no top-level graph: {graphs:?}"
    );
    for (folder, graph) in &graphs {
        assert_eq!(
            has_cycle(graph),
            None,
            "a circle among the modules of src/{}: {graph:#?}",
            folder.join("/")
        );
    }
}

#[test]
fn braced_imports_count() {
    let names =
        |s: &str| -> Vec<String> { paths_at(s).into_iter().map(|p| p.join("::")).collect() };
    assert_eq!(
        names("{auth, handoff::{Peers, key}, tls};"),
        ["auth", "handoff", "handoff::key", "tls"]
    );
    assert_eq!(
        names("server::{session, http::Body};"),
        ["server", "server::session", "server::http"]
    );
    assert_eq!(names("bits::protocol::BitsError;"), ["bits::protocol"]);
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

/// The layout the README's Contributing section shows is the one at the top of src/lib.rs.
#[test]
fn the_readme_shows_the_layout_of_lib_rs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let block = |text: &str| -> Option<String> {
        let start = text.find("```text\n")? + "```text\n".len();
        let len = text[start..].find("```")?;
        Some(text[start..start + len].to_string())
    };
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).expect("src/lib.rs");
    let doc: String = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| format!("{}\n", l.strip_prefix(' ').unwrap_or(l)))
        .collect();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let section = readme
        .split("\n## Contributing")
        .nth(1)
        .expect("a Contributing section in the README");
    let (Some(ours), Some(theirs)) = (block(&doc), block(section)) else {
        panic!("no ```text layout block in src/lib.rs's doc or the README's Contributing section");
    };
    assert_eq!(
        theirs, ours,
        "the README's layout differs from src/lib.rs's: copy the one from lib.rs"
    );
}
