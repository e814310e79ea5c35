//! The JetStream calls the cluster makes besides plain publishes: reading the last record
//! of every subject under a filter, the stream and bucket set-up.

use super::names::Names;
use super::ClusterError;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::Context;
use bytes::Bytes;
use futures_util::StreamExt;
use std::time::Duration;

/// How long a KV bucket of the cluster keeps a node's heartbeat: long past the node
/// timeout, so that a node that was never seen alive is not mistaken for a fresh one.
const HEARTBEAT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// How long a node keeps trying a JetStream call at start: streams made a moment ago
/// by another node elect their leaders first.
const START_PATIENCE: Duration = Duration::from_secs(20);

/// Runs `f` until it succeeds or `START_PATIENCE` is over (then its last error).
pub(super) async fn patiently<T, F, Fut>(mut f: F) -> Result<T, ClusterError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClusterError>>,
{
    let deadline = std::time::Instant::now() + START_PATIENCE;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            // Trying again would not change the answer.
            Err(e @ ClusterError::Refused(_)) => return Err(e),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(e) => {
                tracing::debug!("cluster start: {e}; trying again");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// The last message of every subject matching `filter` in `stream`, as `(subject,
/// payload)`, in stream order: an ephemeral consumer that delivers the last message per
/// subject, read up to what was pending when it was made.
pub(super) async fn last_per_subject(
    js: &Context,
    stream: &str,
    filter: &str,
) -> Result<Vec<(String, Bytes)>, ClusterError> {
    let e = |what: &str, err: &dyn std::fmt::Display| {
        ClusterError::Nats(format!("reading {filter} from {stream}: {what}: {err}"))
    };
    let stream = js
        .get_stream_no_info(stream)
        .await
        .map_err(|err| e("stream", &err))?;
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::LastPerSubject,
            filter_subject: filter.into(),
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .map_err(|err| e("consumer", &err))?;
    let pending = consumer.cached_info().num_pending as usize;
    let name = consumer.cached_info().name.clone();
    let mut out = Vec::with_capacity(pending);
    while out.len() < pending {
        let mut batch = consumer
            .fetch()
            .max_messages((pending - out.len()).min(1000))
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .map_err(|err| e("fetch", &err))?;
        let before = out.len();
        while let Some(message) = batch.next().await {
            let message = message.map_err(|err| e("message", &err))?;
            out.push((message.subject.to_string(), message.payload.clone()));
        }
        if out.len() == before {
            return Err(e("fetch", &"fewer messages than pending"));
        }
    }
    // It would go by itself after its inactive threshold; this spares the servers.
    let _ = stream.delete_consumer(&name).await;
    Ok(out)
}

/// Makes the streams and buckets of the cluster (or finds them as made by another node).
pub(super) async fn set_up(
    js: &Context,
    names: &Names,
    replicas: usize,
) -> Result<(), ClusterError> {
    let e = |what: String| {
        move |err: &dyn std::fmt::Display| ClusterError::Nats(format!("{what}: {err}"))
    };
    js.get_or_create_stream(Config {
        name: names.messages_stream(),
        subjects: vec![names.messages_subjects()],
        // A message leaves the stream once the node it was sent to has it in its sessions.
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|err| e(format!("stream {}", names.messages_stream()))(&err))?;
    js.get_or_create_stream(Config {
        name: names.state_stream(),
        subjects: vec![names.state_subjects()],
        max_messages_per_subject: 1,
        discard: DiscardPolicy::Old,
        storage: StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|err| e(format!("stream {}", names.state_stream()))(&err))?;
    // KV buckets made as their streams: the client's own bucket creation first asks
    // for the account's limits in a form nats-server 2.9 does not answer.
    for (bucket, max_age) in [
        (names.interest_bucket(), Duration::ZERO),
        (names.retained_bucket(), Duration::ZERO),
        (names.owners_bucket(), Duration::ZERO),
        (names.nodes_bucket(), HEARTBEAT_MAX_AGE),
    ] {
        let stream = format!("KV_{bucket}");
        js.get_or_create_stream(Config {
            name: stream.clone(),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age,
            storage: StorageType::File,
            num_replicas: replicas,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(|err| e(format!("bucket {bucket}"))(&err))?;
    }
    Ok(())
}
