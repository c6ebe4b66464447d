//! Layers point down: no two modules of `src/` depend on each other, directly or in a ring.
//!
//! Reads every file of `src/`, collects the paths it names (`use crate::…`, `crate::…` in code,
//! `super::…`), and resolves each to the module that defines it. A module may use its own
//! submodules and its ancestors' items (a parent wires its children; a child builds on what its
//! parent shares); every other reference is an edge between the two siblings under their nearest
//! common ancestor: `roles::consume` using `db::payments` is `roles -> db`; `api::webhooks` using
//! `api::payments` is `api::webhooks -> api::payments`. A cycle among those edges fails the test,
//! naming each edge of the ring and the files that make it. Test code (`#[cfg(test)]` and below)
//! and the binary's `main.rs` (the top, which may use anything) are not counted.

#![allow(
    clippy::expect_used,
    reason = "a check that cannot read the sources should fail loudly"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// Every module of `src/` (as a path of names, the crate root empty) with its file.
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src/ is readable").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src/");
            let mut parts: Vec<String> = rel
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            match parts.last().map(String::as_str) {
                Some("main") if parts.len() == 1 => continue,
                Some("lib") if parts.len() == 1 => parts.clear(),
                Some("mod") => {
                    parts.pop();
                }
                _ => {}
            }
            out.insert(parts, path);
        }
    }
    out
}

/// The code of a file without comments, string and char literals, and without its tests.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'r' && (b[i..].starts_with(b"r\"") || b[i..].starts_with(b"r#")) {
            // Raw string: r"…", r#"…"#, …
            let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
            if b.get(i + 1 + hashes) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            let end: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            i += 2 + hashes;
            while i < b.len() && !b[i..].starts_with(&end) {
                i += 1;
            }
            i += end.len();
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            i += 3; // 'x'
        } else if b[i] == b'\'' && b.get(i + 1) == Some(&b'\\') {
            i += 2;
            while i < b.len() && b[i] != b'\'' {
                i += 1;
            }
            i += 1;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The paths named after `prefix::` at `at` (a plain path, or a `{…}` group), appended to `base`.
fn paths_at(code: &[u8], mut at: usize, base: Module, out: &mut Vec<Module>) {
    let mut path = base;
    loop {
        while at < code.len() && code[at].is_ascii_whitespace() {
            at += 1;
        }
        if code.get(at) == Some(&b'{') {
            // A group: each comma-separated entry continues `path`.
            at += 1;
            let mut depth = 0;
            let mut start = at;
            while at < code.len() {
                match code[at] {
                    b'{' => depth += 1,
                    b'}' if depth == 0 => {
                        paths_at(code, start, path.clone(), out);
                        return;
                    }
                    b'}' => depth -= 1,
                    b',' if depth == 0 => {
                        paths_at(code, start, path.clone(), out);
                        start = at + 1;
                    }
                    _ => {}
                }
                at += 1;
            }
            return;
        }
        let start = at;
        while at < code.len() && is_ident(code[at]) {
            at += 1;
        }
        if at == start {
            break;
        }
        path.push(String::from_utf8_lossy(&code[start..at]).into_owned());
        if code[at..].starts_with(b"::") {
            at += 2;
        } else {
            break;
        }
    }
    out.push(path);
}

/// Every module path a file's code names, resolved against `me` (the file's module).
fn references(code: &str, me: &Module) -> Vec<Module> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let boundary = i == 0 || !is_ident(b[i - 1]) && b[i - 1] != b':';
        if boundary && b[i..].starts_with(b"crate::") {
            paths_at(b, i + 7, Vec::new(), &mut out);
        } else if boundary && b[i..].starts_with(b"super::") {
            let mut base = me.clone();
            let mut j = i;
            while b[j..].starts_with(b"super::") {
                base.pop();
                j += 7;
            }
            paths_at(b, j, base, &mut out);
        }
        i += 1;
    }
    out
}

/// The longest prefix of `path` that is a module.
fn resolve(path: &Module, known: &BTreeMap<Module, PathBuf>) -> Module {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| known.contains_key(p))
        .unwrap_or_default()
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

type Edges = BTreeMap<(Module, Module), BTreeSet<String>>;

/// The sibling edges of `src/`, each with the files (and what they name) that make it.
fn edges(src: &Path) -> Edges {
    let known = modules(src);
    let mut edges = Edges::new();
    for (me, file) in &known {
        let text = std::fs::read_to_string(file).expect("source is readable");
        for target in references(&code_of(&text), me) {
            let to = resolve(&target, &known);
            let common = me.iter().zip(&to).take_while(|(a, b)| a == b).count();
            // Ancestors and descendants may use each other.
            if common == me.len() || common == to.len() {
                continue;
            }
            let key = (me[..=common].to_vec(), to[..=common].to_vec());
            let shown = file
                .strip_prefix(src.parent().unwrap_or(src))
                .unwrap_or(file);
            edges.entry(key).or_default().insert(format!(
                "{} uses {}",
                shown.display(),
                name(&target)
            ));
        }
    }
    edges
}

/// The rings among the edges (strongly connected components with more than one module).
fn rings(edges: &Edges) -> Vec<Vec<Module>> {
    let nodes: BTreeSet<&Module> = edges.keys().flat_map(|(a, b)| [a, b]).collect();
    let reaches = |from: &Module| -> BTreeSet<Module> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(n) = todo.pop() {
            for ((a, b), _) in edges.range((n.clone(), Vec::new())..) {
                if a != &n {
                    break;
                }
                if seen.insert(b.clone()) {
                    todo.push(b.clone());
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&Module, BTreeSet<Module>> =
        nodes.iter().map(|n| (*n, reaches(n))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for n in &nodes {
        if done.contains(*n) || !reach[n].contains(*n) {
            continue;
        }
        let ring: Vec<Module> = nodes
            .iter()
            .filter(|m| reach[n].contains(**m) && reach[**m].contains(*n))
            .map(|m| (*m).clone())
            .collect();
        done.extend(ring.iter().cloned());
        out.push(ring);
    }
    out
}

/// A report of each ring: its modules and the references that tie it.
fn report(edges: &Edges, rings: &[Vec<Module>]) -> String {
    let mut out = String::new();
    for ring in rings {
        let names: Vec<String> = ring.iter().map(name).collect();
        out.push_str(&format!(
            "\nmodules that depend on each other: {}\n",
            names.join(", ")
        ));
        for ((a, b), why) in edges {
            if ring.contains(a) && ring.contains(b) {
                out.push_str(&format!("  {} -> {}:\n", name(a), name(b)));
                for w in why {
                    out.push_str(&format!("    {w}\n"));
                }
            }
        }
    }
    out
}

#[test]
fn modules_of_src_form_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = edges(&src);
    assert!(
        !edges.is_empty(),
        "no references found: the parser is broken"
    );
    let rings = rings(&edges);
    assert!(
        rings.is_empty(),
        "import cycles in src/:{}",
        report(&edges, &rings)
    );
}

/// The checker itself finds a planted ring, and reads the ways Rust names a module.
#[test]
fn the_checker_sees_a_planted_upward_import() {
    let dir = std::env::temp_dir().join(format!("layers-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("api")).unwrap();
    std::fs::create_dir_all(src.join("db")).unwrap();
    let write = |p: &str, t: &str| std::fs::write(src.join(p), t).unwrap();
    write("lib.rs", "pub mod api; pub mod db; pub mod metrics;");
    write(
        "api/mod.rs",
        "pub mod payments;\nuse crate::{db::{self, pool}, metrics};",
    );
    write(
        "api/payments.rs",
        "use super::super::db::Pool; fn f() { super::helper(); }",
    );
    write(
        "db/mod.rs",
        "// crate::api is only a comment\nconst S: &str = \"crate::api\";",
    );
    write(
        "metrics.rs",
        "fn f() { crate::db::x(); }\n#[cfg(test)] mod t { use crate::api::X; }",
    );
    let clean = edges(&src);
    assert!(
        rings(&clean).is_empty(),
        "{}",
        report(&clean, &rings(&clean))
    );
    assert!(clean.contains_key(&(vec!["api".into()], vec!["db".into()])));
    assert!(clean.contains_key(&(vec!["metrics".into()], vec!["db".into()])));
    // Plant one: the low-level metrics module reaches up into the API.
    write(
        "metrics.rs",
        "fn f() { crate::db::x(); let _ = crate::api::payments::Handler; }",
    );
    let planted = edges(&src);
    let found = rings(&planted);
    let text = report(&planted, &found);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(found.len(), 1, "{text}");
    assert!(text.contains("metrics -> api"), "{text}");
    assert!(
        text.contains("src/metrics.rs uses api::payments::Handler"),
        "{text}"
    );
}
