//! The subscription trie: topic filters split on `/`, one node per level. A node holds
//! the plain subscriptions to its filter and the shared-subscription groups on it.

use super::Mailbox;
use crate::message::{Delivery, SharedKey};
use crate::protocol::SubOptions;
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub struct Subscriber<M> {
    pub mailbox: Arc<M>,
    pub options: SubOptions,
    /// MQTT 5 Subscription Identifier, returned with each matching delivery.
    pub id: Option<u32>,
    /// The `$share/{group}/{filter}` this subscription belongs to, if shared.
    pub shared: Option<Arc<SharedKey>>,
}

/// The members of one shared subscription; each message goes to one of them.
pub struct SharedGroup<M> {
    members: Vec<Subscriber<M>>,
    next: AtomicUsize,
    /// Messages a member left unacknowledged when its session ended, while no member was
    /// left to take them: given to the next member that joins.
    pub(super) waiting: VecDeque<Delivery>,
}

impl<M> Default for SharedGroup<M> {
    fn default() -> Self {
        SharedGroup {
            members: Vec::new(),
            next: AtomicUsize::new(0),
            waiting: VecDeque::new(),
        }
    }
}

impl<M: Mailbox> SharedGroup<M> {
    /// Gives a message to one member (never `exclude`): round robin, connected members
    /// first; an offline member takes it only if no connected one does (its session
    /// queues it). A member that refuses it passes it on to the next: its session has
    /// just ended (its subscriptions are about to leave the router) or its queue is full.
    /// Returns whether a member took it.
    pub fn deliver(&self, exclude: u64, delivery: impl Fn(&Subscriber<M>) -> Delivery) -> bool {
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for online in [true, false] {
            for i in 0..n {
                let m = &self.members[(start + i) % n];
                if m.mailbox.id() == exclude || m.mailbox.is_online() != online {
                    continue;
                }
                if m.mailbox.deliver(delivery(m)) {
                    return true;
                }
            }
        }
        false
    }

    pub fn has_members(&self) -> bool {
        !self.members.is_empty()
    }
}

struct Node<M> {
    children: FxHashMap<Box<str>, Node<M>>,
    /// Keyed by mailbox id: one subscription per session per filter.
    subscribers: FxHashMap<u64, Subscriber<M>>,
    shared: FxHashMap<Box<str>, SharedGroup<M>>,
}

impl<M> Default for Node<M> {
    fn default() -> Self {
        Node {
            children: FxHashMap::default(),
            subscribers: FxHashMap::default(),
            shared: FxHashMap::default(),
        }
    }
}

impl<M> Node<M> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.shared.is_empty()
    }
}

pub(super) struct Trie<M> {
    root: Node<M>,
    count: usize,
}

impl<M> Default for Trie<M> {
    fn default() -> Self {
        Trie {
            root: Node::default(),
            count: 0,
        }
    }
}

impl<M: Mailbox> Trie<M> {
    /// Adds or replaces a subscription to `filter` (in `group` if shared); returns true
    /// if the mailbox already had it, and the group, for a shared one.
    pub(super) fn insert(
        &mut self,
        filter: &str,
        group: Option<&str>,
        sub: Subscriber<M>,
    ) -> (bool, Option<&mut SharedGroup<M>>) {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let (existed, group) = match group {
            None => (
                node.subscribers.insert(sub.mailbox.id(), sub).is_some(),
                None,
            ),
            Some(g) => {
                let group = node.shared.entry(g.into()).or_default();
                let id = sub.mailbox.id();
                let existed = match group.members.iter_mut().find(|m| m.mailbox.id() == id) {
                    Some(m) => {
                        *m = sub;
                        true
                    }
                    None => {
                        group.members.push(sub);
                        false
                    }
                };
                (existed, Some(group))
            }
        };
        if !existed {
            self.count += 1;
        }
        (existed, group)
    }

    /// Removes a mailbox's subscription to `filter` (in `group`), pruning empty nodes.
    pub(super) fn remove(&mut self, filter: &str, group: Option<&str>, mailbox: u64) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_at(&mut self.root, &levels, group, mailbox);
        if removed {
            self.count -= 1;
        }
        removed
    }

    pub(super) fn len(&self) -> usize {
        self.count
    }

    /// Calls `on_sub` for every plain subscription matching `topic` (a mailbox with
    /// several matching filters is reported once per filter) and `on_group` for every
    /// matching shared group. Returns how many nodes had plain subscriptions (1 means no
    /// mailbox can be reported twice).
    pub(super) fn for_each_match<'a>(
        &'a self,
        topic: &str,
        on_sub: &mut dyn FnMut(&'a Subscriber<M>),
        on_group: &mut dyn FnMut(&'a SharedGroup<M>),
    ) -> usize {
        let mut visitor = Visitor {
            on_sub,
            on_group,
            nodes: 0,
        };
        // A leading wildcard does not match topics starting with '$' [MQTT-4.7.2-1].
        visitor.walk(&self.root, Some(topic), topic.starts_with('$'));
        visitor.nodes
    }

    /// The shared group `key` names, if it exists.
    pub(super) fn group(&self, key: &SharedKey) -> Option<&SharedGroup<M>> {
        let mut node = &self.root;
        for level in key.filter.split('/') {
            node = node.children.get(level)?;
        }
        node.shared.get(&key.group)
    }

    /// The shared group `key` names, creating it if `create` (to hold waiting messages).
    pub(super) fn group_mut(
        &mut self,
        key: &SharedKey,
        create: bool,
    ) -> Option<&mut SharedGroup<M>> {
        let mut node = &mut self.root;
        for level in key.filter.split('/') {
            node = if create {
                node.children.entry(level.into()).or_default()
            } else {
                node.children.get_mut(level)?
            };
        }
        if create {
            Some(node.shared.entry(key.group.clone()).or_default())
        } else {
            node.shared.get_mut(&key.group)
        }
    }
}

struct Visitor<'a, 'f, M> {
    on_sub: &'f mut dyn FnMut(&'a Subscriber<M>),
    on_group: &'f mut dyn FnMut(&'a SharedGroup<M>),
    nodes: usize,
}

impl<'a, M> Visitor<'a, '_, M> {
    fn visit(&mut self, node: &'a Node<M>) {
        if !node.subscribers.is_empty() {
            self.nodes += 1;
            node.subscribers.values().for_each(&mut *self.on_sub);
        }
        node.shared
            .values()
            .filter(|g| !g.members.is_empty())
            .for_each(&mut *self.on_group);
    }

    /// `rest` is what is left of the topic below `node` (None once every level is used).
    fn walk(&mut self, node: &'a Node<M>, rest: Option<&str>, dollar: bool) {
        // `#` matches the parent level too: "a/#" matches "a".
        if !dollar {
            if let Some(hash) = node.children.get("#") {
                self.visit(hash);
            }
        }
        let Some(rest) = rest else {
            self.visit(node);
            return;
        };
        let (first, below) = match rest.split_once('/') {
            Some((first, below)) => (first, Some(below)),
            None => (rest, None),
        };
        if let Some(child) = node.children.get(first) {
            self.walk(child, below, false);
        }
        if !dollar {
            if let Some(plus) = node.children.get("+") {
                self.walk(plus, below, false);
            }
        }
    }
}

fn remove_at<M: Mailbox>(
    node: &mut Node<M>,
    levels: &[&str],
    group: Option<&str>,
    mailbox: u64,
) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return match group {
            None => node.subscribers.remove(&mailbox).is_some(),
            Some(g) => {
                let Some(shared) = node.shared.get_mut(g) else {
                    return false;
                };
                let before = shared.members.len();
                shared.members.retain(|m| m.mailbox.id() != mailbox);
                let removed = shared.members.len() < before;
                if shared.members.is_empty() && shared.waiting.is_empty() {
                    node.shared.remove(g);
                }
                removed
            }
        };
    };
    let Some(child) = node.children.get_mut(*first) else {
        return false;
    };
    let removed = remove_at(child, rest, group, mailbox);
    if removed && child.is_empty() {
        node.children.remove(*first);
    }
    removed
}
