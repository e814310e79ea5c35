//! Retained messages, in a tree of topic levels so that a wildcard subscription walks
//! only the branches it can match.
//!
//! Children are kept sorted, which gives every topic a fixed place in a pre-order walk
//! (a topic before the topics below it, siblings by name). A walk can then stop at any
//! node and resume later from there, however the tree changed meanwhile: that is how a
//! subscription to `#` over 200,000 retained messages is served a batch at a time, as the
//! client drains them, and how each step is bounded by the nodes it visits as well as by
//! the messages it finds.

use crate::message::Message;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

#[derive(Default)]
struct Node {
    children: BTreeMap<Box<str>, Node>,
    message: Option<Arc<Message>>,
}

#[derive(Default)]
pub(super) struct Retained {
    root: Node,
    count: usize,
    /// Topic and payload bytes of the messages held.
    bytes: usize,
}

impl Retained {
    /// Stores `message` as the retained message of its topic, or clears the topic when
    /// `message` is `None`. Returns the message it replaces.
    pub(super) fn set(
        &mut self,
        topic: &str,
        message: Option<Arc<Message>>,
    ) -> Option<Arc<Message>> {
        let levels: Vec<&str> = topic.split('/').collect();
        let setting = message.is_some();
        let new_size = message
            .as_ref()
            .map_or(0, |m| m.topic.len() + m.payload.len());
        let old = match message {
            Some(m) => {
                let mut node = &mut self.root;
                for level in &levels {
                    node = node.children.entry((*level).into()).or_default();
                }
                node.message.replace(m)
            }
            None => clear(&mut self.root, &levels),
        };
        match (setting, old.is_some()) {
            (true, false) => self.count += 1,
            (false, true) => self.count -= 1,
            _ => {}
        }
        let size = |m: &Arc<Message>| m.topic.len() + m.payload.len();
        self.bytes = self.bytes + new_size - old.as_ref().map_or(0, size);
        old
    }

    /// Clears `topic` only if it still holds `message` (not a newer one); true if so.
    pub(super) fn clear_if_same(&mut self, topic: &str, message: &Arc<Message>) -> bool {
        let mut node = &self.root;
        for level in topic.split('/') {
            match node.children.get(level) {
                Some(child) => node = child,
                None => return false,
            }
        }
        let same = node
            .message
            .as_ref()
            .is_some_and(|m| Arc::ptr_eq(m, message));
        if same {
            self.set(topic, None);
        }
        same
    }

    pub(super) fn len(&self) -> usize {
        self.count
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Up to `limit` (at least 1) retained messages matching `filter`, in walk order,
    /// that come after the tree node `after` (from the start if None), visiting at most
    /// `nodes` (at least 1) nodes of the tree, which is left with what the step did not
    /// use: a sparse filter such as `+/+/+/x` costs a step no more than a dense one.
    /// Returns None if the walk is complete, or where to resume: the last message taken
    /// when `limit` stopped it, or the last node visited (which may hold no message)
    /// when `nodes` did.
    pub(super) fn walk(
        &self,
        filter: &str,
        after: Option<&str>,
        limit: usize,
        nodes: &mut usize,
        out: &mut Vec<Arc<Message>>,
    ) -> Option<String> {
        let filter: Vec<&str> = filter.split('/').collect();
        let after: Option<Vec<&str>> = after.map(|a| a.split('/').collect());
        let mut walk = Walk {
            limit: limit.max(1),
            nodes: (*nodes).max(1),
            out,
            taken: 0,
            full: false,
            path: Vec::new(),
        };
        let done = walk.matching(&self.root, &filter, after.as_deref(), true);
        *nodes = walk.nodes;
        if done {
            return None;
        }
        if walk.full {
            return walk.out.last().map(|m| m.topic.to_string());
        }
        walk.path.reverse();
        Some(walk.path.join("/"))
    }
}

fn clear(node: &mut Node, levels: &[&str]) -> Option<Arc<Message>> {
    let Some((first, rest)) = levels.split_first() else {
        return node.message.take();
    };
    let child = node.children.get_mut(*first)?;
    let cleared = clear(child, rest);
    if child.message.is_none() && child.children.is_empty() {
        node.children.remove(*first);
    }
    cleared
}

/// One bounded step of a walk. Each function returns false once the step stops.
///
/// `after` is the rest of the resume point below the current node: `None` when
/// everything under the node comes after it; `Some(levels)` when the node lies on the
/// resume point's path, so that only the node's children from `levels[0]` on are still
/// to come (and the node itself, a prefix of the resume point, came before it). Nodes on
/// that path are passed again, not visited: they do not count, and a step never stops
/// at one (it would not move on).
struct Walk<'a, 'o> {
    limit: usize,
    /// Nodes the step may still visit.
    nodes: usize,
    out: &'o mut Vec<Arc<Message>>,
    /// Messages this step took.
    taken: usize,
    /// Stopped at a message over `limit`: the walk resumes after the last one taken.
    full: bool,
    /// Stopped by `nodes`: the levels of the last node visited, deepest first, as each
    /// function on the way back up adds its child's name.
    path: Vec<&'a str>,
}

impl<'a> Walk<'a, '_> {
    /// Takes the message of `node`, if it comes after the resume point; false if the
    /// step has taken its `limit`.
    fn emit(&mut self, node: &Node, after: Option<&[&str]>) -> bool {
        if after.is_none() {
            if let Some(m) = &node.message {
                if self.taken >= self.limit {
                    self.full = true;
                    return false;
                }
                self.taken += 1;
                self.out.push(m.clone());
            }
        }
        true
    }

    /// Counts a node visited (not one passed again on the way to the resume point);
    /// false once the step has visited its budget of nodes.
    fn visited(&mut self, after: Option<&[&str]>) -> bool {
        if after.is_some() {
            return true;
        }
        self.nodes = self.nodes.saturating_sub(1);
        self.nodes > 0
    }

    /// The step stopped below the child `name`: records it on the way back up.
    fn stopped_in(&mut self, name: &'a str) -> bool {
        if !self.full {
            self.path.push(name);
        }
        false
    }

    /// The children of `node` from the resume point on, with the resume point below each.
    fn children<'b>(
        node: &'a Node,
        after: Option<&'b [&'b str]>,
    ) -> impl Iterator<Item = (&'a str, &'a Node, Option<&'b [&'b str]>)> {
        let (from, next) = match after {
            Some([first, rest @ ..]) => (Bound::Included(*first), Some((*first, rest))),
            // `after` names this very node, or nothing: every child comes after it.
            _ => (Bound::Unbounded, None),
        };
        node.children
            .range::<str, _>((from, Bound::Unbounded))
            .map(move |(name, child)| {
                let below = match next {
                    Some((first, rest)) if **name == *first => Some(rest),
                    _ => None,
                };
                (&**name, child, below)
            })
    }

    fn matching(
        &mut self,
        node: &'a Node,
        filter: &[&str],
        after: Option<&[&str]>,
        root: bool,
    ) -> bool {
        let Some((first, rest)) = filter.split_first() else {
            return self.emit(node, after) && self.visited(after);
        };
        // "a/#" matches "a" itself as well as everything below it.
        if *first == "#" && !root && !self.emit(node, after) {
            return false;
        }
        if !root && !self.visited(after) {
            return false;
        }
        // A leading wildcard does not match topics starting with '$' [MQTT-4.7.2-1];
        // passing over them counts as a visit all the same.
        let visible = |name: &str| !(root && name.starts_with('$'));
        match *first {
            "#" => {
                for (name, child, below) in Self::children(node, after) {
                    let going = if visible(name) {
                        self.everything(child, below)
                    } else {
                        self.visited(below)
                    };
                    if !going {
                        return self.stopped_in(name);
                    }
                }
                true
            }
            "+" => {
                for (name, child, below) in Self::children(node, after) {
                    let going = if visible(name) {
                        self.matching(child, rest, below, false)
                    } else {
                        self.visited(below)
                    };
                    if !going {
                        return self.stopped_in(name);
                    }
                }
                true
            }
            level => {
                let Some((name, child)) = node.children.get_key_value(level) else {
                    return true;
                };
                let below = match after {
                    None => None,
                    Some([a, below @ ..]) if *a == level => Some(below),
                    // The resume point lies past this child: nothing of it is left.
                    Some([a, ..]) if *a > level => return true,
                    // The resume point is this node, or lies before this child.
                    Some(_) => None,
                };
                self.matching(child, rest, below, false) || self.stopped_in(name)
            }
        }
    }

    fn everything(&mut self, node: &'a Node, after: Option<&[&str]>) -> bool {
        if !self.emit(node, after) || !self.visited(after) {
            return false;
        }
        for (name, child, below) in Self::children(node, after) {
            if !self.everything(child, below) {
                return self.stopped_in(name);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{topic, ByteStr, QoS};
    use bytes::Bytes;
    use proptest::prelude::*;
    use std::time::Instant;

    fn msg(topic: &str) -> Arc<Message> {
        Arc::new(Message::new(
            ByteStr::from(topic),
            Bytes::from_static(b"x"),
            QoS::AtMostOnce,
            true,
            None,
            0,
            Instant::now(),
        ))
    }

    fn store(topics: &[String]) -> Retained {
        let mut r = Retained::default();
        for t in topics {
            r.set(t, Some(msg(t)));
        }
        r
    }

    /// Walks in steps of at most `step` messages and `nodes` nodes, resuming where each
    /// step stopped. Returns the matches and the nodes visited in all.
    fn walk_in_steps(
        r: &Retained,
        filter: &str,
        step: usize,
        nodes: usize,
    ) -> (Vec<String>, usize) {
        let mut got: Vec<String> = Vec::new();
        let mut visited = 0;
        let mut after: Option<String> = None;
        loop {
            let mut out = Vec::new();
            let mut left = nodes;
            let next = r.walk(filter, after.as_deref(), step, &mut left, &mut out);
            assert!(out.len() <= step && left <= nodes);
            visited += nodes - left;
            got.extend(out.iter().map(|m| m.topic.to_string()));
            let Some(next) = next else {
                return (got, visited);
            };
            assert!(
                out.len() == step || left == 0,
                "an incomplete step fills its limit or spends its budget of nodes"
            );
            // Each step moves on in walk order (level by level), so the walk ends.
            if let Some(before) = &after {
                assert!(
                    next.split('/').gt(before.split('/')),
                    "{next} after {before}"
                );
            }
            after = Some(next);
        }
    }

    fn sorted(mut topics: Vec<String>) -> Vec<String> {
        topics.sort_by(|a, b| a.split('/').cmp(b.split('/')));
        topics.dedup();
        topics
    }

    #[test]
    fn walk_in_steps_returns_each_match_once_in_order() {
        let topics: Vec<String> = ["a", "a/b", "a/b/c", "a/c", "b", "$SYS/x", "a//b", "/a"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let r = store(&topics);
        for filter in [
            "#", "a/#", "+/b", "a/+", "+", "$SYS/#", "+/+/+", "/+", "a/b",
        ] {
            let mut all = Vec::new();
            assert!(r
                .walk(filter, None, usize::MAX, &mut { usize::MAX }, &mut all)
                .is_none());
            let all: Vec<String> = all.iter().map(|m| m.topic.to_string()).collect();
            let want = sorted(
                topics
                    .iter()
                    .filter(|t| topic::matches(filter, t))
                    .cloned()
                    .collect(),
            );
            assert_eq!(all, want, "filter {filter}");
            for step in 1..4 {
                for nodes in [1, 2, 3, usize::MAX] {
                    let (got, _) = walk_in_steps(&r, filter, step, nodes);
                    assert_eq!(got, want, "{filter} by {step}, {nodes} nodes");
                }
            }
        }
    }

    /// A filter that matches few of many topics (`+/+/+/x`) and one that passes over many
    /// `$` topics (`#`) take as many steps as the nodes they visit call for, each within
    /// the budget, and visit no node twice.
    #[test]
    fn a_sparse_filter_walks_in_steps_of_bounded_nodes() {
        let mut topics = Vec::new();
        for i in 0..20 {
            for j in 0..20 {
                for k in 0..20 {
                    topics.extend((0..5).map(|l| format!("{i}/{j}/{k}/l{l}")));
                    if i == j && j == k {
                        topics.push(format!("{i}/{j}/{k}/x"));
                    }
                }
            }
        }
        topics.extend((0..3000).map(|i| format!("$s{i}")));
        topics.push("a".into());
        let r = store(&topics);
        let budget = crate::router::NODES_PER_STEP;
        // Levels 1 to 3 (20 + 400 + 8,000 nodes), the 20 matches, and at the root the
        // 3,000 `$` topics passed over and `a`.
        let nodes = 20 + 400 + 8000 + 20 + 3000 + 1;
        let (got, visited) = walk_in_steps(&r, "+/+/+/x", 64, budget);
        let want: Vec<String> = (0..20).map(|i| format!("{i}/{i}/{i}/x")).collect();
        assert_eq!(got, sorted(want));
        assert_eq!(visited, nodes);
        let mut steps = 0;
        let mut after: Option<String> = None;
        loop {
            steps += 1;
            let mut left = budget;
            after = r.walk("+/+/+/x", after.as_deref(), 64, &mut left, &mut Vec::new());
            if after.is_none() {
                break;
            }
        }
        assert_eq!(steps, nodes.div_ceil(budget));
        // Every `$` topic at the root is passed over by `#`, not matched, and counts.
        let mut dollars: Vec<String> = (0..3000).map(|i| format!("$s{i}")).collect();
        dollars.push("a".into());
        let (got, visited) = walk_in_steps(&store(&dollars), "#", 64, 100);
        assert_eq!(got, ["a"]);
        assert_eq!(visited, 3000 + 1);
    }

    #[test]
    fn a_walk_survives_changes_between_steps() {
        let topics: Vec<String> = (0..10).map(|i| format!("t/{i}")).collect();
        let mut r = store(&topics);
        let mut out = Vec::new();
        let after = r.walk("t/#", None, 3, &mut { usize::MAX }, &mut out);
        assert_eq!(after.as_deref(), Some("t/2"));
        assert_eq!(out.last().unwrap().topic, "t/2");
        // The resume point itself goes away, an earlier topic appears, a later one too.
        r.set("t/2", None);
        r.set("t/0a", Some(msg("t/0a")));
        r.set("t/5a", Some(msg("t/5a")));
        let mut rest = Vec::new();
        assert!(r
            .walk("t/#", Some("t/2"), 100, &mut { usize::MAX }, &mut rest)
            .is_none());
        let rest: Vec<&str> = rest.iter().map(|m| &*m.topic).collect();
        assert_eq!(
            rest,
            ["t/3", "t/4", "t/5", "t/5a", "t/6", "t/7", "t/8", "t/9"]
        );
    }

    proptest! {
        /// Against `topic::matches`, any filter, any step size, any budget of nodes.
        #[test]
        fn walk_matches_the_matcher(
            topics in proptest::collection::vec("[ab$]{0,2}(/[ab]{0,2}){0,3}", 0..30),
            filter in "([ab+]{1,1}|[ab]{2})(/([ab+]{0,1}|#)){0,3}",
            step in 1usize..5,
            nodes in 1usize..6,
        ) {
            let topics: Vec<String> = topics.into_iter().filter(|t| !t.is_empty()).collect();
            prop_assume!(topic::valid_filter(&filter));
            let r = store(&topics);
            let want = sorted(topics.iter().filter(|t| topic::matches(&filter, t)).cloned().collect());
            prop_assert_eq!(walk_in_steps(&r, &filter, step, nodes).0, want);
        }
    }
}
