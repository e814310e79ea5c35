//! Retained messages, in a tree of topic levels so that a wildcard subscription walks
//! only the branches it can match.

use super::Message;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    message: Option<Arc<Message>>,
}

#[derive(Default)]
pub struct Retained {
    root: Node,
    count: usize,
}

impl Retained {
    /// Stores `message` as the retained message of its topic, or clears the topic when
    /// `message` is `None`.
    pub fn set(&mut self, topic: &str, message: Option<Arc<Message>>) {
        let levels: Vec<&str> = topic.split('/').collect();
        match message {
            Some(m) => {
                let mut node = &mut self.root;
                for level in &levels {
                    node = node.children.entry((*level).into()).or_default();
                }
                if node.message.replace(m).is_none() {
                    self.count += 1;
                }
            }
            None => {
                if clear(&mut self.root, &levels) {
                    self.count -= 1;
                }
            }
        }
    }

    /// Clears `topic` only if it still holds `message` (not a newer one).
    pub fn clear_if_same(&mut self, topic: &str, message: &Arc<Message>) {
        let mut node = &self.root;
        for level in topic.split('/') {
            match node.children.get(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        if node
            .message
            .as_ref()
            .is_some_and(|m| Arc::ptr_eq(m, message))
        {
            self.set(topic, None);
        }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    /// Every retained message whose topic matches `filter`.
    pub fn matching(&self, filter: &str, out: &mut Vec<Arc<Message>>) {
        let levels: Vec<&str> = filter.split('/').collect();
        collect(&self.root, &levels, true, out);
    }
}

fn clear(node: &mut Node, levels: &[&str]) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return node.message.take().is_some();
    };
    let Some(child) = node.children.get_mut(*first) else {
        return false;
    };
    let cleared = clear(child, rest);
    if child.message.is_none() && child.children.is_empty() {
        node.children.remove(*first);
    }
    cleared
}

fn collect(node: &Node, filter: &[&str], root: bool, out: &mut Vec<Arc<Message>>) {
    let Some((first, rest)) = filter.split_first() else {
        out.extend(node.message.iter().cloned());
        return;
    };
    // A leading wildcard does not match topics starting with '$' [MQTT-4.7.2-1].
    let visible = |name: &str| !(root && name.starts_with('$'));
    match *first {
        "#" => {
            // "a/#" matches "a" itself as well as everything below it.
            if !root {
                out.extend(node.message.iter().cloned());
            }
            for (name, child) in &node.children {
                if visible(name) {
                    everything(child, out);
                }
            }
        }
        "+" => {
            for (name, child) in &node.children {
                if visible(name) {
                    collect(child, rest, false, out);
                }
            }
        }
        level => {
            if let Some(child) = node.children.get(level) {
                collect(child, rest, false, out);
            }
        }
    }
}

fn everything(node: &Node, out: &mut Vec<Arc<Message>>) {
    out.extend(node.message.iter().cloned());
    for child in node.children.values() {
        everything(child, out);
    }
}
