//! The subscription trie: topic filters split on `/`, one node per level. A node holds
//! the plain subscriptions to its filter and the shared-subscription groups on it.

use crate::protocol::SubOptions;
use crate::session::Session;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub struct Subscriber {
    pub session: Arc<Session>,
    pub options: SubOptions,
    /// MQTT 5 Subscription Identifier, returned with each matching delivery.
    pub id: Option<u32>,
    /// The `$share/{group}/{filter}` this subscription belongs to, if shared.
    pub shared: Option<Arc<SharedKey>>,
}

/// Names a shared subscription group, so that a delivery can find its group again.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SharedKey {
    pub group: Box<str>,
    pub filter: Box<str>,
}

/// The members of one shared subscription; each message goes to one of them.
#[derive(Default)]
pub struct SharedGroup {
    members: Vec<Subscriber>,
    next: AtomicUsize,
}

impl SharedGroup {
    /// Round robin over the members, skipping `exclude` and preferring connected ones;
    /// an offline member is chosen only if no member is connected (its session queues).
    pub fn pick(&self, exclude: u64) -> Option<&Subscriber> {
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut fallback = None;
        for i in 0..n {
            let m = &self.members[(start + i) % n];
            if m.session.id == exclude {
                continue;
            }
            if m.session.is_online() {
                return Some(m);
            }
            fallback.get_or_insert(m);
        }
        fallback
    }
}

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    /// Keyed by session id: one subscription per session per filter.
    subscribers: HashMap<u64, Subscriber>,
    shared: HashMap<Box<str>, SharedGroup>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.shared.is_empty()
    }
}

#[derive(Default)]
pub struct Trie {
    root: Node,
    count: usize,
}

impl Trie {
    /// Adds or replaces a subscription to `filter` (in `group` if shared); returns true
    /// if the session already had it.
    pub fn insert(&mut self, filter: &str, group: Option<&str>, sub: Subscriber) -> bool {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let existed = match group {
            None => node.subscribers.insert(sub.session.id, sub).is_some(),
            Some(g) => {
                let members = &mut node.shared.entry(g.into()).or_default().members;
                match members.iter_mut().find(|m| m.session.id == sub.session.id) {
                    Some(m) => {
                        *m = sub;
                        true
                    }
                    None => {
                        members.push(sub);
                        false
                    }
                }
            }
        };
        if !existed {
            self.count += 1;
        }
        existed
    }

    /// Removes a session's subscription to `filter` (in `group`), pruning empty nodes.
    pub fn remove(&mut self, filter: &str, group: Option<&str>, session_id: u64) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_at(&mut self.root, &levels, group, session_id);
        if removed {
            self.count -= 1;
        }
        removed
    }

    pub fn len(&self) -> usize {
        self.count
    }

    /// Calls `on_sub` for every plain subscription matching `topic` (a session with
    /// several matching filters is reported once per filter) and `on_group` for every
    /// matching shared group. Returns how many nodes had plain subscriptions (1 means no
    /// session can be reported twice).
    pub fn for_each_match<'a>(
        &'a self,
        topic: &str,
        on_sub: &mut dyn FnMut(&'a Subscriber),
        on_group: &mut dyn FnMut(&'a SharedGroup),
    ) -> usize {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut visitor = Visitor {
            on_sub,
            on_group,
            nodes: 0,
        };
        // A leading wildcard does not match topics starting with '$' [MQTT-4.7.2-1].
        visitor.walk(&self.root, &levels, topic.starts_with('$'));
        visitor.nodes
    }

    /// The shared group `key` names, if it still exists.
    pub fn group(&self, key: &SharedKey) -> Option<&SharedGroup> {
        let mut node = &self.root;
        for level in key.filter.split('/') {
            node = node.children.get(level)?;
        }
        node.shared.get(&key.group)
    }
}

struct Visitor<'a, 'f> {
    on_sub: &'f mut dyn FnMut(&'a Subscriber),
    on_group: &'f mut dyn FnMut(&'a SharedGroup),
    nodes: usize,
}

impl<'a> Visitor<'a, '_> {
    fn visit(&mut self, node: &'a Node) {
        if !node.subscribers.is_empty() {
            self.nodes += 1;
            node.subscribers.values().for_each(&mut *self.on_sub);
        }
        node.shared.values().for_each(&mut *self.on_group);
    }

    fn walk(&mut self, node: &'a Node, levels: &[&str], dollar: bool) {
        // `#` matches the parent level too: "a/#" matches "a".
        if !dollar {
            if let Some(hash) = node.children.get("#") {
                self.visit(hash);
            }
        }
        let Some((first, rest)) = levels.split_first() else {
            self.visit(node);
            return;
        };
        if let Some(child) = node.children.get(*first) {
            self.walk(child, rest, false);
        }
        if !dollar {
            if let Some(plus) = node.children.get("+") {
                self.walk(plus, rest, false);
            }
        }
    }
}

fn remove_at(node: &mut Node, levels: &[&str], group: Option<&str>, session_id: u64) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return match group {
            None => node.subscribers.remove(&session_id).is_some(),
            Some(g) => {
                let Some(shared) = node.shared.get_mut(g) else {
                    return false;
                };
                let before = shared.members.len();
                shared.members.retain(|m| m.session.id != session_id);
                let removed = shared.members.len() < before;
                if shared.members.is_empty() {
                    node.shared.remove(g);
                }
                removed
            }
        };
    };
    let Some(child) = node.children.get_mut(*first) else {
        return false;
    };
    let removed = remove_at(child, rest, group, session_id);
    if removed && child.is_empty() {
        node.children.remove(*first);
    }
    removed
}
