//! The module layering fence: a file under `src/` may import only modules of
//! its own layer or a lower one, and no two top-level modules, nor two
//! files, may import each other in a circle.
//!
//! Why: the leaves (the clock, addresses, the generated protos, the escaping
//! of untrusted text, systemd, the data model) sit under everything, so they
//! can be read, tested and reused without the rest; the settings sit on the
//! leaves, the infrastructure on the settings, the store on that, the tasks
//! and the agent on the store, the server on the tasks, and the commands on
//! top wire it all. An import that reaches up a layer, or two modules that
//! lean on each other, is how a crate grows into one knot that can only be
//! understood, tested and changed whole. This test catches such an import
//! the day it is written, not the day someone has to untie the knot.
//!
//! The table [`LAYERS`] mirrors README's "How the code is laid out": a new
//! top-level module fails this test until it is given a layer there.
//!
//! How: the sources are read as text (std only, no build), comments and
//! string literals are dropped, and every path that starts with `crate::`,
//! `super::` or `self::`, or with the name of one of the file's child
//! modules, is collected, `use` trees included. Test modules inside `src/`
//! count too: a unit test that reaches up a layer still ties the layers
//! together. Items defined in `src/lib.rs` itself (`crate::secret_random`)
//! belong to no layer and may be used from anywhere. Not read: `src/main.rs`
//! (the binary, above everything) and `src/proto/gen/` (generated code).

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fmt,
    path::{Component, Path},
};

/// The layers, lowest first: a module's layer is its index here. A file may
/// import modules of its own layer or lower ones. Mirrors README's "How the
/// code is laid out"; a new top-level module goes in both. Names that do not
/// exist (yet) are harmless.
const LAYERS: &[(&str, &[&str])] = &[
    // 0: they need nothing above them, so anything may use them.
    (
        "leaves",
        &[
            "clock",
            "net",
            "proto",
            "untrusted",
            "systemd",
            "model",
            "labels",
            "selector",
            "schedule",
            "defects",
        ],
    ),
    // 1: the words the rest is configured and authorized in.
    ("settings and words", &["config", "auth"]),
    // 2: machinery that knows settings, but not tasks or callers.
    (
        "infrastructure",
        &[
            "backoff",
            "tls",
            "logging",
            "metrics",
            "process",
            "remote_cmd",
            "shutdown",
        ],
    ),
    // 3: what survives a restart.
    ("durable state", &["store"]),
    // 4: the task core and the agent, both built on the store.
    ("core and agent", &["tasks", "agent"]),
    // 5: the gRPC services over the core.
    ("transport", &["server"]),
    // 6: what the command line runs, wiring everything below.
    (
        "commands",
        &[
            "app", "daemon", "cli", "cmd", "probe", "ctl", "manual", "client", "web", "soak",
        ],
    ),
];

/// Imports forbidden although the layer order allows them: (importer,
/// imported, why). The agent is the far end of the wire from the server;
/// neither is built on the other. (`agent` -> `server` reaches up a layer,
/// so the order already forbids it.)
const FORBIDDEN: &[(&str, &str, &str)] = &[(
    "server",
    "agent",
    "the server and the agent are the two ends of the wire; neither is built on the other",
)];

/// Every file under `src/` keeps to the layers, and no modules or files
/// import each other in a circle.
#[test]
fn src_keeps_its_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = read_sources(root);
    assert!(
        sources.iter().any(|(path, _)| path == "src/lib.rs"),
        "no src/lib.rs under {}: the layering test reads the wrong tree",
        root.display()
    );
    let files: Vec<(&str, &str)> = sources
        .iter()
        .map(|(path, text)| (path.as_str(), text.as_str()))
        .collect();
    let violations = scan(&files);
    assert!(violations.is_empty(), "{}", report(&violations));
}

/// The checker itself: on a made-up crate, it reports the imports that break
/// the fence, and neither comments, string literals, nor `super` in a test
/// module, nor a parent module and its children using each other.
#[test]
fn the_fence_catches_what_it_should_and_nothing_else() {
    let files: &[(&str, &str)] = &[
        ("src/lib.rs", "pub mod config;\npub fn secret_random() {}\n"),
        (
            "src/config/mod.rs",
            r##"//! Prose may say crate::server::State.
/// So may a doc comment: [`State`](crate::server::State).
/* A block comment, /* nested */ with crate::server::State. */
use crate::server::State;
use crate::{
    clock::now_ms,
    store::{self, Write},
};
const TEXT: &str = "crate::server::State \" crate::server";
const RAW: &str = r#"crate::server::State"#;
const QUOTE: char = '"';
fn token() -> [u8; 8] {
    let label: &'static str = "x";
    crate::secret_random::<8>()
}
pub mod load;
"##,
        ),
        ("src/config/load.rs", "use super::Config;\n"),
        ("src/clock.rs", "mod tests {\n    use super::*;\n}\n"),
        ("src/store/mod.rs", "use crate::tasks::Task;\n"),
        ("src/tasks/mod.rs", "use crate::store::Write;\n"),
        (
            "src/tasks/queue.rs",
            "mod tests {\n    use super::hub::Hub;\n}\npub fn after() {\n    super::cursor::start();\n}\n",
        ),
        ("src/tasks/cursor.rs", "use super::queue::after;\n"),
        ("src/tasks/hub.rs", "use super::queue::after;\n"),
        (
            "src/server/mod.rs",
            "use contact::Service;\nuse crate::tasks::Task;\n",
        ),
        (
            "src/server/contact.rs",
            "use super::{State, gate::Gate};\nfn go() {\n    crate::agent::run();\n}\n",
        ),
        (
            "src/server/gate.rs",
            "use crate::server::listener::Listener;\n",
        ),
        ("src/server/listener.rs", "use super::gate::Gate;\n"),
        ("src/agent/mod.rs", "use crate::store::Write;\n"),
        ("src/widget.rs", "use crate::clock::now_ms;\n"),
        // `super::super` climbs two modules: from sqlite to the crate root,
        // but from sqlite's inline `mod inner` only to `store`.
        (
            "src/store/sqlite.rs",
            "const B: &[u8] = b\"crate::cli\";\nconst Q: char = '\"';\nfn f() {\n    self::g();\n    let _ = super::super::cli::Args;\n}\nmod inner {\n    use super::super::tasks::Task;\n}\n",
        ),
        ("src/cli.rs", ""),
    ];
    let violations = scan(files);
    let texts: Vec<String> = violations.iter().map(ToString::to_string).collect();
    let all = texts.join("\n");
    let expected: &[(Rule, &str)] = &[
        (Rule::NotInTable, "src/widget.rs: top-level module widget"),
        (
            Rule::Layer,
            "src/config/mod.rs:4: config (layer 1) imports server (layer 5)",
        ),
        (
            Rule::Layer,
            "src/config/mod.rs:7: config (layer 1) imports store (layer 3)",
        ),
        (
            Rule::Layer,
            "src/store/mod.rs:1: store (layer 3) imports tasks (layer 4)",
        ),
        (
            Rule::Layer,
            "src/store/sqlite.rs:5: store (layer 3) imports cli (layer 6)",
        ),
        (
            Rule::Forbidden,
            "src/server/contact.rs:3: server imports agent",
        ),
        (
            Rule::ModuleCircle,
            "store -> tasks -> store\n    store -> tasks at src/store/mod.rs:1\n    tasks -> store at src/tasks/mod.rs:1",
        ),
        (
            Rule::FileCircle,
            "src/store/mod.rs -> src/tasks/mod.rs -> src/store/mod.rs",
        ),
        (
            Rule::FileCircle,
            "src/tasks/cursor.rs -> src/tasks/queue.rs -> src/tasks/cursor.rs\n    src/tasks/cursor.rs:1 imports src/tasks/queue.rs\n    src/tasks/queue.rs:5 imports src/tasks/cursor.rs",
        ),
        (
            Rule::FileCircle,
            "src/server/gate.rs -> src/server/listener.rs -> src/server/gate.rs",
        ),
    ];
    for (rule, text) in expected {
        assert!(
            violations
                .iter()
                .any(|v| v.rule == *rule && v.text.contains(text)),
            "expected a {rule:?} violation containing {text:?}; got:\n{all}"
        );
    }
    assert_eq!(
        violations.len(),
        expected.len(),
        "unexpected violations besides those expected:\n{all}"
    );
    // Comments and strings name `crate::server` on lines 1-3 and 9-10: only
    // line 4's `use` counts.
    let server_lines = texts
        .iter()
        .filter(|t| t.contains("imports server"))
        .count();
    assert_eq!(server_lines, 1, "{all}");
    // `super` inside queue.rs's `mod tests` is queue itself, not `tasks`, so
    // its `super::hub` is no edge to hub.rs, and hub.rs <-> queue.rs is not
    // reported; a parent and its children (server/mod.rs <-> contact.rs,
    // config/mod.rs <-> load.rs) are one module, no circle.
    for not_expected in [
        "src/tasks/hub.rs ->",
        "src/server/contact.rs ->",
        "src/config/load.rs ->",
        "-> src/tasks/hub.rs",
    ] {
        assert!(!all.contains(not_expected), "{not_expected:?} in:\n{all}");
    }
}

/// Which fence an import breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rule {
    /// A top-level module that [`LAYERS`] does not list.
    NotInTable,
    /// An import that reaches up a layer.
    Layer,
    /// An import [`FORBIDDEN`] forbids.
    Forbidden,
    /// Top-level modules that import each other in a circle.
    ModuleCircle,
    /// Files that import each other in a circle.
    FileCircle,
}

/// One broken fence, said the way it is printed.
#[derive(Debug)]
struct Violation {
    rule: Rule,
    text: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The failure message: what the fence is, where its table lives, and every
/// violation.
fn report(violations: &[Violation]) -> String {
    let mut text = format!(
        "contactd's module layering fence (tests/it/layers.rs) is broken in {} place(s).\n\
         A file under src/ may import only modules of its own layer or a lower one (the \
         layers are the table LAYERS in tests/it/layers.rs, mirroring README's \"How the \
         code is laid out\"), and no top-level modules, nor files, may import each other \
         in a circle. Move the code to the layer it belongs in; or, if the layering itself \
         changed, change LAYERS and README together.\n",
        violations.len()
    );
    for violation in violations {
        text.push_str("\n- ");
        text.push_str(&violation.text);
    }
    text
}

/// The `*.rs` files under `root/src`, as (`src/…` path, text), sorted by
/// path; without `src/main.rs` and the generated `src/proto/gen/`.
fn read_sources(root: &Path) -> Vec<(String, String)> {
    let mut sources = Vec::new();
    let mut dirs = vec![root.join("src")];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let path = entry
                .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
                .path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let relative: Vec<String> = path
                .strip_prefix(root)
                .expect("a file found under root is under root")
                .components()
                .filter_map(|c| match c {
                    Component::Normal(part) => Some(part.to_string_lossy().into_owned()),
                    _ => None,
                })
                .collect();
            let relative = relative.join("/");
            if relative == "src/main.rs" || relative.starts_with("src/proto/gen/") {
                continue;
            }
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            sources.push((relative, text));
        }
    }
    sources.sort();
    sources
}

/// The module path of a source file: `src/a.rs` and `src/a/mod.rs` are `a`,
/// `src/a/b.rs` is `a::b`, `src/lib.rs` is the crate root (empty).
fn module_of(path: &str) -> Vec<String> {
    let inner = path.strip_prefix("src/").unwrap_or(path);
    let inner = inner.strip_suffix(".rs").unwrap_or(inner);
    let mut module: Vec<String> = inner.split('/').map(str::to_owned).collect();
    if module.last().is_some_and(|last| last == "mod") || module == ["lib"] {
        module.pop();
    }
    module
}

/// The layer of a top-level module, `None` when the table does not list it.
fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

/// The layers, numbered: `0 leaves, 1 settings and words, …`.
fn layer_names() -> String {
    let names: Vec<String> = LAYERS
        .iter()
        .enumerate()
        .map(|(layer, (name, _))| format!("{layer} {name}"))
        .collect();
    names.join(", ")
}

/// An edge of an import graph, with the first place it happens.
type Edges = BTreeMap<(usize, usize), (usize, usize)>;

/// Checks the files, (`src/…` path, text), against the fence; pure, so a test
/// can feed it a made-up crate. Returns every violation, sorted by rule.
fn scan(files: &[(&str, &str)]) -> Vec<Violation> {
    // Sorted by path, so circles and reports come out the same every time.
    let mut files = files.to_vec();
    files.sort_unstable();
    let modules: Vec<Vec<String>> = files.iter().map(|(path, _)| module_of(path)).collect();
    let file_of: BTreeMap<&[String], usize> = modules
        .iter()
        .enumerate()
        .map(|(index, module)| (module.as_slice(), index))
        .collect();
    let top_level: Vec<&str> = modules
        .iter()
        .filter_map(|module| module.first().map(String::as_str))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let top_index = |name: &str| top_level.binary_search(&name).ok();

    let mut violations: Vec<Violation> = top_level
        .iter()
        .filter(|name| layer_of(name).is_none())
        .map(|name| {
            // Named after the module's own file (`x.rs`, `x/mod.rs`) if given.
            let file = (modules.iter().position(|module| *module == [*name]))
                .or_else(|| {
                    modules
                        .iter()
                        .position(|module| module.first().is_some_and(|first| first == name))
                })
                .map_or("src/", |file| files[file].0);
            Violation {
                rule: Rule::NotInTable,
                text: format!(
                    "{file}: top-level module {name} is in no layer: add it to LAYERS in \
                     tests/it/layers.rs (and to README's \"How the code is laid out\"); \
                     the layers are {}",
                    layer_names()
                ),
            }
        })
        .collect();

    // (from, to) -> (file, line) of the first import, for both graphs.
    let mut module_edges = Edges::new();
    let mut file_edges = Edges::new();
    for (file, (path, text)) in files.iter().enumerate() {
        let module = &modules[file];
        let children: BTreeSet<&str> = modules
            .iter()
            .filter(|other| other.len() == module.len() + 1 && other.starts_with(module))
            .filter_map(|other| other.last().map(String::as_str))
            .collect();
        let from_top = module.first().map(String::as_str);
        let mut reported = BTreeSet::new();
        for reference in references(module, &children, text) {
            // A path into a module resolves to the file of its longest
            // prefix that has one (`store::sqlite::Sqlite`: store/sqlite.rs);
            // a path whose first name is no module is an item of lib.rs.
            let target = (1..=reference.path.len())
                .rev()
                .find_map(|len| file_of.get(&reference.path[..len]).copied());
            let Some(target) = target else { continue };
            if target != file && !parent_and_child(module, &modules[target]) {
                file_edges
                    .entry((file, target))
                    .or_insert((file, reference.line));
            }
            let (Some(from), Some(to)) = (from_top, modules[target].first()) else {
                continue;
            };
            if from == to {
                continue;
            }
            if let (Some(a), Some(b)) = (top_index(from), top_index(to)) {
                module_edges.entry((a, b)).or_insert((file, reference.line));
            }
            if !reported.insert((reference.line, to.as_str())) {
                continue;
            }
            let line = reference.line;
            if let Some((_, _, why)) = FORBIDDEN.iter().find(|(a, b, _)| *a == from && b == to) {
                violations.push(Violation {
                    rule: Rule::Forbidden,
                    text: format!("{path}:{line}: {from} imports {to}: {why}"),
                });
            }
            if let (Some(from_layer), Some(to_layer)) = (layer_of(from), layer_of(to))
                && to_layer > from_layer
            {
                violations.push(Violation {
                    rule: Rule::Layer,
                    text: format!(
                        "{path}:{line}: {from} (layer {from_layer}) imports {to} \
                         (layer {to_layer}): a lower layer may not import a higher one"
                    ),
                });
            }
        }
    }

    let file_names: Vec<&str> = files.iter().map(|(path, _)| *path).collect();
    violations.extend(circle_violations(
        Rule::ModuleCircle,
        "top-level modules import each other in a circle",
        &top_level,
        &module_edges,
        |a, b, (file, line)| format!("{a} -> {b} at {}:{line}", file_names[file]),
    ));
    violations.extend(circle_violations(
        Rule::FileCircle,
        "files import each other in a circle",
        &file_names,
        &file_edges,
        |a, b, (_, line)| format!("{a}:{line} imports {b}"),
    ));
    // Stable sort: within a rule, in file order, then line order.
    violations.sort_by_key(|v| v.rule);
    violations
}

/// Whether one module is the other's direct child (`server` and
/// `server::contact`): Rust lets a child see its parent's private items, so
/// the two are one module, and their using each other is no circle.
fn parent_and_child(a: &[String], b: &[String]) -> bool {
    (a.len() + 1 == b.len() && b.starts_with(a)) || (b.len() + 1 == a.len() && a.starts_with(b))
}

/// A violation of `rule` per circle of the graph of `edges` between nodes
/// called `names`: the circle, then each of its edges as `step` says it
/// (from, to, and the (file, line) where it happens).
fn circle_violations(
    rule: Rule,
    what: &str,
    names: &[&str],
    edges: &Edges,
    step: impl Fn(&str, &str, (usize, usize)) -> String,
) -> Vec<Violation> {
    circles(names.len(), edges)
        .into_iter()
        .map(|circle| {
            let around: Vec<&str> = circle
                .iter()
                .chain(circle.first())
                .map(|&n| names[n])
                .collect();
            let lines: Vec<String> = std::iter::once(format!("{what}: {}", around.join(" -> ")))
                .chain(circle_edges(&circle).map(|(a, b)| step(names[a], names[b], edges[&(a, b)])))
                .collect();
            Violation {
                rule,
                text: lines.join("\n    "),
            }
        })
        .collect()
}

/// The edges of a circle `[a, b, c]`: a -> b, b -> c, c -> a.
fn circle_edges(circle: &[usize]) -> impl Iterator<Item = (usize, usize)> + '_ {
    circle
        .iter()
        .zip(circle.iter().cycle().skip(1))
        .map(|(&a, &b)| (a, b))
}

/// Circles in a directed graph without self-edges: for every strongly
/// connected component, the shortest circle through each of its nodes, each
/// circle once, starting at its smallest node. The graphs are small (a few
/// dozen nodes), so plain breadth-first searches from every node will do.
fn circles(nodes: usize, edges: &Edges) -> Vec<Vec<usize>> {
    let mut next = vec![Vec::new(); nodes];
    for &(a, b) in edges.keys() {
        next[a].push(b);
    }
    let reach: Vec<Vec<bool>> = (0..nodes).map(|start| reachable(&next, start)).collect();
    let mut found = BTreeSet::new();
    for start in 0..nodes {
        let in_component = |node: usize| reach[start][node] && reach[node][start];
        // Breadth-first from `start`, inside its component, until a node
        // with an edge back to `start`: the shortest circle through it.
        let mut came_from: Vec<Option<usize>> = vec![None; nodes];
        let mut queue = VecDeque::from([start]);
        let mut seen = vec![false; nodes];
        seen[start] = true;
        while let Some(node) = queue.pop_front() {
            if next[node].contains(&start) {
                let mut circle = vec![node];
                let mut at = node;
                while let Some(previous) = came_from[at] {
                    circle.push(previous);
                    at = previous;
                }
                circle.reverse();
                let smallest = circle
                    .iter()
                    .enumerate()
                    .min_by_key(|&(_, &n)| n)
                    .map_or(0, |(i, _)| i);
                circle.rotate_left(smallest);
                found.insert(circle);
                break;
            }
            for &after in &next[node] {
                if !seen[after] && in_component(after) {
                    seen[after] = true;
                    came_from[after] = Some(node);
                    queue.push_back(after);
                }
            }
        }
    }
    found.into_iter().collect()
}

/// Which nodes a breadth-first search from `start` reaches (`start` itself
/// only through a circle).
fn reachable(next: &[Vec<usize>], start: usize) -> Vec<bool> {
    let mut reached = vec![false; next.len()];
    let mut queue = VecDeque::from([start]);
    while let Some(node) = queue.pop_front() {
        for &after in &next[node] {
            if !reached[after] {
                reached[after] = true;
                queue.push_back(after);
            }
        }
    }
    reached
}

/// A path into the crate that a file uses: absolute from the crate root
/// (`["store", "sqlite", "Sqlite"]`), with the line of its last name.
#[derive(Debug)]
struct Reference {
    line: usize,
    path: Vec<String>,
}

/// The paths into the crate that the code of a file uses, resolved from its
/// module: those that start with `crate::`, `self::`, `super::` (relative to
/// the inline module they are in, such as `mod tests`), and, outside inline
/// modules, with the name of one of the file's `children` modules. Each leaf
/// of a `use` tree is one path.
fn references(module: &[String], children: &BTreeSet<&str>, text: &str) -> Vec<Reference> {
    let tokens = tokenize(text);
    let mut found = Vec::new();
    // The inline modules (`mod tests {`) around the current token, with the
    // brace depth their `{` opened at.
    let mut inline: Vec<(&str, usize)> = Vec::new();
    let mut depth = 0;
    let mut i = 0;
    while i < tokens.len() {
        // A path starts here unless it continues one (`a::self::b`).
        let starts_path = matches!(kind(&tokens, i + 1), Some(Kind::PathSep))
            && !matches!(
                i.checked_sub(1).and_then(|p| kind(&tokens, p)),
                Some(Kind::PathSep)
            );
        match &tokens[i].kind {
            Kind::Punct('{') => depth += 1,
            Kind::Punct('}') => {
                depth -= usize::from(depth > 0);
                while inline.last().is_some_and(|&(_, opened)| opened == depth) {
                    inline.pop();
                }
            }
            Kind::Ident(word) if word == "mod" => {
                if let (Some(Kind::Ident(name)), Some(Kind::Punct('{'))) =
                    (kind(&tokens, i + 1), kind(&tokens, i + 2))
                {
                    inline.push((name, depth));
                    // On to the `{`, which opens the depth recorded above.
                    i += 2;
                    continue;
                }
            }
            Kind::Ident(word) if starts_path => {
                let mut current = module.to_vec();
                current.extend(inline.iter().map(|&(name, _)| name.to_owned()));
                let base = match word.as_str() {
                    "crate" => Some(Vec::new()),
                    "self" => Some(current),
                    "super" => {
                        // `super::super::…`: one module up per `super`.
                        let mut base = Some(current);
                        let mut at = i;
                        while matches!(kind(&tokens, at), Some(Kind::Ident(w)) if w == "super")
                            && matches!(kind(&tokens, at + 1), Some(Kind::PathSep))
                        {
                            base = base.and_then(|mut up| up.pop().map(|_| up));
                            at += 2;
                        }
                        i = at - 2;
                        base
                    }
                    child if inline.is_empty() && children.contains(child) => {
                        // The child's name is the path's first segment: parse
                        // from it, not from after its `::`.
                        let before = i;
                        parse_tree(&tokens, &mut i, module.to_vec(), &mut found);
                        i = i.max(before + 1);
                        continue;
                    }
                    _ => None,
                };
                i += 2;
                if let Some(base) = base {
                    parse_tree(&tokens, &mut i, base, &mut found);
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

/// Parses a path or `use` tree from `tokens[*i]`, after its root (`crate::`)
/// and `prefix`, the module that root is. Pushes a [`Reference`] per leaf
/// (`a::{b, c::d}`: `a::b` and `a::c::d`; `self` and `*`: the module itself)
/// and leaves `*i` after the tree. A path in code ends at its last name
/// (`crate::f::<8>()`: `f`).
fn parse_tree(tokens: &[Token], i: &mut usize, prefix: Vec<String>, found: &mut Vec<Reference>) {
    let mut path = prefix;
    while let Some(token) = tokens.get(*i) {
        match &token.kind {
            Kind::Punct('{') => {
                *i += 1;
                while let Some(inner) = tokens.get(*i) {
                    match inner.kind {
                        Kind::Punct('}') => {
                            *i += 1;
                            return;
                        }
                        Kind::Punct(',') => *i += 1,
                        _ => {
                            let before = *i;
                            parse_tree(tokens, i, path.clone(), found);
                            // Something unexpected in the braces: step over it.
                            *i = (*i).max(before + 1);
                        }
                    }
                }
                return;
            }
            Kind::Punct('*') => {
                *i += 1;
                found.push(Reference {
                    line: token.line,
                    path,
                });
                return;
            }
            Kind::Ident(name) => {
                *i += 1;
                if name != "self" {
                    path.push(name.clone());
                    let continues = matches!(
                        kind(tokens, *i + 1),
                        Some(Kind::Ident(_) | Kind::Punct('{' | '*'))
                    );
                    if continues && matches!(kind(tokens, *i), Some(Kind::PathSep)) {
                        *i += 1;
                        continue;
                    }
                }
                // `use a::b as c;`: the alias names nothing of the crate.
                if matches!(kind(tokens, *i), Some(Kind::Ident(w)) if w == "as") {
                    *i += 2;
                }
                found.push(Reference {
                    line: token.line,
                    path,
                });
                return;
            }
            _ => return,
        }
    }
}

/// The kind of `tokens[i]`, if there is one.
fn kind(tokens: &[Token], i: usize) -> Option<&Kind> {
    tokens.get(i).map(|token| &token.kind)
}

/// A token of Rust code, as far as paths need: comments, whitespace,
/// literals and lifetimes are dropped.
#[derive(Debug)]
struct Token {
    kind: Kind,
    line: usize,
}

#[derive(Debug)]
enum Kind {
    /// A name or keyword (`r#type` is `type`).
    Ident(String),
    /// `::`.
    PathSep,
    /// Any other punctuation character.
    Punct(char),
}

fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_'
}

fn is_ident_continue(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The code of `text` as tokens, without comments (line, block, nested
/// block, doc) and without string, byte string, raw string and character
/// literals, which may well mention `crate::server` in prose.
fn tokenize(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while let Some(&c) = chars.get(i) {
        let next = chars.get(i + 1).copied();
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && next == Some('/') {
            while chars.get(i).is_some_and(|&c| c != '\n') {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            i = skip_block_comment(&chars, i, &mut line);
        } else if c == '"' {
            i = skip_string(&chars, i + 1, &mut line);
        } else if c == '\'' {
            i = skip_quote(&chars, i);
        } else if is_ident_start(c) {
            if let Some(end) = skip_prefixed_literal(&chars, i, &mut line) {
                i = end;
                continue;
            }
            // `r#type` is the name `type`.
            if c == 'r' && next == Some('#') && chars.get(i + 2).is_some_and(|&c| is_ident_start(c))
            {
                i += 2;
            }
            let start = i;
            while chars.get(i).is_some_and(|&c| is_ident_continue(c)) {
                i += 1;
            }
            tokens.push(Token {
                kind: Kind::Ident(chars[start..i].iter().collect()),
                line,
            });
        } else if c.is_ascii_digit() {
            // A number, suffix and all (`1_000u64`, `0x1F`).
            while chars.get(i).is_some_and(|&c| is_ident_continue(c)) {
                i += 1;
            }
        } else if c == ':' && next == Some(':') {
            tokens.push(Token {
                kind: Kind::PathSep,
                line,
            });
            i += 2;
        } else {
            tokens.push(Token {
                kind: Kind::Punct(c),
                line,
            });
            i += 1;
        }
    }
    tokens
}

/// After the block comment that opens at `chars[start]` (`/*`), counting its
/// lines; block comments nest.
fn skip_block_comment(chars: &[char], start: usize, line: &mut usize) -> usize {
    let mut depth = 0;
    let mut i = start;
    while let Some(&c) = chars.get(i) {
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('*') {
            depth += 1;
            i += 2;
        } else if c == '*' && next == Some('/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            *line += usize::from(c == '\n');
            i += 1;
        }
    }
    i
}

/// After the string whose text starts at `chars[start]` (after its `"`),
/// counting its lines.
fn skip_string(chars: &[char], start: usize, line: &mut usize) -> usize {
    let mut i = start;
    while let Some(&c) = chars.get(i) {
        match c {
            '\\' => {
                *line += usize::from(chars.get(i + 1) == Some(&'\n'));
                i += 2;
            }
            '"' => return i + 1,
            _ => {
                *line += usize::from(c == '\n');
                i += 1;
            }
        }
    }
    i
}

/// After the character literal (`'x'`, `'\''`, `'\u{1F600}'`) at
/// `chars[start]`, or after the `'` of a lifetime or label (`'a`).
fn skip_quote(chars: &[char], start: usize) -> usize {
    if chars.get(start + 1) == Some(&'\\') {
        let mut i = start + 3;
        while chars.get(i).is_some_and(|&c| c != '\'') {
            i += 1;
        }
        i + 1
    } else if chars.get(start + 2) == Some(&'\'') {
        start + 3
    } else {
        start + 1
    }
}

/// After the literal with a prefix at `chars[start]` (`b"…"`, `c"…"`,
/// `b'x'`, `r"…"`, `r#"…"#`, `br#"…"#`, `cr"…"`), counting its lines; `None`
/// when there is none (a name like `rust` or `r#type`).
fn skip_prefixed_literal(chars: &[char], start: usize, line: &mut usize) -> Option<usize> {
    let mut i = start;
    let byte_or_c = matches!(chars.get(i), Some('b' | 'c'));
    if byte_or_c {
        i += 1;
    }
    if chars.get(i) == Some(&'r') {
        i += 1;
        let hashes = chars[i..].iter().take_while(|&&c| c == '#').count();
        i += hashes;
        if chars.get(i) != Some(&'"') {
            return None;
        }
        i += 1;
        // A raw string ends at the first `"` followed by as many `#`s.
        while let Some(&c) = chars.get(i) {
            i += 1;
            if c == '"'
                && chars[i..]
                    .iter()
                    .take(hashes)
                    .filter(|&&c| c == '#')
                    .count()
                    == hashes
            {
                return Some(i + hashes);
            }
            *line += usize::from(c == '\n');
        }
        return Some(i);
    }
    match chars.get(i) {
        Some('"') if byte_or_c => Some(skip_string(chars, i + 1, line)),
        Some('\'') if chars.get(start) == Some(&'b') && i == start + 1 => {
            Some(skip_quote(chars, i))
        }
        _ => None,
    }
}
