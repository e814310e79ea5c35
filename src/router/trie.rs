//! The subscription trie: topic filters split on `/`, one node per level.

use crate::protocol::SubOptions;
use crate::session::Session;
use std::collections::HashMap;
use std::sync::Arc;

pub struct Subscriber {
    pub session: Arc<Session>,
    pub options: SubOptions,
    /// MQTT 5 Subscription Identifier, returned with each matching delivery.
    pub id: Option<u32>,
}

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    /// Keyed by session id: one subscription per session per filter.
    subscribers: HashMap<u64, Subscriber>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty()
    }
}

#[derive(Default)]
pub struct Trie {
    root: Node,
    count: usize,
}

impl Trie {
    /// Adds or replaces `session`'s subscription to `filter`; returns true if it existed.
    pub fn insert(&mut self, filter: &str, sub: Subscriber) -> bool {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let existed = node.subscribers.insert(sub.session.id, sub).is_some();
        if !existed {
            self.count += 1;
        }
        existed
    }

    /// Removes `session_id`'s subscription to `filter`, pruning empty nodes.
    pub fn remove(&mut self, filter: &str, session_id: u64) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_at(&mut self.root, &levels, session_id);
        if removed {
            self.count -= 1;
        }
        removed
    }

    pub fn len(&self) -> usize {
        self.count
    }

    /// Calls `f` for every subscription whose filter matches `topic`. A session with
    /// several matching filters is reported once per filter; the caller merges them.
    /// Returns how many trie nodes contributed (1 means no session can repeat).
    pub fn for_each_match<'a>(&'a self, topic: &str, mut f: impl FnMut(&'a Subscriber)) -> usize {
        let levels: Vec<&str> = topic.split('/').collect();
        // A leading wildcard does not match topics starting with '$' [MQTT-4.7.2-1].
        let dollar = topic.starts_with('$');
        let mut nodes = 0;
        walk(&self.root, &levels, dollar, &mut f, &mut nodes);
        nodes
    }
}

fn remove_at(node: &mut Node, levels: &[&str], session_id: u64) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return node.subscribers.remove(&session_id).is_some();
    };
    let Some(child) = node.children.get_mut(*first) else {
        return false;
    };
    let removed = remove_at(child, rest, session_id);
    if removed && child.is_empty() {
        node.children.remove(*first);
    }
    removed
}

fn walk<'a>(
    node: &'a Node,
    levels: &[&str],
    dollar: bool,
    f: &mut impl FnMut(&'a Subscriber),
    nodes: &mut usize,
) {
    let mut visit = |n: &'a Node, nodes: &mut usize| {
        if !n.subscribers.is_empty() {
            *nodes += 1;
            n.subscribers.values().for_each(&mut *f);
        }
    };
    // `#` matches the parent level too: "a/#" matches "a".
    if !dollar {
        if let Some(hash) = node.children.get("#") {
            visit(hash, nodes);
        }
    }
    let Some((first, rest)) = levels.split_first() else {
        visit(node, nodes);
        return;
    };
    if let Some(child) = node.children.get(*first) {
        walk(child, rest, false, f, nodes);
    }
    if !dollar {
        if let Some(plus) = node.children.get("+") {
            walk(plus, rest, false, f, nodes);
        }
    }
}
