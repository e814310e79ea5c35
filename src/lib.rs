//! ternmq: a lightweight, fast MQTT broker (3.1, 3.1.1 and 5.0).
//!
//! Data flows one way: bytes (`transport`) -> packets (`protocol`) -> the connection's
//! state machine (`conn`) -> the router (`router`) -> the subscribers' sessions
//! (`session`) -> bytes. `broker` holds the shared state and the life of sessions;
//! `server` binds the listeners.
#![warn(unreachable_pub)]

pub mod admin;
pub mod broker;
pub mod budget;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod fuzz;
pub mod http;
pub mod listener;
pub mod message;
pub mod metrics;
pub mod observe;
pub mod protocol;
pub mod recovery;
pub mod router;
pub mod security;
pub mod server;
pub mod session;
pub mod store;
pub mod throttle;
pub mod transport;

pub use broker::Broker;
pub use config::Config;
pub use server::Server;

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// The top-level module a source file belongs to (`src/conn/machine.rs` → `conn`).
    fn module_of(path: &Path, src: &Path) -> String {
        let rel = path.strip_prefix(src).unwrap_or(path);
        let first = rel
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy());
        first.unwrap_or_default().trim_end_matches(".rs").to_owned()
    }

    fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// docs/architecture.md promises that module dependencies only point one way: every
    /// `crate::x` path outside comments and test modules is an edge of the graph.
    #[test]
    fn modules_have_no_import_cycles() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut paths = Vec::new();
        files(&src, &mut paths);
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for path in paths {
            let from = module_of(&path, &src);
            if ["lib", "main", "fuzz"].contains(&from.as_str()) || path.ends_with("tests.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
            for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (i, _) in line.match_indices("crate::") {
                    let to: String = line[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    let module = src.join(format!("{to}.rs")).exists() || src.join(&to).is_dir();
                    if module && to != from {
                        graph.entry(from.clone()).or_default().insert(to);
                    }
                }
            }
        }
        // Depth-first search; a module met again while still on the path closes a cycle.
        fn visit<'a>(
            m: &'a str,
            graph: &'a BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<&'a str>,
            done: &mut BTreeSet<&'a str>,
        ) {
            if let Some(i) = path.iter().position(|p| *p == m) {
                panic!("import cycle: {} -> {m}", path[i..].join(" -> "));
            }
            if !done.insert(m) {
                return;
            }
            path.push(m);
            for next in graph.get(m).into_iter().flatten() {
                visit(next, graph, path, done);
            }
            path.pop();
        }
        assert!(graph.contains_key("broker") && graph["conn"].contains("broker"));
        let mut done = BTreeSet::new();
        for m in graph.keys() {
            visit(m, &graph, &mut Vec::new(), &mut done);
        }
    }
}
