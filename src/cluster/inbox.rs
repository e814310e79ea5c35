//! The messages other nodes send to this one, into its sessions: QoS 0 from a core NATS
//! subscription, QoS 1/2 from this node's durable consumer on the messages stream. A
//! QoS 1/2 message is acknowledged to JetStream only once it is in the sessions here and
//! what they stored of it is written (a barrier on the store), so a node that dies before
//! leaves it in the stream for whoever adopts the node's consumer.
//!
//! A received message is routed into this node's own sessions only (plain subscriptions,
//! or the one member of a shared group the sender picked): never out again.

use super::wire::{self, Envelope};
use super::{Cluster, ClusterError};
use crate::broker::Broker;
use crate::message::{Message, SharedKey};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::Message as JsMessage;
use futures_util::{FutureExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;

/// Messages routed before one store barrier and their acknowledgements.
const BATCH: usize = 256;

pub(super) async fn spawn(
    broker: &Arc<Broker>,
    cluster: &Arc<Cluster>,
) -> Result<(), ClusterError> {
    let nats = |e: &dyn std::fmt::Display| ClusterError::Nats(format!("inbox: {e}"));
    let consumer = fresh_consumer(cluster, &cluster.node, false).await?;
    let mut live = cluster
        .client
        .subscribe(cluster.names.live_subject(&cluster.node))
        .await
        .map_err(|e| nats(&e))?;
    let (b, c) = (broker.clone(), cluster.clone());
    broker.tasks.spawn(async move {
        loop {
            let next = tokio::select! {
                _ = b.shutdown.cancelled() => return,
                next = live.next() => next,
            };
            let Some(message) = next else { return };
            each_envelope(&message.payload, |envelope| {
                deliver(&b, &c, envelope);
            });
        }
    });
    let (b, c) = (broker.clone(), cluster.clone());
    broker.tasks.spawn(async move {
        let deliver = |envelope: Envelope| {
            deliver(&b, &c, envelope);
        };
        consume(&b, consumer, &deliver, None).await;
    });
    Ok(())
}

/// The durable consumer of `node`'s messages, made afresh (for its `adopter`, under the
/// adopter's name): no instance of `node` runs (this one starts, or adopts it), and no
/// adoption of it either (`liveness` waits it out). Messages the old consumers handed to
/// a pull of a node that died would wait out their ack wait (a minute) there; the stream
/// is a work queue, so what it holds for `node` is exactly what no one acknowledged, and
/// the new consumer has all of it at once. (A message the dead node had taken into its
/// sessions but not yet acknowledged comes again: at least once across a crash.)
pub(super) async fn fresh_consumer(
    cluster: &Cluster,
    node: &str,
    adopter: bool,
) -> Result<PullConsumer, ClusterError> {
    let names = &cluster.names;
    let stream = cluster
        .js
        .get_stream_no_info(names.messages_stream())
        .await
        .map_err(|e| ClusterError::Nats(format!("messages stream: {e}")))?;
    // A work queue takes one consumer per subject: the node's own, or an adopter's
    // (one that died in the middle leaves its consumer behind).
    for old in [names.consumer(node), names.adopter_consumer(node)] {
        match stream.delete_consumer(&old).await {
            Ok(_) => {}
            Err(e)
                if matches!(e.kind(), ConsumerErrorKind::JetStream(ref j)
                    if j.error_code() == ErrorCode::CONSUMER_NOT_FOUND) => {}
            Err(e) => return Err(ClusterError::Nats(format!("consumer {old}: {e}"))),
        }
    }
    let name = match adopter {
        false => names.consumer(node),
        true => names.adopter_consumer(node),
    };
    stream
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: cluster.names.node_subject(node),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(60),
                max_ack_pending: 10_000,
                num_replicas: cluster.config.replicas,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| ClusterError::Nats(format!("consumer {name}: {e}")))
}

/// Takes messages from `consumer` until shutdown (or, with `idle`, until none came for
/// that long): each batch is handed to `deliver`, made durable, then acknowledged.
pub(super) async fn consume(
    broker: &Arc<Broker>,
    consumer: PullConsumer,
    deliver: &(dyn Fn(Envelope) + Sync),
    idle: Option<Duration>,
) {
    loop {
        // Short pull requests with heartbeats: a pull lost with a NATS server is noticed
        // within seconds, and made again on another.
        let pull = consumer
            .stream()
            .max_messages_per_batch(BATCH)
            .expires(Duration::from_secs(5))
            .heartbeat(Duration::from_secs(1))
            .messages();
        let mut messages = match pull.await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("cannot take messages from the stream: {e}; trying again");
                tokio::select! {
                    _ = broker.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        loop {
            let wait = idle.unwrap_or(Duration::from_secs(365 * 24 * 3600));
            let first = tokio::select! {
                _ = broker.shutdown.cancelled() => return,
                next = tokio::time::timeout(wait, messages.next()) => match next {
                    Err(_) => return,
                    Ok(next) => next,
                },
            };
            let mut batch: Vec<JsMessage> = Vec::new();
            match first {
                Some(Ok(m)) => batch.push(m),
                Some(Err(e)) => {
                    // Missed heartbeats, a lost server: pull again, afresh.
                    tracing::debug!("stream consumer: {e}; pulling again");
                    break;
                }
                None => break,
            }
            while batch.len() < BATCH {
                match messages.next().now_or_never() {
                    Some(Some(Ok(m))) => batch.push(m),
                    _ => break,
                }
            }
            for m in &batch {
                each_envelope(&m.payload, deliver);
            }
            if let Err(e) = broker.journal().barrier().await {
                // Not acknowledged: JetStream sends them again after the ack wait.
                tracing::error!("the cluster store failed: {e}; messages will come again");
                continue;
            }
            for m in &batch {
                if let Err(e) = m.ack().await {
                    tracing::debug!("acknowledging to JetStream: {e}");
                }
            }
        }
    }
}

/// Each message of what one NATS or JetStream message carried (a batch, or one), to `f`;
/// what cannot be read is dropped with a warning.
fn each_envelope(payload: &[u8], mut f: impl FnMut(Envelope)) {
    let frames = match wire::split(payload) {
        Ok(frames) => frames,
        Err(e) => return tracing::warn!("messages from another node dropped: {e}"),
    };
    for frame in frames {
        match wire::decode(frame) {
            Ok(envelope) => f(envelope),
            Err(e) => tracing::warn!("message from another node dropped: {e}"),
        }
    }
}

/// A message from another node into this node's sessions.
pub(super) fn deliver(broker: &Broker, cluster: &Cluster, envelope: Envelope) -> usize {
    if let Some((client_id, _)) = envelope.to.clone() {
        return match cluster.handover.hold(&client_id, envelope) {
            // Its session is being claimed here: delivered once it is in.
            None => 0,
            Some(envelope) => forwarded(broker, cluster, envelope),
        };
    }
    let message = restore(broker, &envelope);
    match envelope.shared {
        None => {
            // Here, from its origin, and to the other nodes its frame names.
            let went = |n: &str| {
                n == cluster.node() || n == envelope.origin || envelope.via.iter().any(|v| v == n)
            };
            cluster.route_here(broker, &message, &went)
        }
        Some((group, filter)) => deliver_shared(broker, cluster, &message, &group, &filter),
    }
}

/// A message forwarded by a node a session left (handover.rs): to that session alone
/// if it is here, else on along its hops.
pub(super) fn forwarded(broker: &Broker, cluster: &Cluster, envelope: Envelope) -> usize {
    let Some((client_id, hop)) = &envelope.to else {
        return 0;
    };
    let message = restore(broker, &envelope);
    if let Some((group, filter)) = &envelope.shared {
        // To one member of the group: any member here will do.
        return deliver_shared(broker, cluster, &message, group, filter);
    }
    if let Some(session) = broker.session(client_id) {
        let id = session.id;
        return broker.router.publish_plain_if(&message, |s| s.id == id);
    }
    match cluster.handover.next(client_id, *hop) {
        Some(node) => {
            let to = (&**client_id, hop + 1);
            usize::from(cluster.forward(broker, &message, &node, to, None))
        }
        None => {
            // The session ended meanwhile (a clean start, an expiry).
            tracing::debug!(%client_id, "a message forwarded for a session no longer here");
            0
        }
    }
}

fn restore(broker: &Broker, envelope: &Envelope) -> Arc<Message> {
    let now = crate::clock::now();
    Arc::new(broker.journal().restore_message(&envelope.message, now))
}

fn deliver_shared(
    broker: &Broker,
    cluster: &Cluster,
    message: &Arc<Message>,
    group: &str,
    filter: &str,
) -> usize {
    let key = Arc::new(SharedKey {
        group: Box::from(group),
        filter: Box::from(filter),
    });
    let taken = cluster.deliver_shared_here(broker, message, key);
    if !taken {
        crate::metrics::dropped(crate::metrics::Dropped::QueueFull);
    }
    usize::from(taken)
}
