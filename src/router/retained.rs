//! Retained messages, in a tree of topic levels so that a wildcard subscription walks
//! only the branches it can match.
//!
//! Children are kept sorted, which gives every topic a fixed place in a pre-order walk
//! (a topic before the topics below it, siblings by name). A walk can then stop after any
//! number of messages and resume later from the last topic it returned, however the tree
//! changed meanwhile: that is how a subscription to `#` over 200,000 retained messages is
//! served a batch at a time, as the client drains them.

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

    /// Up to `limit` retained messages matching `filter`, in walk order, that come after
    /// the topic `after` (from the start if None). Returns true if the walk is complete.
    pub(super) fn walk(
        &self,
        filter: &str,
        after: Option<&str>,
        limit: usize,
        out: &mut Vec<Arc<Message>>,
    ) -> bool {
        let filter: Vec<&str> = filter.split('/').collect();
        let after: Option<Vec<&str>> = after.map(|a| a.split('/').collect());
        let mut walk = Walk { limit, out };
        walk.matching(&self.root, &filter, after.as_deref(), true)
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

/// One bounded step of a walk. Each function returns false once `limit` is reached.
///
/// `after` is the rest of the resume point below the current node: `None` when
/// everything under the node comes after it; `Some(levels)` when the node lies on the
/// resume point's path, so that only the node's children from `levels[0]` on are still
/// to come (and the node itself, a prefix of the resume point, came before it).
struct Walk<'o> {
    limit: usize,
    out: &'o mut Vec<Arc<Message>>,
}

impl Walk<'_> {
    fn emit(&mut self, node: &Node, after: Option<&[&str]>) -> bool {
        if after.is_none() {
            if let Some(m) = &node.message {
                if self.out.len() >= self.limit {
                    return false;
                }
                self.out.push(m.clone());
            }
        }
        true
    }

    /// The children of `node` from the resume point on, with the resume point below each.
    fn children<'n, 'a>(
        node: &'n Node,
        after: Option<&'a [&'a str]>,
    ) -> impl Iterator<Item = (&'n str, &'n Node, Option<&'a [&'a str]>)> {
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
        node: &Node,
        filter: &[&str],
        after: Option<&[&str]>,
        root: bool,
    ) -> bool {
        let Some((first, rest)) = filter.split_first() else {
            return self.emit(node, after);
        };
        // A leading wildcard does not match topics starting with '$' [MQTT-4.7.2-1].
        let visible = |name: &str| !(root && name.starts_with('$'));
        match *first {
            "#" => {
                // "a/#" matches "a" itself as well as everything below it.
                if !root && !self.emit(node, after) {
                    return false;
                }
                for (name, child, below) in Self::children(node, after) {
                    if visible(name) && !self.everything(child, below) {
                        return false;
                    }
                }
                true
            }
            "+" => {
                for (name, child, below) in Self::children(node, after) {
                    if visible(name) && !self.matching(child, rest, below, false) {
                        return false;
                    }
                }
                true
            }
            level => {
                let Some(child) = node.children.get(level) else {
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
                self.matching(child, rest, below, false)
            }
        }
    }

    fn everything(&mut self, node: &Node, after: Option<&[&str]>) -> bool {
        if !self.emit(node, after) {
            return false;
        }
        for (_, child, below) in Self::children(node, after) {
            if !self.everything(child, below) {
                return false;
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

    /// Walks in steps of `step`, resuming after the last topic each time.
    fn walk_in_steps(r: &Retained, filter: &str, step: usize) -> Vec<String> {
        let mut got: Vec<String> = Vec::new();
        loop {
            let mut out = Vec::new();
            let done = r.walk(filter, got.last().map(|s| s.as_str()), step, &mut out);
            assert!(out.len() <= step);
            got.extend(out.iter().map(|m| m.topic.to_string()));
            if done {
                return got;
            }
            assert_eq!(out.len(), step, "an incomplete step fills its limit");
        }
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
            assert!(r.walk(filter, None, usize::MAX, &mut all));
            let all: Vec<String> = all.iter().map(|m| m.topic.to_string()).collect();
            let mut want: Vec<String> = topics
                .iter()
                .filter(|t| topic::matches(filter, t))
                .cloned()
                .collect();
            want.sort_by(|a, b| a.split('/').cmp(b.split('/')));
            assert_eq!(all, want, "filter {filter}");
            for step in 1..4 {
                assert_eq!(walk_in_steps(&r, filter, step), want, "{filter} by {step}");
            }
        }
    }

    #[test]
    fn a_walk_survives_changes_between_steps() {
        let topics: Vec<String> = (0..10).map(|i| format!("t/{i}")).collect();
        let mut r = store(&topics);
        let mut out = Vec::new();
        assert!(!r.walk("t/#", None, 3, &mut out));
        assert_eq!(out.last().unwrap().topic, "t/2");
        // The resume point itself goes away, an earlier topic appears, a later one too.
        r.set("t/2", None);
        r.set("t/0a", Some(msg("t/0a")));
        r.set("t/5a", Some(msg("t/5a")));
        let mut rest = Vec::new();
        assert!(r.walk("t/#", Some("t/2"), 100, &mut rest));
        let rest: Vec<&str> = rest.iter().map(|m| &*m.topic).collect();
        assert_eq!(
            rest,
            ["t/3", "t/4", "t/5", "t/5a", "t/6", "t/7", "t/8", "t/9"]
        );
    }

    proptest! {
        /// Against `topic::matches`, any filter, any step size.
        #[test]
        fn walk_matches_the_matcher(
            topics in proptest::collection::vec("[ab$]{0,2}(/[ab]{0,2}){0,3}", 0..30),
            filter in "([ab+]{1,1}|[ab]{2})(/([ab+]{0,1}|#)){0,3}",
            step in 1usize..5,
        ) {
            let topics: Vec<String> = topics.into_iter().filter(|t| !t.is_empty()).collect();
            prop_assume!(topic::valid_filter(&filter));
            let r = store(&topics);
            let mut want: Vec<String> = topics.iter().filter(|t| topic::matches(&filter, t)).cloned().collect();
            want.sort_by(|a, b| a.split('/').cmp(b.split('/')));
            want.dedup();
            prop_assert_eq!(walk_in_steps(&r, &filter, step), want);
        }
    }
}
