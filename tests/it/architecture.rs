//! The layering rule of docs/ARCHITECTURE.md, checked on the sources of every crate in the
//! workspace: an arrow A → B is any `crate::B` path (or a `super::` path that reaches the
//! crate root) written anywhere in top-level module A's files, doc links included. No
//! top-level module may reach, through arrows, back to itself; and in the `idem` crate every
//! arrow points to a module of the same layer or of a layer below (the table below).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The `idem` crate's layers, bottom first. A module may use modules of its own layer or of
/// the layers before it, never after. A new top-level module must be placed here.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "bottom: the configuration schema and the helpers every layer shares",
        &[
            "duration",
            "errors",
            "failpoint",
            "identity",
            "record",
            "redact",
            "schema",
            "secret",
            "values",
        ],
    ),
    (
        "mechanisms: configuration loading, connectors, HTTP, pagination, normalization, Postgres, the ledger, the page writer",
        &[
            "config",
            "connector",
            "http",
            "ledger",
            "normalize",
            "paginate",
            "store",
            "writer",
        ],
    ),
    (
        "the run: one stream walk, replays, child streams, replicas",
        &["instance", "run"],
    ),
    (
        "the top: the command line, the service, schedules, the console, terminal output",
        &[
            "cli",
            "console",
            "progress",
            "schedule",
            "serve",
            "telemetry",
        ],
    ),
];

#[test]
fn module_arrows_point_down_and_never_loop() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let members = workspace_members(root);
    assert!(
        members.iter().any(|m| m == "."),
        "the workspace should list the idem package itself ('.'), got {members:?}"
    );
    let mut problems = Vec::new();
    for member in &members {
        let src = root.join(member).join("src");
        let arrows = crate_arrows(&src);
        assert!(
            arrows.len() > 1,
            "{}: found {} top-level modules; is this the crate's src folder?",
            src.display(),
            arrows.len()
        );
        for cycle in cycles(&arrows) {
            problems.push(format!(
                "{member}/src: import cycle between top-level modules: {}",
                cycle.join(" → ")
            ));
        }
        if member == "." {
            problems.extend(layer_violations(&arrows));
        }
    }
    assert!(
        problems.is_empty(),
        "the layering rule (docs/ARCHITECTURE.md, \"Layers\") is broken:\n  {}",
        problems.join("\n  ")
    );
}

/// The checker itself finds what it must: grouped and multi-line `use` lists, doc links,
/// `super::` paths that reach the crate root, and cycles longer than two.
#[test]
fn layering_check_sees_grouped_paths_super_paths_and_long_cycles() {
    let text = "use crate::{\n    alpha::Thing,\n    beta::{self, Other},\n};\n/// See [`crate::gamma::f`].\nfn x() { super::delta::go(); }";
    let found = referenced_modules(text, 1);
    assert_eq!(
        found,
        ["alpha", "beta", "delta", "gamma"]
            .into_iter()
            .map(String::from)
            .collect::<BTreeSet<_>>()
    );
    // Inside `a/b.rs` one `super::` is still module `a`, two reach the root.
    assert_eq!(
        referenced_modules("super::sibling::f(); super::super::other::g();", 2),
        BTreeSet::from(["other".to_string()])
    );

    let arrows: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(m, to)| (m.to_string(), to.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(cycles(&arrows), vec![vec!["a", "b", "c", "a"]]);
}

/// `members = [...]` of the root Cargo.toml's `[workspace]`.
fn workspace_members(root: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(root.join("Cargo.toml")).expect("read Cargo.toml");
    let manifest: toml::Table = text.parse().expect("Cargo.toml parses");
    manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
        .expect("Cargo.toml has [workspace] members")
        .iter()
        .map(|m| m.as_str().expect("a member is a path").to_string())
        .collect()
}

/// Top-level module → the other top-level modules its files name.
fn crate_arrows(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files: BTreeMap<String, Vec<(PathBuf, usize)>> = BTreeMap::new();
    for entry in std::fs::read_dir(src).expect("read src") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            // `src/bin/*` are binaries: crates of their own.
            if name != "bin" && path.join("mod.rs").exists() {
                let mut found = Vec::new();
                rust_files(&path, 1, &mut found);
                files.insert(name, found);
            }
        } else if let Some(module) = name.strip_suffix(".rs") {
            if module != "lib" && module != "main" {
                files.insert(module.to_string(), vec![(path.clone(), 1)]);
            }
        }
    }
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    files
        .into_iter()
        .map(|(module, paths)| {
            let mut to = BTreeSet::new();
            for (path, depth) in paths {
                let text = std::fs::read_to_string(&path).expect("read source");
                to.extend(
                    referenced_modules(&text, depth)
                        .into_iter()
                        .filter(|b| *b != module && modules.contains(b)),
                );
            }
            (module, to)
        })
        .collect()
}

/// Every `.rs` file under `dir`, with its module depth below the crate root (`a/mod.rs`
/// and `a/b.rs` are 1 and 2: the number of `super::` that reach the root).
fn rust_files(dir: &Path, depth: usize, out: &mut Vec<(PathBuf, usize)>) {
    for entry in std::fs::read_dir(dir).expect("read module dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, depth + 1, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let is_mod = path.file_name().is_some_and(|n| n == "mod.rs");
            out.push((path, if is_mod { depth } else { depth + 1 }));
        }
    }
}

/// The first segment of every crate-root path in `text`: `crate::B`, `crate::{B, C::x}`
/// (across lines), and `super::` repeated `depth` times.
fn referenced_modules(text: &str, depth: usize) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let root_prefix = "super::".repeat(depth);
    for prefix in ["crate::", root_prefix.as_str()] {
        let mut rest = text;
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().next_back();
            let after = &rest[at + prefix.len()..];
            rest = after;
            // `$crate::`, `xcrate::` or a deeper `super::super::` are other paths.
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$' || c == ':') {
                continue;
            }
            if prefix != "crate::" && after.starts_with("super::") {
                continue;
            }
            if let Some(group) = after.strip_prefix('{') {
                found.extend(group_heads(group));
            } else {
                let name = identifier(after);
                if !name.is_empty() {
                    found.insert(name.to_string());
                }
            }
        }
    }
    found
}

/// The first segments of a `{...}` use-group's items (text starts just after `{`).
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut at_item_start = true;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => at_item_start = true,
            c if at_item_start && (c.is_alphabetic() || c == '_') => {
                heads.push(identifier(&group[i..]).to_string());
                at_item_start = false;
            }
            _ => {}
        }
    }
    heads
}

fn identifier(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// One cycle (first module repeated at the end) for each strongly connected set of
/// modules larger than one.
fn cycles(arrows: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut reported: BTreeSet<String> = BTreeSet::new();
    for start in arrows.keys() {
        if reported.contains(start) {
            continue;
        }
        if let Some(path) = path_back(arrows, start) {
            // The whole strongly connected set is one knot: report it once.
            let ahead = reachable(arrows, start);
            reported.extend(
                ahead
                    .into_iter()
                    .filter(|m| reachable(arrows, m).contains(start.as_str())),
            );
            found.push(path);
        }
    }
    found
}

/// Every module `start` reaches through one or more arrows.
fn reachable(arrows: &BTreeMap<String, BTreeSet<String>>, start: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![start.to_string()];
    while let Some(module) = stack.pop() {
        for next in arrows.get(&module).into_iter().flatten() {
            if seen.insert(next.clone()) {
                stack.push(next.clone());
            }
        }
    }
    seen
}

/// The shortest arrow path from `start` back to `start`, if any (breadth first).
fn path_back(arrows: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(module) = queue.pop_front() {
        for next in arrows.get(module).into_iter().flatten() {
            if next == start {
                let mut path = vec![start.to_string()];
                let mut at = module;
                let mut back = vec![module.to_string()];
                while at != start {
                    at = came_from[at];
                    back.push(at.to_string());
                }
                back.pop();
                path.extend(back.into_iter().rev());
                path.push(start.to_string());
                return Some(path);
            }
            if !came_from.contains_key(next.as_str()) {
                came_from.insert(next, module);
                queue.push_back(next);
            }
        }
    }
    None
}

/// Arrows from a module to a module of a higher layer, and modules no layer places.
fn layer_violations(arrows: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let layer_of = |module: &str| LAYERS.iter().position(|(_, ms)| ms.contains(&module));
    let mut problems = Vec::new();
    for (module, to) in arrows {
        let Some(own) = layer_of(module) else {
            problems.push(format!(
                "src/{module}: a top-level module no layer places; add it to LAYERS in tests/it/architecture.rs and to docs/ARCHITECTURE.md"
            ));
            continue;
        };
        for target in to {
            if let Some(theirs) = layer_of(target) {
                if theirs > own {
                    problems.push(format!(
                        "{module} ({}) uses {target} ({}), a layer above it",
                        LAYERS[own].0, LAYERS[theirs].0
                    ));
                }
            }
        }
    }
    for (_, modules) in LAYERS {
        for module in *modules {
            if !arrows.contains_key(*module) {
                problems.push(format!(
                    "LAYERS names '{module}', which is not a top-level module of src/"
                ));
            }
        }
    }
    problems
}
