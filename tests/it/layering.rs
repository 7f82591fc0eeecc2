//! The house's shape: no two modules of `src/` depend on each other, directly or through others
//! (a module and its own parent or children aside), so each step can be read, and changed, from
//! the modules below it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each module (`a::b`, "" for the crate root) and the source of its file, without tests and
/// comments.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&root, &mut files);
    files
        .into_iter()
        .map(|path| {
            let relative = path.strip_prefix(&root).unwrap().with_extension("");
            let mut name = relative.to_string_lossy().replace('/', "::");
            if name == "main" || name == "lib" {
                name.clear();
            } else if let Some(parent) = name.strip_suffix("::mod") {
                name = parent.to_owned();
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code: String = text
                .split("#[cfg(test)]")
                .next()
                .unwrap()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            (name, code)
        })
        .collect()
}

/// The longest module name that `path` (`a::b::Item`) starts with.
fn owner(modules: &BTreeMap<String, String>, path: &str) -> Option<String> {
    let mut parts: Vec<&str> = path.split("::").collect();
    while !parts.is_empty() {
        let name = parts.join("::");
        if modules.contains_key(&name) {
            return Some(name);
        }
        parts.pop();
    }
    None
}

/// Every `crate::…` and `super::…` path a module names, as the modules they belong to.
fn dependencies(modules: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut edges = BTreeMap::new();
    for (name, code) in modules {
        let parent: Vec<&str> = name.split("::").collect();
        let parent = parent[..parent.len().saturating_sub(1)].join("::");
        let mut named = BTreeSet::new();
        for (prefix, base) in [("crate::", String::new()), ("super::", parent.clone())] {
            for (at, _) in code.match_indices(prefix) {
                let rest = &code[at + prefix.len()..];
                let mut paths = Vec::new();
                if let Some(group) = rest.strip_prefix('{') {
                    let inner = group.split('}').next().unwrap_or("");
                    paths.extend(inner.split(',').map(|p| p.trim().to_owned()));
                } else {
                    paths.push(rest.chars().take_while(|c| word(*c)).collect());
                }
                for path in paths {
                    let full = if base.is_empty() {
                        path.clone()
                    } else {
                        format!("{base}::{path}")
                    };
                    if let Some(target) = owner(modules, full.trim_end_matches("::")) {
                        named.insert(target);
                    }
                }
            }
        }
        let related = |a: &str, b: &str| {
            a.is_empty()
                || b.is_empty()
                || a == b
                || b.starts_with(&format!("{a}::"))
                || a.starts_with(&format!("{b}::"))
        };
        named.retain(|target| !related(name, target));
        edges.insert(name.clone(), named);
    }
    edges
}

#[test]
fn no_two_modules_depend_on_each_other() {
    let modules = modules();
    assert!(modules.contains_key("pipeline") && modules.contains_key("console::api"));
    let edges = dependencies(&modules);
    // Follows every path from each module; coming back to where it started is a loop.
    let mut loops = Vec::new();
    for start in edges.keys() {
        let mut stack = vec![vec![start.clone()]];
        let mut seen = BTreeSet::new();
        while let Some(path) = stack.pop() {
            let last = path.last().unwrap();
            for next in &edges[last] {
                if next == start {
                    loops.push(format!("{} -> {start}", path.join(" -> ")));
                } else if seen.insert(next.clone()) {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push(longer);
                }
            }
        }
    }
    assert!(loops.is_empty(), "import loops:\n{}", loops.join("\n"));
}

#[test]
fn the_check_finds_a_loop_when_there_is_one() {
    let mut modules = BTreeMap::new();
    modules.insert("a".to_owned(), "use crate::b::Thing;".to_owned());
    modules.insert("b".to_owned(), "fn f() { crate::a::g() }".to_owned());
    modules.insert("c".to_owned(), "use super::{a, b};".to_owned());
    let edges = dependencies(&modules);
    assert!(edges["a"].contains("b") && edges["b"].contains("a"));
    assert_eq!(edges["c"].len(), 2);
}
