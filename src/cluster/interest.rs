//! Which node wants which message. Each node publishes the filters its sessions hold into
//! the interest bucket (key `<node>.<filter token>`, value the filter as written, put when
//! its first session subscribes, deleted when its last one leaves), and mirrors the other
//! nodes' entries into a `Router` whose mailboxes stand for nodes. Matching a topic there
//! is MQTT's own matching (`+`, `#` with its parent level, `$` topics), so no topic ever
//! has to become a NATS subject pattern.
//!
//! A node's own plain filters are not in its mirror (its sessions are served by its own
//! router); its shared ones are: a shared subscription's member is picked among the
//! nodes holding members, this one included, so that no node is favoured.

use super::names::interest_key;
use crate::budget::Budget;
use crate::message::{Delivery, SharedKey};
use crate::protocol::{QoS, SubOptions};
use crate::router::{is_shared, Mailbox, Router};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// A node, as a mailbox of the interest mirror: a delivery to it is noted (see
/// `Interest::targets`), not sent from inside the router.
pub(super) struct RemoteNode {
    id: u64,
    pub name: Arc<str>,
}

/// Where a message must go: a node, and the shared group if it is for one member of it.
pub(super) type Target = (Arc<str>, Option<Arc<SharedKey>>);

thread_local! {
    /// The targets of the message being matched on this thread (`Interest::targets`).
    static TARGETS: RefCell<Vec<Target>> = const { RefCell::new(Vec::new()) };
}

impl Mailbox for RemoteNode {
    fn id(&self) -> u64 {
        self.id
    }

    fn deliver(&self, delivery: Delivery) -> bool {
        TARGETS.with(|t| t.borrow_mut().push((self.name.clone(), delivery.shared)));
        true
    }

    fn is_online(&self) -> bool {
        true
    }
}

/// A change of this node's interest, for the bucket, in order.
#[derive(Debug)]
pub(super) enum Change {
    Put {
        key: String,
        filter: String,
    },
    Delete {
        key: String,
    },
    /// Answered once every change before it is written.
    Flush(tokio::sync::oneshot::Sender<()>),
}

pub(super) struct Interest {
    node: String,
    /// How many local sessions hold each filter.
    local: Mutex<FxHashMap<String, usize>>,
    changes: mpsc::UnboundedSender<Change>,
    mirror: Router<RemoteNode>,
    nodes: Mutex<FxHashMap<Arc<str>, Arc<RemoteNode>>>,
    /// Mirrored entries by key: the node and filter, to remove on delete.
    entries: Mutex<FxHashMap<String, (Arc<RemoteNode>, String)>>,
    next_id: AtomicU64,
}

/// Subscribed at the highest QoS: a delivery to a node keeps the message's own QoS.
pub(super) fn all_qos() -> SubOptions {
    SubOptions {
        qos: QoS::ExactlyOnce,
        ..SubOptions::default()
    }
}

impl Interest {
    /// The interest of `node`; its changes come out of the returned receiver, for the
    /// task that writes them to the bucket.
    pub(super) fn new(node: &str) -> (Interest, mpsc::UnboundedReceiver<Change>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let interest = Interest {
            node: node.into(),
            local: Mutex::new(FxHashMap::default()),
            changes: tx,
            mirror: Router::new(Arc::new(Budget::new(usize::MAX))),
            nodes: Mutex::new(FxHashMap::default()),
            entries: Mutex::new(FxHashMap::default()),
            next_id: AtomicU64::new(1),
        };
        (interest, rx)
    }

    /// A local session subscribed to `filter`: the first one puts the node's entry.
    pub(super) fn subscribed(&self, filter: &str) {
        let mut local = self.local.lock();
        let n = local.entry(filter.to_owned()).or_insert(0);
        *n += 1;
        if *n == 1 {
            let key = interest_key(&self.node, filter);
            let _ = self.changes.send(Change::Put {
                key,
                filter: filter.to_owned(),
            });
        }
    }

    /// A local session let go of `filter`: the last one deletes the node's entry.
    pub(super) fn unsubscribed(&self, filter: &str) {
        let mut local = self.local.lock();
        let Some(n) = local.get_mut(filter) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            local.remove(filter);
            let key = interest_key(&self.node, filter);
            let _ = self.changes.send(Change::Delete { key });
        }
    }

    /// Deletes an entry of another node (gone, its sessions adopted here): after this
    /// node's own puts for those sessions, since both go through the same writer.
    pub(super) fn delete_foreign(&self, key: String) {
        let _ = self.changes.send(Change::Delete { key });
    }

    /// Resolves once every change made before is in the bucket.
    pub(super) async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.changes.send(Change::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Filters this node holds now (for tests and the log).
    pub(super) fn local_count(&self) -> usize {
        self.local.lock().len()
    }

    /// Entries of other nodes mirrored here.
    pub(super) fn mirrored(&self) -> usize {
        self.entries.lock().len()
    }

    /// Whether the entry `key` is mirrored here.
    pub(super) fn knows(&self, key: &str) -> bool {
        self.entries.lock().contains_key(key)
    }

    /// An entry of the bucket was put: mirrored, unless it is this node's plain one.
    pub(super) fn put(&self, key: &str, filter: &str) {
        let Some((node, _)) = key.split_once('.') else {
            return;
        };
        if node == self.node && !is_shared(filter) {
            return;
        }
        if !crate::router::valid_subscription(filter) {
            tracing::warn!(key, "interest entry with an invalid filter; ignored");
            return;
        }
        let remote = self.node(node);
        let mut entries = self.entries.lock();
        if let Some((old, old_filter)) = entries.get(key) {
            if old.id == remote.id && old_filter == filter {
                return;
            }
        }
        self.mirror.subscribe(filter, &remote, all_qos(), None);
        entries.insert(key.to_owned(), (remote, filter.to_owned()));
    }

    /// An entry of the bucket was deleted.
    pub(super) fn delete(&self, key: &str) {
        let Some((node, filter)) = self.entries.lock().remove(key) else {
            return;
        };
        self.mirror.unsubscribe(&filter, node.id);
    }

    fn node(&self, name: &str) -> Arc<RemoteNode> {
        self.nodes
            .lock()
            .entry(Arc::from(name))
            .or_insert_with(|| {
                Arc::new(RemoteNode {
                    id: self.next_id.fetch_add(1, Ordering::Relaxed),
                    name: Arc::from(name),
                })
            })
            .clone()
    }

    /// The nodes `message` must go to: one per node whose sessions want it (never this
    /// one), and one per matching shared group (possibly this one), picked in turn.
    pub(super) fn targets(&self, message: &Arc<crate::message::Message>) -> Vec<Target> {
        TARGETS.with(|t| t.borrow_mut().clear());
        self.mirror.publish(message);
        TARGETS.with(|t| std::mem::take(&mut *t.borrow_mut()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::protocol::ByteStr;
    use bytes::Bytes;
    use std::time::Instant;

    fn message(topic: &str) -> Arc<Message> {
        Arc::new(Message::new(
            ByteStr::from(topic),
            Bytes::new(),
            QoS::AtLeastOnce,
            false,
            None,
            0,
            Instant::now(),
        ))
    }

    fn names(targets: &[Target]) -> Vec<String> {
        let mut v: Vec<String> = targets
            .iter()
            .map(|(n, s)| match s {
                None => n.to_string(),
                Some(k) => format!("{n}:{}/{}", k.group, k.filter),
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn local_filters_are_counted_and_written_once() {
        let (interest, mut rx) = Interest::new("a");
        interest.subscribed("x/+");
        interest.subscribed("x/+");
        interest.unsubscribed("x/+");
        interest.unsubscribed("x/+");
        interest.unsubscribed("never");
        let got: Vec<Change> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(matches!(&got[0], Change::Put { filter, .. } if filter == "x/+"));
        assert!(matches!(&got[1], Change::Delete { .. }));
        assert_eq!(interest.local_count(), 0);
    }

    #[test]
    fn one_target_per_node_and_per_group_with_mqtt_matching() {
        let (interest, _rx) = Interest::new("a");
        for (node, filter) in [
            ("b", "s/#"),
            ("b", "s/+"),
            ("c", "s/x"),
            ("a", "s/x"),
            ("d", "#"),
            ("b", "$share/g/s/x"),
            ("a", "$share/g/s/+"),
        ] {
            interest.put(&interest_key(node, filter), filter);
        }
        assert_eq!(
            names(&interest.targets(&message("s/x"))),
            ["a:g/s/+", "b", "b:g/s/x", "c", "d"]
        );
        // `#` matches its parent level; `$` topics do not match leading wildcards.
        assert_eq!(names(&interest.targets(&message("s"))), ["b", "d"]);
        assert_eq!(
            names(&interest.targets(&message("$SYS/x"))),
            Vec::<String>::new()
        );
        interest.delete(&interest_key("d", "#"));
        interest.delete(&interest_key("b", "s/#"));
        assert_eq!(
            names(&interest.targets(&message("s"))),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_shared_group_over_nodes_takes_turns() {
        let (interest, _rx) = Interest::new("a");
        for node in ["a", "b", "c"] {
            interest.put(&interest_key(node, "$share/g/t"), "$share/g/t");
        }
        let mut seen: Vec<String> = (0..6)
            .flat_map(|_| interest.targets(&message("t")))
            .map(|(n, _)| n.to_string())
            .collect();
        seen.sort();
        assert_eq!(seen, ["a", "a", "b", "b", "c", "c"]);
    }
}
