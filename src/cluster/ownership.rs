//! One owner per client id in the whole cluster. The owners bucket names, for each client
//! id, the node that holds its session (`<node>\n<client id>`), changed only by compare
//! and set on the entry's revision.
//!
//! A CONNECT on node B for a client owned by A: B asks A (a request on A's control
//! subject) to give the session up; A ends the connection (5.0 DISCONNECT 0x8E, as a local
//! takeover), lets the session go (forwarding what still reaches it there: handover.rs),
//! waits until everything the session recorded is in JetStream and answers. B then sets
//! itself as owner (on the revision it read: if another node got there first, B starts
//! over) and loads the session from the store; forwards from A that came meanwhile wait
//! until it is in.
//! If A does not answer and its heartbeat has stopped, A's sessions are adopted first
//! (liveness.rs) and B starts over, asking the adopter.
//!
//! On each node, one claim (or hand-over) of a client id at a time: a request for a client
//! id this node is busy with is answered "busy", and the asking node tries again shortly;
//! two nodes claiming the same client id from each other cannot wait on each other.

use super::handover::Link;
use super::names::token;
use super::{inbox, Cluster};
use crate::broker::Claimed;
use crate::protocol::ByteStr;
use crate::store::Snapshot;
use async_nats::jetstream::kv::Operation;
use bytes::Bytes;
use dashmap::DashSet;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;

/// How long a claim keeps trying (the owner busy, a NATS server lost and its streams
/// electing new leaders: 4 to 9 s with nats-server 2.9) before the CONNECT is refused.
const CLAIM_PATIENCE: Duration = Duration::from_secs(20);
const RELEASE: &str = "release";
const RELEASED: &str = "ok";
const BUSY: &[u8] = b"busy";

/// The client ids this node is claiming or handing over right now.
#[derive(Default)]
pub(super) struct Claims {
    busy: Arc<DashSet<ByteStr>>,
}

/// Held while this node works on a client id; frees it when dropped.
pub(super) struct Busy {
    busy: Arc<DashSet<ByteStr>>,
    client_id: ByteStr,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.busy.remove(&self.client_id);
    }
}

impl Claims {
    fn take(&self, client_id: &ByteStr) -> Option<Busy> {
        self.busy.insert(client_id.clone()).then(|| Busy {
            busy: self.busy.clone(),
            client_id: client_id.clone(),
        })
    }
}

/// Who owns a client id, as the owners bucket says.
pub(super) fn owner_value(node: &str, client_id: &str) -> Bytes {
    Bytes::from(format!("{node}\n{client_id}"))
}

/// The (node, client id) of an owners entry.
pub(super) fn parse_owner(value: &[u8]) -> Option<(&str, &str)> {
    std::str::from_utf8(value).ok()?.split_once('\n')
}

enum Attempt {
    Done,
    /// Someone else moved first, or the owner is busy: try again shortly.
    Again,
    Failed(String),
}

/// `Peers::claim`: makes this node the owner of `client_id`, its stored session loaded
/// into the broker. The returned guard keeps hand-over requests for the client id waiting
/// until the connection has opened the session.
pub(super) async fn claim(cluster: &Cluster, client_id: &ByteStr) -> Result<Claimed, String> {
    cluster.handover.begin_pending(client_id);
    let claimed = claim_from_owner(cluster, client_id).await;
    let broker = cluster.broker();
    cluster.handover.end_pending(client_id, |envelope| {
        if let (Ok(_), Some(broker)) = (&claimed, &broker) {
            inbox::forwarded(broker, cluster, envelope);
        } else {
            crate::metrics::dropped(crate::metrics::Dropped::QueueFull);
        }
    });
    claimed
}

async fn claim_from_owner(cluster: &Cluster, client_id: &ByteStr) -> Result<Claimed, String> {
    let mut delay = Duration::from_millis(5);
    let deadline = std::time::Instant::now() + CLAIM_PATIENCE;
    while std::time::Instant::now() < deadline {
        if let Some(busy) = cluster.claims.take(client_id) {
            match attempt(cluster, client_id).await {
                Attempt::Done => return Ok(Box::new(busy)),
                Attempt::Failed(e) => return Err(e),
                Attempt::Again => drop(busy),
            }
        }
        // Jitter, so that two nodes claiming from each other fall out of step.
        let jitter = Duration::from_micros(u64::from(rand_u16()) * 4);
        tokio::time::sleep(delay + jitter).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
    Err("the session could not be claimed in time (its node busy, or NATS unavailable)".into())
}

async fn attempt(cluster: &Cluster, client_id: &ByteStr) -> Attempt {
    let key = token(client_id);
    let entry = match cluster.owners.entry(key.clone()).await {
        Ok(e) => e,
        Err(e) => {
            tracing::debug!(%client_id, "reading the owner: {e}; trying again");
            return Attempt::Again;
        }
    };
    let (owner, revision) = match &entry {
        None => (None, 0),
        Some(e) if e.operation != Operation::Put => (None, e.revision),
        Some(e) => (
            parse_owner(&e.value).map(|(node, _)| node.to_owned()),
            e.revision,
        ),
    };
    // The hops the session made before coming here (handover.rs).
    let mut chain = Vec::new();
    if let Some(other) = owner.filter(|o| *o != cluster.node) {
        match ask_release(cluster, &other, client_id).await {
            Ok(Some(hops)) => chain = hops,
            Ok(None) => return Attempt::Again,
            Err(why) => {
                // Not answering: adopted once its heartbeat has stopped, then asked again.
                return match cluster.liveness.wait_gone(cluster, &other).await {
                    Ok(()) => Attempt::Again,
                    Err(e) => {
                        Attempt::Failed(format!("node {other} holds the session and {why}; {e}"))
                    }
                };
            }
        }
    }
    let value = owner_value(&cluster.node, client_id);
    let set = if entry.is_none() {
        cluster
            .owners
            .create(&key, value)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    } else {
        // Also when this node already owns it: a new revision makes a pending release of
        // an ended session (session_ended) fail.
        cluster
            .owners
            .update(&key, value, revision)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    };
    if let Err(e) = set {
        tracing::debug!(%client_id, "owner not set ({e}); trying again");
        return Attempt::Again;
    }
    let Some(broker) = cluster.broker() else {
        return Attempt::Failed("shutting down".into());
    };
    if broker.session(client_id).is_some() {
        return Attempt::Done;
    }
    match load(cluster, &broker, client_id, chain).await {
        Ok(()) => Attempt::Done,
        Err(e) => {
            // Owned here now: the next attempt finds it so and loads again.
            tracing::warn!(%client_id, "{e}; trying again");
            Attempt::Again
        }
    }
}

/// Loads the stored session of `client_id` (if any) into the broker, offline. It made the
/// hops `chain` before (none at start), whose nodes forward what still reaches them for
/// it.
pub(super) async fn load(
    cluster: &Cluster,
    broker: &Arc<crate::Broker>,
    client_id: &ByteStr,
    chain: Vec<Link>,
) -> Result<(), String> {
    let head = broker.config.session.max_queued_messages;
    let snapshot = cluster
        .store_dyn()
        .load_session(client_id, head)
        .await
        .map_err(|e| format!("loading the session: {e}"))?;
    if let Some(session) = snapshot {
        // Before the session is in the router: no direct delivery may come first.
        if let Some(last) = chain.last() {
            let hop = last.hop + 1;
            let filters = session.subscriptions.iter();
            let filters = filters.map(|(f, _)| f.to_string()).collect();
            let now = crate::clock::now();
            cluster.handover.arrive(client_id, hop, chain, filters, now);
        }
        let snapshot = Snapshot {
            sessions: vec![session],
            ..Snapshot::default()
        };
        crate::recovery::restore(broker, snapshot, crate::clock::now());
        tracing::debug!(%client_id, "session loaded from the cluster store");
    }
    Ok(())
}

/// Asks `node` to give up `client_id` to this node: Ok(Some(the session's hops so far))
/// once it has, Ok(None) if it is busy with it, Err if it does not answer.
async fn ask_release(
    cluster: &Cluster,
    node: &str,
    client_id: &ByteStr,
) -> Result<Option<Vec<Link>>, String> {
    let subject = cluster.names.control_subject(node);
    let payload = Bytes::from(format!("{RELEASE} {}\n{client_id}", cluster.node));
    let request = cluster.client.request(subject, payload);
    match tokio::time::timeout(cluster.config.takeover_timeout(), request).await {
        Ok(Ok(answer)) => Ok(parse_released(&answer.payload)),
        Ok(Err(e)) => Err(format!("does not answer ({e})")),
        Err(_) => Err("does not answer".into()),
    }
}

/// `ok\n<node>:<hop>:<ms left>,...`: the session's hops so far, the releasing node's
/// last; anything else is "busy".
fn parse_released(answer: &[u8]) -> Option<Vec<Link>> {
    let text = std::str::from_utf8(answer).ok()?;
    let (RELEASED, hops) = text.split_once('\n')? else {
        return None;
    };
    let now = crate::clock::now();
    let link = |l: &str| {
        let mut parts = l.split(':');
        let (node, hop, left) = (parts.next()?, parts.next()?, parts.next()?);
        Some(Link {
            node: Arc::from(node),
            hop: hop.parse().ok()?,
            until: now + Duration::from_millis(left.parse().ok()?),
        })
    };
    Some(hops.split(',').filter_map(link).collect())
}

fn format_released(chain: &[Link], now: std::time::Instant) -> Bytes {
    let hops: Vec<String> = chain
        .iter()
        .map(|l| {
            let left = l.until.saturating_duration_since(now).as_millis();
            format!("{}:{}:{left}", l.node, l.hop)
        })
        .collect();
    Bytes::from(format!("{RELEASED}\n{}", hops.join(",")))
}

/// `Peers::session_ended`: the owners entry goes, if this node still owns the client id
/// at the revision it reads (a new claim meanwhile bumps it).
pub(super) fn session_ended(cluster: &Cluster, client_id: &ByteStr) {
    let Some(broker) = cluster.broker() else {
        return;
    };
    let owners = cluster.owners.clone();
    let node = cluster.node.clone();
    let client_id = client_id.clone();
    broker.tasks.spawn(async move {
        let key = token(&client_id);
        let Ok(Some(entry)) = owners.entry(key.clone()).await else {
            return;
        };
        let mine = entry.operation == Operation::Put
            && parse_owner(&entry.value).is_some_and(|(n, _)| n == node);
        if mine {
            let _ = owners
                .delete_expect_revision(&key, Some(entry.revision))
                .await;
        }
    });
}

/// Answers the other nodes' hand-over requests on this node's control subject.
pub(super) async fn spawn_responder(
    broker: &Arc<crate::Broker>,
    cluster: &Arc<Cluster>,
) -> Result<(), super::ClusterError> {
    let mut requests = cluster
        .client
        .subscribe(cluster.names.control_subject(&cluster.node))
        .await
        .map_err(|e| super::ClusterError::Nats(format!("control subject: {e}")))?;
    let (b, c) = (broker.clone(), cluster.clone());
    broker.tasks.spawn(async move {
        loop {
            let next = tokio::select! {
                _ = b.shutdown.cancelled() => return,
                next = requests.next() => next,
            };
            let Some(request) = next else { return };
            let Some(reply) = request.reply.clone() else {
                continue;
            };
            let text = String::from_utf8_lossy(&request.payload).into_owned();
            let Some((head, client_id)) = text.split_once('\n') else {
                tracing::warn!("unknown control request; ignored");
                continue;
            };
            let Some((RELEASE, to)) = head.split_once(' ') else {
                tracing::warn!("unknown control request; ignored");
                continue;
            };
            let (client_id, to) = (ByteStr::from(client_id), to.to_owned());
            let (b, c) = (b.clone(), c.clone());
            b.clone().tasks.spawn(async move {
                let answer = release(&b, &c, &client_id, &to).await;
                let _ = c.client.publish(reply, answer).await;
            });
        }
    });
    Ok(())
}

/// Gives up `client_id` here for the node `to`, once its state is in JetStream; what
/// still reaches this node for it is forwarded there for a while (handover.rs). Answers
/// with the session's hops so far.
async fn release(
    broker: &crate::Broker,
    cluster: &Cluster,
    client_id: &ByteStr,
    to: &str,
) -> Bytes {
    let Some(_busy) = cluster.claims.take(client_id) else {
        return Bytes::from_static(BUSY);
    };
    let now = crate::clock::now();
    let mut chain = Vec::new();
    // No message routed here in between may find the session both gone and not departed.
    let leaving = cluster.handover.leaving();
    if let Some(session) = broker.session(client_id) {
        let filters =
            session.inspect(|s| s.subscriptions().keys().map(|f| f.to_string()).collect());
        let (me, interest) = (&cluster.node, &cluster.interest);
        chain = cluster
            .handover
            .depart(client_id, me, to, filters, interest, now);
    }
    let released = broker.release(client_id);
    drop(leaving);
    if released {
        tracing::info!(%client_id, to, "session handed over to another node");
    }
    if let Err(e) = broker.journal().barrier().await {
        tracing::error!(%client_id, "the session's state may not all be stored: {e}");
    }
    cluster.store.forget(&cluster.names, client_id);
    format_released(&chain, now)
}

/// A little randomness without a generator of our own.
fn rand_u16() -> u16 {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    u16::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hops_cross_in_the_answer() {
        let now = crate::clock::now();
        let chain = vec![
            Link {
                node: Arc::from("a"),
                hop: 4,
                until: now + Duration::from_millis(1500),
            },
            Link {
                node: Arc::from("node-b_2"),
                hop: 5,
                until: now + Duration::from_secs(10),
            },
        ];
        let back = parse_released(&format_released(&chain, now)).unwrap();
        assert_eq!(back.len(), 2);
        for (l, b) in chain.iter().zip(&back) {
            assert_eq!((&l.node, l.hop), (&b.node, b.hop));
            // Time left, read back on the asking node's clock.
            assert!(b.until >= l.until - Duration::from_millis(5));
        }
        assert_eq!(parse_released(b"ok\n"), Some(Vec::new()), "no hops");
        assert_eq!(parse_released(BUSY), None);
    }
}
