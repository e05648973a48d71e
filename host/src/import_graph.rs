//! The crate's import graph, file by file, read from the source: every `use` (braces
//! expanded) and every inline `crate::…`/`super::…` path, resolved to the file of the longest
//! module prefix it names. A test keeps it free of cycles, a child importing its parent's items
//! included (a parent's `mod.rs` declares and re-exports; it holds no items its children use):
//! CI fails on the first one, naming it.
//!
//! `cargo test -p wanserve --lib import_graph -- --ignored --nocapture` prints the map.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`["jobs", "workers", "run"]`, `[]` for the crate root) → its file's text.
type Sources = BTreeMap<Vec<String>, String>;

fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs");
        if !matches!(stem, "mod" | "lib" | "main") {
            parts.push(stem.to_string());
        }
    }
    parts
}

fn read_sources(root: &Path) -> Sources {
    let mut sources = Sources::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs")
                // main.rs is the binary; this file's text holds made-up sources for its tests.
                && path.file_name().is_some_and(|n| n != "main.rs" && n != "import_graph.rs")
                && let (Ok(relative), Ok(text)) =
                    (path.strip_prefix(root), std::fs::read_to_string(&path))
            {
                sources.insert(module_path(relative), text);
            }
        }
    }
    sources
}

/// The text without comments (line comments and doc comments; block comments are not used)
/// and without an inline test module at the end (its `super` is the file itself).
fn code(text: &str) -> String {
    let inline_tests = regex::Regex::new(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{").expect("pattern");
    let text = match inline_tests.find(text) {
        Some(m) => &text[..m.start()],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(at) => &l[..at],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        return vec![tree.to_string()];
    };
    let prefix = &tree[..open];
    let inner = tree[open + 1..].trim_end().trim_end_matches('}');
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .flat_map(expand)
        .map(|p| format!("{prefix}{p}"))
        .collect()
}

/// Every path a file names: its `use` trees and its inline `crate::`/`super::` paths.
fn paths(text: &str) -> Vec<String> {
    let code = code(text);
    let mut found = Vec::new();
    let use_statement = regex::Regex::new(r"(?s)\buse\s+([^;]+);").expect("pattern");
    for m in use_statement.captures_iter(&code) {
        found.extend(expand(&m[1].split_whitespace().collect::<String>()));
    }
    let inline =
        regex::Regex::new(r"\b(?:crate|super)(?:::[A-Za-z_][A-Za-z0-9_]*)+").expect("pattern");
    found.extend(inline.find_iter(&code).map(|m| m.as_str().to_string()));
    found
}

/// The module `path` (as written in `from`) lands in: the longest prefix that is a file.
fn resolve(sources: &Sources, from: &[String], path: &str) -> Option<Vec<String>> {
    let mut segments: Vec<&str> = path.split("::").map(str::trim).collect();
    let mut base: Vec<String> = match segments.first().copied() {
        Some("crate") => {
            segments.remove(0);
            Vec::new()
        }
        Some("super") | Some("self") => {
            let mut base = from.to_vec();
            while let Some(&first) = segments.first() {
                match first {
                    "super" => {
                        base.pop();
                    }
                    "self" => {}
                    _ => break,
                }
                segments.remove(0);
            }
            base
        }
        // A child module of this one (`use progress::RunningJobs` beside `mod progress`).
        Some(first) if sources.contains_key(&[from, &[first.to_string()]].concat()) => {
            from.to_vec()
        }
        _ => return None,
    };
    let mut best = sources.contains_key(&base).then(|| base.clone());
    for segment in segments {
        base.push(segment.split(" as ").next().unwrap_or(segment).to_string());
        if sources.contains_key(&base) {
            best = Some(base.clone());
        }
    }
    best
}

/// File → the files it imports (never itself).
fn graph(sources: &Sources) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    sources
        .iter()
        .map(|(module, text)| {
            let targets = paths(text)
                .iter()
                .filter_map(|p| resolve(sources, module, p))
                .filter(|t| t != module)
                .collect();
            (module.clone(), targets)
        })
        .collect()
}

/// One cycle, as the files around it, if there is any.
fn find_cycle(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Option<Vec<String>> {
    fn visit(
        node: &Vec<String>,
        graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
    ) -> Option<Vec<String>> {
        state.insert(node.clone(), 1);
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|n| n == next).unwrap_or(0);
                    let mut cycle: Vec<String> = stack[at..].iter().map(|m| name(m)).collect();
                    cycle.push(name(next));
                    return Some(cycle);
                }
                0 => {
                    if let Some(cycle) = visit(next, graph, state, stack) {
                        return Some(cycle);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if state.get(node).copied().unwrap_or(0) == 0
            && let Some(cycle) = visit(node, graph, &mut state, &mut Vec::new())
        {
            return Some(cycle);
        }
    }
    None
}

fn name(module: &[String]) -> String {
    if module.is_empty() {
        "crate".into()
    } else {
        module.join("::")
    }
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let sources = read_sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(sources.len() > 40, "read only {} files", sources.len());
    let graph = graph(&sources);
    let edges: usize = graph.values().map(BTreeSet::len).sum();
    assert!(
        edges > 100,
        "found only {edges} imports: the reader is broken"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle: {}", cycle.join(" → "));
    }
}

#[test]
fn a_cycle_through_a_child_or_a_braced_use_is_found() {
    let sources: Sources = [
        (vec![], "mod jobs;\nmod plugins;".to_string()),
        (
            vec!["jobs".to_string()],
            "mod workers;\nuse workers::Shared;\n".to_string(),
        ),
        (
            vec!["jobs".to_string(), "workers".to_string()],
            "use crate::{plugins::Host, ids};\n// use crate::jobs::Nothing;\n".to_string(),
        ),
        (
            vec!["plugins".to_string()],
            "fn f() { crate::jobs::now_ms(); }".to_string(),
        ),
    ]
    .into_iter()
    .collect();
    let cycle = find_cycle(&graph(&sources)).expect("the cycle");
    assert!(
        cycle.contains(&"plugins".to_string()) && cycle.contains(&"jobs".to_string()),
        "{cycle:?}"
    );
    let acyclic: Sources = sources
        .into_iter()
        .map(|(m, t)| (m, t.replace("crate::jobs::now_ms()", "1")))
        .collect();
    assert_eq!(find_cycle(&graph(&acyclic)), None);
    // A child using an item of its parent's mod.rs, while the parent imports the child.
    let parent_child: Sources = [
        (vec![], "mod server;".to_string()),
        (
            vec!["server".to_string()],
            "mod api;\npub struct AppState;\npub use api::router;\n".to_string(),
        ),
        (
            vec!["server".to_string(), "api".to_string()],
            "use super::AppState;\n".to_string(),
        ),
    ]
    .into_iter()
    .collect();
    let cycle = find_cycle(&graph(&parent_child)).expect("the parent-child cycle");
    assert!(cycle.contains(&"server::api".to_string()), "{cycle:?}");
}

/// What each top-level module may not import (ARCHITECTURE.md, "Layers"): a layer below never
/// reaches one above it, and the leaves import no layer at all. (The client may name
/// `pipeline::step_cache::CacheMode`: its `--cache` offers the names the engine takes.)
const MAY_NOT_TOUCH: &[(&str, &[&str])] = &[
    (
        "tensor",
        &[
            "backend", "pipeline", "model", "engine", "jobs", "server", "plugins", "video",
            "storage", "client",
        ],
    ),
    (
        "backend",
        &[
            "pipeline", "engine", "jobs", "server", "plugins", "video", "storage", "client",
        ],
    ),
    (
        "model",
        &[
            "pipeline", "backend", "engine", "jobs", "server", "plugins", "video", "storage",
            "client",
        ],
    ),
    (
        "pipeline",
        &[
            "engine", "jobs", "server", "plugins", "video", "storage", "client",
        ],
    ),
    (
        "video",
        &[
            "pipeline", "backend", "model", "engine", "jobs", "server", "plugins", "storage",
            "client",
        ],
    ),
    (
        "engine",
        &["jobs", "server", "plugins", "storage", "client"],
    ),
    (
        "plugins",
        &[
            "pipeline", "backend", "model", "engine", "jobs", "server", "video", "client",
        ],
    ),
    (
        "storage",
        &[
            "pipeline", "backend", "model", "engine", "jobs", "server", "plugins", "video",
            "client",
        ],
    ),
    ("jobs", &["server", "client"]),
    ("server", &["backend", "video", "client"]),
    (
        "client",
        &[
            "backend", "model", "engine", "jobs", "server", "plugins", "video", "storage",
        ],
    ),
    (
        "ids",
        &[
            "backend", "pipeline", "model", "engine", "jobs", "server", "plugins", "video",
            "storage", "client",
        ],
    ),
    (
        "wire",
        &[
            "backend", "pipeline", "model", "engine", "jobs", "server", "plugins", "video",
            "storage", "client",
        ],
    ),
    (
        "sync",
        &[
            "backend", "pipeline", "model", "engine", "jobs", "server", "plugins", "video",
            "storage", "client",
        ],
    ),
    (
        "error_chain",
        &[
            "backend", "pipeline", "model", "engine", "jobs", "server", "plugins", "video",
            "storage", "client",
        ],
    ),
];

#[test]
fn no_layer_imports_one_it_may_not_touch() {
    let sources = read_sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let mut broken = Vec::new();
    for (module, targets) in graph(&sources) {
        let Some(top) = module.first() else { continue };
        let Some((_, forbidden)) = MAY_NOT_TOUCH.iter().find(|(m, _)| m == top) else {
            continue;
        };
        for target in targets {
            if target
                .first()
                .is_some_and(|t| forbidden.contains(&t.as_str()))
            {
                broken.push(format!("{} -> {}", name(&module), name(&target)));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "imports ARCHITECTURE.md rules out: {broken:#?}"
    );
}

#[test]
#[ignore = "prints the map: cargo test -p wanserve --lib import_graph -- --ignored --nocapture"]
fn print_the_import_map() {
    let sources = read_sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    for (module, targets) in graph(&sources) {
        let targets: Vec<String> = targets.iter().map(|t| name(t)).collect();
        println!("{} -> {}", name(&module), targets.join(", "));
    }
}
