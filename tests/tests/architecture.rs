//! docs/architecture.md against the code: every module the page names exists, every top-level
//! module of every crate is named there, and no top-level module of a crate imports one that
//! imports it back (directly or through others).
//!
//! Modules are named on the page as `` `<crate dir>::<module>[::<module>...]` ``, e.g.
//! `` `operator::controller` `` or `` `sidecar::embed::batcher` ``.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The workspace members' directories, from the root Cargo.toml.
fn members() -> Vec<String> {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let line = manifest.lines().find(|l| l.trim_start().starts_with("members")).expect("no workspace members");
    let list = &line[line.find('[').unwrap() + 1..line.rfind(']').unwrap()];
    list.split(',').map(|m| m.trim().trim_matches('"').to_owned()).filter(|m| !m.is_empty()).collect()
}

/// A Rust identifier at the start of `text`.
fn ident(text: &str) -> &str {
    let end = text.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(text.len());
    &text[..end]
}

/// Source text without `//` comments (doc links must not count as imports).
fn code(text: &str) -> String {
    text.lines().map(|l| l.find("//").map_or(l, |i| &l[..i])).collect::<Vec<_>>().join("\n")
}

/// The top-level modules a crate declares in its lib.rs.
fn top_modules(lib: &str) -> BTreeSet<String> {
    code(lib)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l.strip_prefix("pub mod ").or_else(|| l.strip_prefix("mod "))?;
            rest.ends_with(';').then(|| ident(rest).to_owned())
        })
        .collect()
}

/// The first path segment of every `crate::...` reference, `crate::{a, b::c}` included.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let text = code(text);
    let mut rest = text.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut item_start) = (0usize, true);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        item_start = false;
                        found.insert(ident(&group[i..]).to_owned());
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest).to_owned());
        }
    }
    found.retain(|m| !m.is_empty() && m != "self");
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Which top-level modules each top-level module of the crate in `dir` uses.
fn module_graph(dir: &Path, modules: &BTreeSet<String>) -> BTreeMap<String, BTreeSet<String>> {
    let src = dir.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap().as_os_str().to_string_lossy();
        let top = first.trim_end_matches(".rs").to_owned();
        if !modules.contains(&top) {
            continue; // lib.rs, main.rs, bin/
        }
        let uses = crate_refs(&std::fs::read_to_string(&file).unwrap());
        let entry = graph.entry(top.clone()).or_default();
        entry.extend(uses.into_iter().filter(|m| *m != top && modules.contains(m)));
    }
    graph
}

/// Every cycle through `graph`, each as the path that closes it.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        found: &mut Vec<String>,
    ) {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            found.push(cycle.join(" -> "));
            return;
        }
        if done.contains(node) {
            return;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, path, done, found);
        }
        path.pop();
        done.insert(node.to_owned());
    }
    let (mut done, mut found) = (BTreeSet::new(), Vec::new());
    for node in graph.keys() {
        visit(node, graph, &mut Vec::new(), &mut done, &mut found);
    }
    found
}

/// The `` `dir::module[::module]` `` names on the page.
fn named(page: &str, crates: &BTreeSet<String>) -> BTreeSet<(String, Vec<String>)> {
    let mut names = BTreeSet::new();
    for span in page.split('`').skip(1).step_by(2) {
        let mut parts = span.split("::");
        let Some(krate) = parts.next().filter(|c| crates.contains(*c)) else { continue };
        let path: Vec<String> = parts.map(str::to_owned).collect();
        if !path.is_empty() && path.iter().all(|p| !p.is_empty() && ident(p) == p) {
            names.insert((krate.to_owned(), path));
        }
    }
    names
}

fn module_exists(dir: &Path, path: &[String]) -> bool {
    let base = path.iter().fold(dir.join("src"), |p, segment| p.join(segment));
    base.with_extension("rs").is_file() || base.join("mod.rs").is_file()
}

#[test]
fn the_parsers_see_what_the_code_says() {
    let lib = "//! docs\npub mod a;\nmod b;\n#[cfg(test)]\nmod tests;\npub use a::X;\n// mod commented;\n";
    assert_eq!(top_modules(lib), ["a", "b", "tests"].map(String::from).into());
    let refs = crate_refs("use crate::{a::X, b, c::{d, e}};\nuse crate::f::G;\n// see crate::h\nlet x = crate::i();");
    assert_eq!(refs, ["a", "b", "c", "f", "i"].map(String::from).into());
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_owned(), ["b".to_owned()].into()),
        ("b".to_owned(), ["c".to_owned()].into()),
        ("c".to_owned(), ["a".to_owned()].into()),
        ("d".to_owned(), ["a".to_owned()].into()),
    ]
    .into();
    assert_eq!(cycles(&graph), ["a -> b -> c -> a"]);
    let crates: BTreeSet<String> = ["operator".to_owned()].into();
    let page = "`operator::controller` and `operator::autoscale::runner`, not `kube::Api` or `operator`";
    let names = named(page, &crates);
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn architecture_page_names_every_module_and_only_modules_that_exist() {
    let page = std::fs::read_to_string(root().join("docs/architecture.md")).expect("docs/architecture.md");
    let crates: BTreeSet<String> = members().into_iter().collect();
    let names = named(&page, &crates);
    let mut problems = Vec::new();
    for (krate, path) in &names {
        if !module_exists(&root().join(krate), path) {
            problems.push(format!("the page names `{krate}::{}`, which does not exist", path.join("::")));
        }
    }
    for krate in &crates {
        let Ok(lib) = std::fs::read_to_string(root().join(krate).join("src/lib.rs")) else { continue };
        for module in top_modules(&lib).into_iter().filter(|m| m != "tests") {
            if !names.contains(&(krate.clone(), vec![module.clone()])) {
                problems.push(format!("`{krate}::{module}` is a top-level module the page does not name"));
            }
        }
    }
    assert!(problems.is_empty(), "docs/architecture.md is out of date:\n{}", problems.join("\n"));
}

#[test]
fn no_top_level_module_imports_one_that_imports_it_back() {
    let mut found = Vec::new();
    for krate in members() {
        let dir = root().join(&krate);
        let Ok(lib) = std::fs::read_to_string(dir.join("src/lib.rs")) else { continue };
        let graph = module_graph(&dir, &top_modules(&lib));
        found.extend(cycles(&graph).into_iter().map(|c| format!("{krate}: {c}")));
    }
    assert!(found.is_empty(), "module cycles:\n{}", found.join("\n"));
}
