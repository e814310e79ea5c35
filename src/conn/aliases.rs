//! Topic aliases of one MQTT 5 connection: the client's (incoming) and the server's
//! (outgoing, least recently used replaced).

use crate::message::Alias;
use crate::protocol::ByteStr;
use rustc_hash::FxHashMap;

/// The topic aliases of one 5.0 connection.
#[derive(Default)]
pub(super) struct Aliases {
    /// Set by the client.
    pub(super) incoming: FxHashMap<u16, ByteStr>,
    /// Set by the server.
    pub(super) outgoing: OutgoingAliases,
}

/// Server-to-client topic aliases: at most a fixed number per connection, the least
/// recently used one replaced by a new topic.
#[derive(Default)]
pub(super) struct OutgoingAliases {
    by_topic: FxHashMap<ByteStr, u16>,
    /// Alias n is `slots[n - 1]`: its topic and when it was last used.
    slots: Vec<(ByteStr, u64)>,
    clock: u64,
}

impl OutgoingAliases {
    pub(super) fn alias_for(&mut self, topic: &ByteStr, max: u16) -> Alias {
        self.clock += 1;
        if let Some(&alias) = self.by_topic.get(topic) {
            self.slots[usize::from(alias) - 1].1 = self.clock;
            return Alias { alias, set: false };
        }
        // A copy, so that the alias does not pin the publisher's read buffer.
        let topic = ByteStr::from(&**topic);
        let index = if self.slots.len() < usize::from(max) {
            self.slots.push((topic.clone(), self.clock));
            self.slots.len() - 1
        } else {
            let (index, _) = self
                .slots
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, used))| *used)
                .unwrap_or((0, &(ByteStr::new(), 0)));
            let old = std::mem::replace(&mut self.slots[index], (topic.clone(), self.clock));
            self.by_topic.remove(&old.0);
            index
        };
        let alias = index as u16 + 1;
        self.by_topic.insert(topic, alias);
        Alias { alias, set: true }
    }

    /// The client never saw `alias` set: free it.
    pub(super) fn forget(&mut self, alias: u16) {
        if let Some(slot) = self.slots.get_mut(usize::from(alias) - 1) {
            self.by_topic.remove(&slot.0);
            *slot = (ByteStr::new(), 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outgoing_aliases_replace_the_least_recently_used() {
        let mut a = OutgoingAliases::default();
        let t = |s: &str| ByteStr::from(s);
        assert_eq!(
            a.alias_for(&t("one"), 2),
            Alias {
                alias: 1,
                set: true
            }
        );
        assert_eq!(
            a.alias_for(&t("two"), 2),
            Alias {
                alias: 2,
                set: true
            }
        );
        assert_eq!(
            a.alias_for(&t("one"), 2),
            Alias {
                alias: 1,
                set: false
            }
        );
        // "two" is the least recently used.
        assert_eq!(
            a.alias_for(&t("three"), 2),
            Alias {
                alias: 2,
                set: true
            }
        );
        assert_eq!(
            a.alias_for(&t("two"), 2),
            Alias {
                alias: 1,
                set: true
            }
        );
        a.forget(1);
        assert_eq!(
            a.alias_for(&t("four"), 2),
            Alias {
                alias: 1,
                set: true
            }
        );
        assert_eq!(
            a.alias_for(&t("three"), 2),
            Alias {
                alias: 2,
                set: false
            }
        );
        assert!(a.slots.len() <= 2 && a.by_topic.len() <= 2);
    }
}
