//! The disk store on real files: what is written comes back after a close, after a crash
//! (`kill -9` of a process that was told its batches were durable), after a torn journal
//! and after blocks of zeros; the in-memory store is the model it is compared with.
// A test reads best as one sequence of steps, however long.
#![allow(clippy::too_many_lines)]

mod common;

use common::rng::Rng;

use common::damage::{newest_journal, zero};

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ternmq::protocol::{ByteStr, Properties, QoS, SubOptions};
use ternmq::store::{
    Delivery, DiskStore, InflightEntry, InflightStage, MemStore, OnCorruption, Op,
    PersistenceConfig, Snapshot, Store, StoreError, StoredMessage, StoredSession,
    StoredSubscription, StoredWill, SyncMode,
};

fn config(dir: &Path, sync: SyncMode) -> PersistenceConfig {
    PersistenceConfig {
        dir: dir.to_path_buf(),
        sync,
        ..PersistenceConfig::default()
    }
}

fn message(id: u64, topic: &str, payload: usize) -> Arc<StoredMessage> {
    Arc::new(StoredMessage {
        id,
        topic: topic.into(),
        payload: Bytes::from(vec![(id % 251) as u8; payload]),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
        expires_at: None,
    })
}

fn delivery(m: &Arc<StoredMessage>) -> Delivery {
    Delivery {
        message: m.clone(),
        qos: QoS::AtLeastOnce,
        retain: false,
        subscription_ids: vec![],
    }
}

fn session(client: &str) -> Op {
    Op::PutSession {
        client_id: client.into(),
        session: StoredSession {
            expiry_interval: 3600,
            ..StoredSession::default()
        },
    }
}

fn enqueue(client: &str, seq: u64, m: &Arc<StoredMessage>) -> Op {
    Op::Enqueue {
        client_id: client.into(),
        seq,
        delivery: delivery(m),
    }
}

/// Every kind of record, with every field set.
fn rich_batch() -> Vec<Op> {
    let props = Properties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(120),
        content_type: Some("application/json".into()),
        response_topic: Some("reply/here".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01")),
        user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
        ..Properties::default()
    };
    let retained = Arc::new(StoredMessage {
        id: 0,
        topic: "site/1/state".into(),
        payload: Bytes::from_static(b"{\"on\":true}"),
        qos: QoS::ExactlyOnce,
        retain: true,
        properties: props.clone(),
        expires_at: Some(1_900_000_000_000),
    });
    let shared = Arc::new(StoredMessage {
        id: 10,
        topic: "cmd/all".into(),
        payload: Bytes::from_static(b"reboot"),
        qos: QoS::ExactlyOnce,
        properties: props.clone(),
        ..StoredMessage::default()
    });
    let will = StoredWill {
        message: Arc::new(StoredMessage {
            topic: "dead/d1".into(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties {
                will_delay_interval: Some(30),
                ..props
            },
            ..StoredMessage::default()
        }),
        publish_at: 1_800_000_000_000,
    };
    vec![
        Op::SetRetained(retained),
        Op::SetRetained(message(0, "site/2/state", 3)),
        Op::PutSession {
            client_id: "d1".into(),
            session: StoredSession {
                expiry_interval: u32::MAX,
                offline_since: Some(1_799_999_000_000),
                will: Some(will),
            },
        },
        session("d2"),
        Op::Subscribe {
            client_id: "d1".into(),
            filter: "cmd/#".into(),
            subscription: StoredSubscription {
                options: SubOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 2,
                },
                identifier: Some(77),
            },
        },
        Op::Subscribe {
            client_id: "d2".into(),
            filter: "cmd/+".into(),
            subscription: StoredSubscription::default(),
        },
        Op::Enqueue {
            client_id: "d1".into(),
            seq: 1,
            delivery: Delivery {
                message: shared.clone(),
                qos: QoS::ExactlyOnce,
                retain: false,
                subscription_ids: vec![77],
            },
        },
        enqueue("d2", 1, &shared),
        enqueue("d2", 2, &message(11, "cmd/d2", 100)),
        enqueue("d2", 3, &message(12, "cmd/d2", 100)),
        Op::PutInflight {
            client_id: "d1".into(),
            entry: InflightEntry {
                pkid: 5,
                order: 2,
                stage: InflightStage::Publish(delivery(&message(13, "cmd/d1", 10))),
            },
        },
        Op::PutInflight {
            client_id: "d1".into(),
            entry: InflightEntry {
                pkid: 4,
                order: 1,
                stage: InflightStage::PubRel,
            },
        },
        Op::PutIncoming {
            client_id: "d1".into(),
            pkid: 9,
        },
        Op::PutIncoming {
            client_id: "d1".into(),
            pkid: 3,
        },
    ]
}

async fn model(batches: &[Vec<Op>], queue_head: usize) -> Snapshot {
    let mem = MemStore::new();
    for b in batches {
        mem.submit(b.clone()).await.unwrap();
    }
    mem.load(queue_head).await.unwrap()
}

#[tokio::test]
async fn written_closed_reopened_everything_is_there() {
    let dir = tempfile::tempdir().unwrap();
    let batch = rich_batch();
    let store = DiskStore::open(&config(dir.path(), SyncMode::Always)).unwrap();
    assert!(store.recovery().is_clean());
    store.submit(batch.clone()).await.unwrap();
    store.close().await.unwrap();
    assert!(matches!(
        store.submit(vec![]).await,
        Err(StoreError::Closed)
    ));
    drop(store);

    let store = DiskStore::open(&config(dir.path(), SyncMode::Always)).unwrap();
    let mut snap = store.load(2).await.unwrap();
    assert!(snap.recovery.is_clean(), "{:?}", snap.recovery);
    // Session records, subscriptions, 4 queue and in-flight entries, 2 incoming, 4 messages, 2
    // retained, the version and the id high-water mark.
    assert_eq!(snap.recovery.recovered, 2 + 2 + 4 + 2 + 2 + 4 + 2 + 2);
    snap.recovery = Default::default();
    assert_eq!(snap, model(std::slice::from_ref(&batch), 2).await);
    assert_eq!(snap.max_message_id, 13);
    let d2 = &snap.sessions[1];
    assert_eq!((d2.queue.len(), d2.queued, d2.last_seq), (2, 3, 3));
    // The rest of the queue, read on demand; the shared message is one message.
    let rest = store.read_queue(&"d2".into(), 2, 10).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].seq, 3);
    assert_eq!(rest[0].delivery.message.id, 12);
    assert_eq!(
        snap.sessions[0].queue[0].delivery.message,
        d2.queue[0].delivery.message
    );
    store.close().await.unwrap();
}

/// Random batches over a few clients, with the bookkeeping the session code keeps (growing
/// sequence numbers, ids never reused, a session record before anything else).
fn random_batches(seed: u64, batches: usize) -> Vec<Vec<Op>> {
    let mut rng = Rng(seed);
    let clients = ["a", "b", "ab", "c"];
    let mut next_seq = [1u64; 4];
    let mut stored = [false; 4];
    let mut next_id = 1u64;
    let mut out = Vec::new();
    for _ in 0..batches {
        let mut ops = Vec::new();
        for _ in 0..rng.below(12) + 1 {
            let ci = rng.below(4) as usize;
            let c = clients[ci];
            if !stored[ci] {
                stored[ci] = true;
                ops.push(session(c));
                continue;
            }
            let op = match rng.below(14) {
                0 => session(c),
                1 => {
                    next_seq[ci] = 1;
                    stored[ci] = false;
                    Op::DeleteSession {
                        client_id: c.into(),
                    }
                }
                2 => Op::Subscribe {
                    client_id: c.into(),
                    filter: format!("f/{}", rng.below(3)).into(),
                    subscription: StoredSubscription::default(),
                },
                3 => Op::Unsubscribe {
                    client_id: c.into(),
                    filter: format!("f/{}", rng.below(3)).into(),
                },
                4..=6 => {
                    next_id += 1;
                    let m = message(next_id, "t", rng.below(200) as usize);
                    next_seq[ci] += 1;
                    // Sometimes the same message to a second client.
                    let cj = (ci + 1) % 4;
                    if rng.below(3) == 0 && stored[cj] {
                        next_seq[cj] += 1;
                        ops.push(enqueue(clients[cj], next_seq[cj], &m));
                    }
                    enqueue(c, next_seq[ci], &m)
                }
                7 | 8 => Op::Dequeue {
                    client_id: c.into(),
                    seq: next_seq[ci].saturating_sub(rng.below(4)),
                },
                9 => {
                    next_id += 1;
                    Op::PutInflight {
                        client_id: c.into(),
                        entry: InflightEntry {
                            pkid: rng.below(4) as u16 + 1,
                            order: rng.below(100),
                            stage: if rng.below(3) == 0 {
                                InflightStage::PubRel
                            } else {
                                InflightStage::Publish(delivery(&message(next_id, "i", 20)))
                            },
                        },
                    }
                }
                10 => Op::DeleteInflight {
                    client_id: c.into(),
                    pkid: rng.below(4) as u16 + 1,
                },
                11 => Op::PutIncoming {
                    client_id: c.into(),
                    pkid: rng.below(4) as u16 + 1,
                },
                12 => Op::DeleteIncoming {
                    client_id: c.into(),
                    pkid: rng.below(4) as u16 + 1,
                },
                _ => {
                    let topic = format!("r/{}", rng.below(5));
                    if rng.below(2) == 0 {
                        Op::SetRetained(message(0, &topic, 5))
                    } else {
                        Op::ClearRetained {
                            topic: topic.into(),
                        }
                    }
                }
            };
            ops.push(op);
        }
        out.push(ops);
    }
    out
}

/// Inflight entries of equal order may come in either order; the rest must match exactly.
fn normalized(mut s: Snapshot) -> Snapshot {
    for session in &mut s.sessions {
        session.inflight.sort_by_key(|e| (e.order, e.pkid));
    }
    s.max_message_id = 0;
    s.recovery = Default::default();
    s
}

#[tokio::test]
async fn random_ops_match_the_in_memory_model_across_restarts() {
    for seed in [1, 2, 3, 0x5EED] {
        let dir = tempfile::tempdir().unwrap();
        let batches = random_batches(seed, 60);
        let mut store = DiskStore::open(&config(dir.path(), SyncMode::Never)).unwrap();
        for (i, b) in batches.iter().enumerate() {
            // Unawaited submits: the writer gathers several into one commit.
            drop(store.submit(b.clone()));
            if i % 20 == 19 {
                store.close().await.unwrap();
                drop(store);
                store = DiskStore::open(&config(dir.path(), SyncMode::Never)).unwrap();
                let got = store.load(3).await.unwrap();
                assert!(got.recovery.is_clean(), "{:?}", got.recovery);
                assert_eq!(
                    normalized(got),
                    normalized(model(&batches[..=i], 3).await),
                    "seed {seed}, after batch {i}"
                );
            }
        }
        let mem = MemStore::new();
        for b in &batches {
            mem.submit(b.clone()).await.unwrap();
        }
        for c in ["a", "b", "ab", "c"] {
            let c: ByteStr = c.into();
            assert_eq!(
                store.read_queue(&c, 1, 1000).await.unwrap(),
                mem.read_queue(&c, 1, 1000).await.unwrap()
            );
        }
        store.close().await.unwrap();
    }
}

#[tokio::test]
async fn a_second_broker_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(&config(dir.path(), SyncMode::Never)).unwrap();
    let err = DiskStore::open(&config(dir.path(), SyncMode::Never))
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    store.close().await.unwrap();
    drop(store);
    DiskStore::open(&config(dir.path(), SyncMode::Never)).unwrap();
}

#[tokio::test]
async fn concurrent_submits_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DiskStore::open(&config(dir.path(), SyncMode::Always)).unwrap());
    store.submit(vec![session("c")]).await.unwrap();
    let before = store.commits();
    let mut tasks = Vec::new();
    for t in 0..20u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10u64 {
                let seq = t * 100 + i + 1;
                store
                    .submit(vec![enqueue("c", seq, &message(seq, "t", 100))])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let commits = store.commits() - before;
    assert!(commits < 200, "200 submits took {commits} commits");
    let snap = store.load(usize::MAX).await.unwrap();
    assert_eq!(snap.sessions[0].queued, 200);
    store.close().await.unwrap();
}

#[tokio::test]
async fn past_the_disk_budget_there_is_no_room() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(&PersistenceConfig {
        max_disk_bytes: 1 << 20,
        ..config(dir.path(), SyncMode::Interval)
    })
    .unwrap();
    assert!(store.has_room());
    store.submit(vec![session("c")]).await.unwrap();
    // Random payloads: the engine compresses, and 2.5 MiB of one byte repeated is nothing.
    let mut rng = Rng(0xB0D6E7);
    for seq in 1..=40 {
        let mut m = (*message(seq, "t", 0)).clone();
        m.payload = (0..64 << 10).map(|_| rng.below(256) as u8).collect();
        store
            .submit(vec![enqueue("c", seq, &Arc::new(m))])
            .await
            .unwrap();
    }
    // Disk usage is measured by the store's thread from time to time.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.has_room() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!store.has_room(), "2.5 MiB stored under a 1 MiB budget");
    store.close().await.unwrap();
}

// ---- crashes and damage ----

const CHILD_DIR: &str = "TERNMQ_STORE_TEST_DIR";
const CHILD_COUNT: &str = "TERNMQ_STORE_TEST_COUNT";

/// The process the crash tests kill: enqueues numbered messages, one durable batch each, and
/// prints each number once its batch is durable. With a count, exits after it without
/// closing the store, as a crash would.
#[test]
#[ignore = "run by the crash tests as a child process"]
fn child_writer() {
    let dir = PathBuf::from(std::env::var(CHILD_DIR).expect("dir"));
    let count: u64 = std::env::var(CHILD_COUNT)
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(u64::MAX);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = DiskStore::open(&config(&dir, SyncMode::Always)).unwrap();
        store.submit(vec![session("c")]).await.unwrap();
        let mut out = std::io::stdout();
        for seq in 1..=count {
            store
                .submit(vec![enqueue("c", seq, &message(seq, "t", 100))])
                .await
                .unwrap();
            writeln!(out, "{seq}").unwrap();
            out.flush().unwrap();
        }
        std::process::exit(0);
    });
}

fn spawn_child(dir: &Path, count: Option<u64>) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--ignored",
        "--exact",
        "child_writer",
        "--nocapture",
        "--quiet",
    ])
    .env(CHILD_DIR, dir)
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if let Some(n) = count {
        cmd.env(CHILD_COUNT, n.to_string());
    }
    cmd.spawn().unwrap()
}

/// The numbers a child printed (its lines that are numbers); with `kill_after`, the child is
/// killed that long after its first number.
fn acknowledged(child: &mut std::process::Child, kill_after: Option<Duration>) -> Vec<u64> {
    let stdout = child.stdout.take().unwrap();
    let (started, first) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut seqs = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(seq) = line.trim().parse::<u64>() {
                if seqs.is_empty() {
                    let _ = started.send(());
                }
                seqs.push(seq);
            }
        }
        seqs
    });
    if let Some(after) = kill_after {
        // Bounded: a child that never writes fails the test below rather than hanging it.
        let _ = first.recv_timeout(Duration::from_secs(30));
        std::thread::sleep(after);
        child.kill().unwrap(); // SIGKILL
    }
    child.wait().unwrap();
    reader.join().unwrap()
}

async fn queued_seqs(dir: &Path) -> (Vec<u64>, Snapshot) {
    let store = DiskStore::open(&config(dir, SyncMode::Always)).unwrap();
    let snap = store.load(usize::MAX).await.unwrap();
    store.close().await.unwrap();
    let seqs = snap
        .sessions
        .iter()
        .find(|s| s.client_id == "c")
        .map(|s| s.queue.iter().map(|e| e.seq).collect())
        .unwrap_or_default();
    (seqs, snap)
}

#[tokio::test]
async fn kill_9_loses_nothing_that_was_durable() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let mut rng = Rng(seed | 1);
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let mut child = spawn_child(dir.path(), None);
        // Kill at a random moment, once the child has started writing.
        let kill_after = Duration::from_millis(50 + rng.below(700));
        let acked = acknowledged(&mut child, Some(kill_after));
        assert!(
            !acked.is_empty(),
            "round {round}: the child wrote nothing in {kill_after:?}"
        );
        let (stored, snap) = queued_seqs(dir.path()).await;
        assert_eq!(snap.recovery.skipped, 0, "{:?}", snap.recovery);
        for seq in &acked {
            assert!(
                stored.binary_search(seq).is_ok(),
                "round {round}: message {seq} was durable, then lost (stored up to {:?})",
                stored.last()
            );
        }
    }
}

#[tokio::test]
async fn a_torn_journal_tail_is_cut_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_child(dir.path(), Some(50));
    let acked = acknowledged(&mut child, None);
    assert_eq!(acked, (1..=50).collect::<Vec<_>>());
    // Cut the newest journal in the middle of its last record.
    let (journal, end) = newest_journal(dir.path());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .unwrap();
    f.set_len(end - 20).unwrap();
    drop(f);
    let torn = std::fs::read(&journal).unwrap();

    for on_corruption in [OnCorruption::Stop, OnCorruption::Recover] {
        // A torn tail after a crash is what a crash leaves: both modes start.
        let store = DiskStore::open(&PersistenceConfig {
            on_corruption,
            ..config(dir.path(), SyncMode::Always)
        })
        .unwrap();
        let snap = store.load(usize::MAX).await.unwrap();
        store.close().await.unwrap();
        drop(store);
        let seqs: Vec<u64> = snap.sessions[0].queue.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=49).collect::<Vec<_>>(), "{on_corruption:?}");
        if on_corruption == OnCorruption::Stop {
            assert!(
                snap.recovery.discarded_tail_bytes > 0,
                "{:?}",
                snap.recovery
            );
            // What was cut is kept: the journal as it was (its data: up to its last byte
            // that is not zero).
            let kept = snap.recovery.journals_kept.as_ref().expect("journals kept");
            let copy = std::fs::read(kept.join(journal.file_name().unwrap())).unwrap();
            let (data, zeros) = torn.split_at(copy.len());
            assert!(copy == data && zeros.iter().all(|&b| b == 0));
        }
        assert_eq!(snap.recovery.skipped, 0);
    }
}

#[tokio::test]
async fn zeros_in_the_journal_after_a_clean_shutdown_are_damage() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(&config(dir.path(), SyncMode::Always)).unwrap();
    store.submit(vec![session("c")]).await.unwrap();
    // One commit each, so that the damage lands among them.
    for seq in 1..=60 {
        store
            .submit(vec![enqueue("c", seq, &message(seq, "t", 100))])
            .await
            .unwrap();
    }
    store.close().await.unwrap();
    drop(store);
    let (journal, end) = newest_journal(dir.path());
    zero(&journal, end / 2, 4096);
    let damaged = std::fs::read(&journal).unwrap();

    let stop = PersistenceConfig {
        on_corruption: OnCorruption::Stop,
        ..config(dir.path(), SyncMode::Always)
    };
    let err = DiskStore::open(&stop).err().unwrap();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(
        err.to_string().contains("db"),
        "the error names the store: {err}"
    );
    // fjall cut the journal while opening it; "stop" put it back as it was.
    assert!(
        std::fs::read(&journal).unwrap() == damaged,
        "the journal as it was"
    );
    // And it stays refused: the damage is still there.
    assert!(matches!(
        DiskStore::open(&stop),
        Err(StoreError::Corrupt { .. })
    ));
    assert!(std::fs::read(&journal).unwrap() == damaged);
    let entries = |prefix: &str| {
        std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .count()
    };
    assert_eq!(entries("journal.cut-") + entries("db.journals"), 0);

    let store = DiskStore::open(&config(dir.path(), SyncMode::Always)).unwrap();
    let snap = store.load(usize::MAX).await.unwrap();
    store.close().await.unwrap();
    // The damaged journal is kept, byte for byte up to where its data ended.
    let kept = snap.recovery.journals_kept.as_ref().expect("journals kept");
    assert!(kept
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("journal.cut-"));
    let copy = std::fs::read(kept.join(journal.file_name().unwrap())).unwrap();
    assert!(copy == damaged[..end as usize], "the damaged bytes, kept");
    let queued = snap.sessions[0].queue.len();
    assert!(queued > 0 && queued < 60, "{queued} of 60 recovered");
    // What was read is a prefix of what was written.
    let seqs: Vec<u64> = snap.sessions[0].queue.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=queued as u64).collect::<Vec<_>>());
}

/// Table files (under db/keyspaces/) and their sizes.
fn table_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    fn walk(p: &Path, out: &mut Vec<(PathBuf, u64)>) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.parent().is_some_and(|d| d.ends_with("tables")) {
                out.push((path.clone(), e.metadata().unwrap().len()));
            }
        }
    }
    let mut out = Vec::new();
    walk(&dir.join("db"), &mut out);
    out
}

#[tokio::test]
async fn zeros_in_a_table_file_stop_or_recover() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(&config(dir.path(), SyncMode::Never)).unwrap();
    // Enough to fill memtables, so the data sits in table files: 400 sessions, 40 KiB each.
    for s in 0..400u64 {
        let c = format!("client-{s:04}");
        drop(store.submit(vec![
            session(&c),
            enqueue(&c, 1, &message(s + 1, "t", 40 << 10)),
        ]));
    }
    store.close().await.unwrap();
    drop(store);
    let deadline = Instant::now() + Duration::from_secs(10);
    while table_files(dir.path()).iter().map(|t| t.1).sum::<u64>() < (8 << 20) {
        assert!(Instant::now() < deadline, "no table files written");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (table, len) = table_files(dir.path())
        .into_iter()
        .max_by_key(|t| t.1)
        .unwrap();
    zero(&table, len / 2, 4096);

    let err = DiskStore::open(&PersistenceConfig {
        on_corruption: OnCorruption::Stop,
        ..config(dir.path(), SyncMode::Never)
    })
    .err()
    .unwrap();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("on_corruption"), "{err}");

    let store = DiskStore::open(&config(dir.path(), SyncMode::Never)).unwrap();
    let snap = store.load(usize::MAX).await.unwrap();
    let r = &snap.recovery;
    let aside = r
        .moved_aside
        .clone()
        .expect("the damaged store is moved aside");
    assert!(
        aside.exists()
            && aside
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("db.corrupt-")
    );
    // The records in the zeroed block are lost (with what referenced them); the rest is there.
    let sessions = snap.sessions.len();
    let queued: usize = snap.sessions.iter().map(|s| s.queue.len()).sum();
    assert!(
        sessions > 300 && queued > 300 && queued < 400,
        "{sessions} sessions, {queued} queued of 400; {r:?}"
    );
    assert!(r.recovered > 0 && r.skipped > 0, "{r:?}");
    for s in &snap.sessions {
        assert_eq!(s.queued as usize, s.queue.len(), "{}", s.client_id);
    }
    store.close().await.unwrap();
    drop(store);

    // The fresh store is sound: the next start finds nothing wrong.
    let store = DiskStore::open(&PersistenceConfig {
        on_corruption: OnCorruption::Stop,
        ..config(dir.path(), SyncMode::Never)
    })
    .unwrap();
    let again = store.load(usize::MAX).await.unwrap();
    assert!(again.recovery.is_clean(), "{:?}", again.recovery);
    assert_eq!(again.sessions.len(), sessions);
    store.close().await.unwrap();
}
