//! The shape of `vmm/src`, checked: no import cycle between its modules
//! (a parent and its own child may use each other: `run/`'s files split one
//! `impl Vmm`), the device models import nothing above them — not the
//! run loop, the FT role, the host-facing pieces or the command line —, and
//! no code outside `ft/` looks inside the FT role.
//!
//! Each `.rs` file is a module; every `crate::...` path (in `use` lines and
//! in code, groups `crate::{a, b::c}` included) and every `super::...` path
//! is an edge to the deepest module it names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules `devices/` may not reach.
const ABOVE_DEVICES: &[&str] = &["run", "ft", "host", "cli", "builder", "inputs", "log_io", "check"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The module path of a source file: `run/mod.rs` -> `run`, `ft/gate.rs` -> `ft::gate`.
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(src()).expect("under src");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib" || p == "main") {
        parts.pop();
    }
    parts.join("::")
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its comments and string literals.
fn code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// The paths a `crate::`/`super::` reference names, `text` starting right
/// after its `::` (a group expands to one path per member).
fn paths(text: &str) -> Vec<Vec<String>> {
    let mut segs = Vec::new();
    let mut rest = text.trim_start();
    loop {
        if let Some(body) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = body
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map_or(body.len(), |(i, _)| i);
            let body = &body[..end];
            let mut out = Vec::new();
            let (mut depth, mut start) = (0, 0);
            for (i, c) in body.char_indices().chain([(body.len(), ',')]) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        let member = body[start..i].trim();
                        if !member.is_empty() && member != "self" {
                            for p in paths(member) {
                                out.push(segs.iter().cloned().chain(p).collect());
                            }
                        } else if member == "self" {
                            out.push(segs.clone());
                        }
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            return out;
        }
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        if name.is_empty() {
            break;
        }
        rest = &rest[name.len()..];
        segs.push(name);
        match rest.strip_prefix("::") {
            Some(more) => rest = more,
            None => break,
        }
    }
    vec![segs]
}

/// Edges from each module to the modules it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut all = Vec::new();
    files(&src(), &mut all);
    let modules: BTreeSet<String> = all.iter().map(|f| module_of(f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &all {
        let from = module_of(file);
        if from.is_empty() {
            continue; // lib.rs / main.rs: the crate root declares everything.
        }
        let text = code(&std::fs::read_to_string(file).expect("read a source file"));
        for (anchor, base) in [("crate::", Vec::new()), ("super::", parent_of(&from, file))] {
            for (at, _) in text.match_indices(anchor) {
                if text[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':') {
                    continue;
                }
                for segs in paths(&text[at + anchor.len()..]) {
                    let mut full = base.clone();
                    full.extend(segs);
                    // The deepest module the path names.
                    let target = (1..=full.len()).rev().map(|n| full[..n].join("::")).find(|m| modules.contains(m));
                    if let Some(to) = target.filter(|to| *to != from) {
                        edges.entry(from.clone()).or_default().insert(to);
                    }
                }
            }
        }
    }
    edges
}

/// The module `super` names in `module` (defined in `file`).
fn parent_of(module: &str, _file: &Path) -> Vec<String> {
    let mut parts: Vec<String> = module.split("::").map(String::from).collect();
    parts.pop();
    parts
}

fn related(a: &str, b: &str) -> bool {
    a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"))
}

/// A cycle (other than a parent and its descendant using each other), if any.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if related(node, next) {
                continue;
            }
            if let Some(c) = visit(next, edges, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        if let Some(c) = visit(node, edges, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

/// Every cycle, one at a time (each found one's last edge dropped).
fn all_cycles(mut edges: BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut cycles = Vec::new();
    while let Some(cycle) = find_cycle(&edges) {
        cycles.push(cycle.join(" -> "));
        let (a, b) = (&cycle[cycle.len() - 2], &cycle[cycle.len() - 1]);
        if let Some(tos) = edges.get_mut(a) {
            tos.remove(b);
        }
    }
    cycles
}

#[test]
fn vmm_src_has_no_import_cycle() {
    let edges = graph();
    assert!(edges.len() > 20, "the graph looks wrong: {edges:?}");
    let cycles = all_cycles(edges);
    assert!(cycles.is_empty(), "import cycles in vmm/src:\n{}", cycles.join("\n"));
}

/// The graph between top-level modules (`run/`, `ft/`, `devices/` each
/// one node): a cycle through a folder's files is a cycle between folders.
fn top_level(edges: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, BTreeSet<String>> {
    let top = |m: &str| m.split("::").next().unwrap_or_default().to_string();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in edges {
        for to in tos {
            if top(from) != top(to) {
                out.entry(top(from)).or_default().insert(top(to));
            }
        }
    }
    out
}

#[test]
fn no_cycle_between_top_level_modules() {
    let cycles = all_cycles(top_level(&graph()));
    assert!(cycles.is_empty(), "import cycles between vmm/src's top-level modules:\n{}", cycles.join("\n"));
}

#[test]
fn devices_import_nothing_above_them() {
    let edges = graph();
    let mut bad = Vec::new();
    for (from, tos) in &edges {
        if from != "devices" && !from.starts_with("devices::") {
            continue;
        }
        for to in tos {
            let top = to.split("::").next().unwrap_or_default();
            if ABOVE_DEVICES.contains(&top) {
                bad.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(bad.is_empty(), "device models reach above them: {bad:?}");
}

/// The FT role's variants, which only `ft/` may name: everything else asks
/// the role through `run::RoleHooks` or builds one with its constructors.
const ROLE_VARIANTS: &[&str] = &["Role::Solo", "Role::Primary", "Role::Backup"];

#[test]
fn only_ft_looks_inside_the_role() {
    let mut all = Vec::new();
    files(&src(), &mut all);
    let mut bad = Vec::new();
    for file in all {
        let module = module_of(&file);
        if module == "ft" || module.starts_with("ft::") {
            continue;
        }
        let text = code(&std::fs::read_to_string(&file).expect("read source"));
        for variant in ROLE_VARIANTS {
            if text.contains(variant) {
                bad.push(format!("{module} names {variant}"));
            }
        }
    }
    assert!(bad.is_empty(), "code outside ft/ looks inside the FT role: {bad:?}");
}

#[test]
fn the_checker_sees_cycles_and_groups() {
    let text = code("use crate::{a::b, c::{d, e}}; // crate::zz\nfn f() { crate::g::h(); }");
    let at = text.find("crate::").unwrap();
    let got = paths(&text[at + 7..]);
    assert_eq!(got, vec![vec!["a", "b"], vec!["c", "d"], vec!["c", "e"]]);
    assert!(!text.contains("zz"));
    let mut edges = BTreeMap::new();
    edges.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    edges.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert!(find_cycle(&edges).is_some());
    edges.insert("a::x".to_string(), BTreeSet::from(["a".to_string()]));
    edges.remove("b");
    assert!(find_cycle(&edges).is_none(), "a parent and its child may use each other");
}
