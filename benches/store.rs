//! The persistence engines side by side (docs/persistence.md): fjall and redb on the broker's
//! workload, then ternmq's own store (fjall behind the `Store` trait, group commit included).
//!
//!     cargo bench --bench store            # full sizes (~2 min)
//!     cargo test --bench store             # small sizes: a smoke test of the same code
//!
//! Workload: enqueue/dequeue of ~100-byte messages for many sessions (a message record and a
//! queue entry put, later both deleted), written in commits of `BATCH` messages as group
//! commit produces them; recovery of 100,000 retained messages and 10,000 sessions with 10
//! queued messages each; the damage a power cut leaves (a torn tail, a block of zeros).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ternmq::protocol::{ByteStr, Properties, QoS};
use ternmq::store::{
    Delivery, DiskStore, Op, PersistenceConfig, Store, StoredMessage, StoredSession, SyncMode,
};

/// Sizes: the full run, or the smoke test under `cargo test`.
struct Sizes {
    sessions: u64,
    /// Messages enqueued (and dequeued) per throughput run.
    messages: u64,
    retained: u64,
    /// Sessions with queued messages for the recovery run, 10 messages each.
    recovery_sessions: u64,
}

const FULL: Sizes = Sizes {
    sessions: 2_000,
    messages: 200_000,
    retained: 100_000,
    recovery_sessions: 10_000,
};

const SMOKE: Sizes = Sizes {
    sessions: 50,
    messages: 500,
    retained: 1_000,
    recovery_sessions: 100,
};

/// Messages per commit: what group commit gathers from a busy broker.
const BATCH: u64 = 64;
/// Commits a message stays queued before it is dequeued (the queue's depth, in batches).
const LAG: u64 = 16;
const PAYLOAD: usize = 100;
/// The `interval` mode of the raw comparison: one fsync per this much time.
const INTERVAL: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sync {
    Always,
    Interval,
    Never,
}

/// The tables of the store's layout.
#[derive(Clone, Copy)]
enum Table {
    Messages = 0,
    Queue = 1,
    Retained = 2,
}

const TABLES: [&str; 3] = ["messages", "queue", "retained"];

/// (table, key, Some(value) to put or None to delete)
type Change = (Table, Vec<u8>, Option<Vec<u8>>);

/// One engine, driven with the store's write pattern.
trait Engine: Sized {
    const NAME: &'static str;
    fn open(dir: &Path) -> Result<Self, String>;
    /// Writes the changes as one atomic commit, made durable before returning if `sync`.
    fn commit(&mut self, changes: &[Change], sync: bool);
    /// Makes every earlier commit durable.
    fn sync(&mut self);
    /// Reads every record of every table: (records read, read errors).
    fn scan(&self) -> (u64, u64);
    /// Moves what the log holds into the tables (fjall: memtables to table files).
    fn flush(&mut self) {}
    /// The file written last, where a crash tears the tail.
    fn log_file(dir: &Path) -> PathBuf;
    /// The file holding most of the data once flushed.
    fn table_file(dir: &Path) -> PathBuf;
    fn close(self);
}

struct Fjall {
    db: fjall::Database,
    tables: Vec<fjall::Keyspace>,
}

impl Engine for Fjall {
    const NAME: &'static str = "fjall";

    fn open(dir: &Path) -> Result<Self, String> {
        let db = fjall::Database::builder(dir)
            .manual_journal_persist(true)
            .open()
            .map_err(|e| format!("{e:?}"))?;
        let tables = TABLES
            .iter()
            .map(|name| db.keyspace(name, fjall::KeyspaceCreateOptions::default))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{e:?}"))?;
        Ok(Fjall { db, tables })
    }

    fn commit(&mut self, changes: &[Change], sync: bool) {
        let mut batch = self.db.batch();
        if sync {
            batch = batch.durability(Some(fjall::PersistMode::SyncData));
        }
        for (table, key, value) in changes {
            let ks = &self.tables[*table as usize];
            match value {
                Some(v) => batch.insert(ks, key.as_slice(), v.as_slice()),
                None => batch.remove(ks, key.as_slice()),
            }
        }
        batch.commit().expect("fjall commit");
        if !sync {
            // Into the OS buffers, as `interval` and `never` do between fsyncs.
            self.db
                .persist(fjall::PersistMode::Buffer)
                .expect("fjall write");
        }
    }

    fn sync(&mut self) {
        self.db
            .persist(fjall::PersistMode::SyncData)
            .expect("fjall sync");
    }

    fn scan(&self) -> (u64, u64) {
        let (mut ok, mut bad) = (0, 0);
        for ks in &self.tables {
            for item in ks.iter() {
                match item.into_inner() {
                    Ok(_) => ok += 1,
                    Err(_) => bad += 1,
                }
            }
        }
        (ok, bad)
    }

    fn flush(&mut self) {
        for ks in &self.tables {
            ks.rotate_memtable_and_wait().expect("fjall flush");
        }
    }

    fn log_file(dir: &Path) -> PathBuf {
        let mut all = Vec::new();
        files(dir, &mut all);
        all.into_iter()
            .map(|(p, _)| p)
            .filter(|p| p.extension().is_some_and(|e| e == "jnl"))
            .max_by_key(|p| {
                p.file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(|s| s.parse::<u64>().ok())
            })
            .expect("a journal")
    }

    fn table_file(dir: &Path) -> PathBuf {
        let mut all = Vec::new();
        files(dir, &mut all);
        all.into_iter()
            .filter(|(p, _)| p.parent().is_some_and(|d| d.ends_with("tables")))
            .max_by_key(|(_, m)| m.len())
            .map(|(p, _)| p)
            .expect("a table file")
    }

    fn close(self) {
        self.db
            .persist(fjall::PersistMode::SyncAll)
            .expect("fjall close");
    }
}

struct Redb {
    db: redb::Database,
}

const REDB_TABLES: [redb::TableDefinition<&[u8], &[u8]>; 3] = [
    redb::TableDefinition::new("messages"),
    redb::TableDefinition::new("queue"),
    redb::TableDefinition::new("retained"),
];

impl Engine for Redb {
    const NAME: &'static str = "redb";

    fn open(dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let db = redb::Database::create(dir.join("data.redb")).map_err(|e| format!("{e:?}"))?;
        Ok(Redb { db })
    }

    fn commit(&mut self, changes: &[Change], sync: bool) {
        let mut tx = self.db.begin_write().expect("redb begin");
        let durability = if sync {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        };
        tx.set_durability(durability).expect("redb durability");
        {
            let mut tables: Vec<_> = REDB_TABLES
                .iter()
                .map(|t| tx.open_table(*t).expect("redb table"))
                .collect();
            for (table, key, value) in changes {
                let t = &mut tables[*table as usize];
                match value {
                    Some(v) => {
                        t.insert(key.as_slice(), v.as_slice()).expect("redb insert");
                    }
                    None => {
                        t.remove(key.as_slice()).expect("redb remove");
                    }
                }
            }
        }
        tx.commit().expect("redb commit");
    }

    fn sync(&mut self) {
        // redb makes earlier non-durable commits durable with an empty durable one.
        self.commit(&[], true);
    }

    fn scan(&self) -> (u64, u64) {
        use redb::{ReadableDatabase, ReadableTable};
        let (mut ok, mut bad) = (0, 0);
        let Ok(tx) = self.db.begin_read() else {
            return (0, 1);
        };
        for def in REDB_TABLES {
            let table = match tx.open_table(def) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => continue,
                Err(_) => {
                    bad += 1;
                    continue;
                }
            };
            let Ok(iter) = table.iter() else {
                bad += 1;
                continue;
            };
            for item in iter {
                match item {
                    Ok(_) => ok += 1,
                    Err(_) => bad += 1,
                }
            }
        }
        (ok, bad)
    }

    fn log_file(dir: &Path) -> PathBuf {
        dir.join("data.redb")
    }

    fn table_file(dir: &Path) -> PathBuf {
        dir.join("data.redb")
    }

    fn close(self) {
        drop(self.db);
    }
}

// ---- workload ----

fn session_key(session: u64, seq: u64) -> Vec<u8> {
    let id = format!("client-{session:06}");
    let mut k = Vec::with_capacity(2 + id.len() + 8);
    k.extend_from_slice(&(id.len() as u16).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// A stored message's size: header, topic, 100-byte payload, checksum.
fn message_value(id: u64) -> Vec<u8> {
    let mut v = vec![0u8; 5 + 8 + 2 + 28 + PAYLOAD];
    v[..8].copy_from_slice(&id.to_le_bytes());
    v
}

fn queue_value(id: u64) -> Vec<u8> {
    let mut v = vec![0u8; 5 + 8 + 4];
    v[..8].copy_from_slice(&id.to_le_bytes());
    v
}

/// A small pseudo-random sequence (xorshift), so runs are repeatable without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Bytes the process has caused to be written to storage (Linux), for write amplification.
fn written_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
}

fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            // Allocated, not apparent, size: journals are preallocated sparse files.
            Ok(m) => std::os::unix::fs::MetadataExt::blocks(&m) * 512,
            Err(_) => 0,
        })
        .sum()
}

fn files(path: &Path, out: &mut Vec<(PathBuf, std::fs::Metadata)>) {
    for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
        match e.metadata() {
            Ok(m) if m.is_dir() => files(&e.path(), out),
            Ok(m) => out.push((e.path(), m)),
            Err(_) => {}
        }
    }
}

struct Churn {
    msgs_per_sec: f64,
    /// Bytes written to the device per logical byte submitted.
    write_amp: Option<f64>,
}

/// Enqueues `messages` messages across `sessions`, dequeuing each `LAG` commits later.
fn churn<E: Engine>(dir: &Path, sizes: &Sizes, sync: Sync) -> Churn {
    let mut engine = E::open(dir).expect("open");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut seqs = vec![0u64; sizes.sessions as usize];
    let mut in_queue: std::collections::VecDeque<Vec<(u64, u64, u64)>> = Default::default();
    let (mut logical, mut next_id) = (0u64, 1u64);
    let written_before = written_bytes();
    let start = Instant::now();
    let mut last_sync = start;
    let batches = sizes.messages.div_ceil(BATCH);
    for b in 0..batches + LAG {
        let mut changes = Vec::new();
        if b < batches {
            let mut enq = Vec::new();
            for _ in 0..BATCH {
                let s = rng.next() % sizes.sessions;
                let seq = seqs[s as usize];
                seqs[s as usize] += 1;
                let id = next_id;
                next_id += 1;
                changes.push((
                    Table::Messages,
                    id.to_be_bytes().to_vec(),
                    Some(message_value(id)),
                ));
                changes.push((Table::Queue, session_key(s, seq), Some(queue_value(id))));
                enq.push((s, seq, id));
            }
            in_queue.push_back(enq);
        }
        if b >= LAG {
            for (s, seq, id) in in_queue.pop_front().unwrap_or_default() {
                changes.push((Table::Messages, id.to_be_bytes().to_vec(), None));
                changes.push((Table::Queue, session_key(s, seq), None));
            }
        }
        logical += changes
            .iter()
            .map(|(_, k, v)| (k.len() + v.as_ref().map_or(0, Vec::len)) as u64)
            .sum::<u64>();
        let always = sync == Sync::Always;
        engine.commit(&changes, always);
        if sync == Sync::Interval && last_sync.elapsed() >= INTERVAL {
            engine.sync();
            last_sync = Instant::now();
        }
    }
    if sync != Sync::Never {
        engine.sync();
    }
    let elapsed = start.elapsed();
    engine.close();
    let write_amp = match (written_before, written_bytes()) {
        (Some(a), Some(b)) if logical > 0 => Some((b - a) as f64 / logical as f64),
        _ => None,
    };
    Churn {
        msgs_per_sec: sizes.messages as f64 / elapsed.as_secs_f64(),
        write_amp,
    }
}

/// Disk bytes per queued message: sessions x 10 messages of 100 B stored, then closed (for
/// fjall, with its memtables written to table files, its steady state).
fn queue_footprint<E: Engine>(root: &Path, sizes: &Sizes) -> f64 {
    let dir = root.join(format!("{}-footprint", E::NAME));
    let only_queues = Sizes {
        retained: 0,
        ..*sizes
    };
    let mut engine = fill::<E>(&dir, &only_queues);
    engine.flush();
    engine.close();
    let bytes = dir_bytes(&dir) as f64 / (sizes.recovery_sessions * 10) as f64;
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

/// Fills a store with the recovery data set; `crash` ends the process without closing it.
fn fill<E: Engine>(dir: &Path, sizes: &Sizes) -> E {
    let mut engine = E::open(dir).expect("open");
    let mut changes = Vec::new();
    for i in 0..sizes.retained {
        let topic = format!("site/{:03}/device/{i:08}/state", i % 1000);
        changes.push((Table::Retained, topic.into_bytes(), Some(message_value(i))));
        if changes.len() >= 1000 {
            engine.commit(&changes, false);
            changes.clear();
        }
    }
    let mut id = 0;
    for s in 0..sizes.recovery_sessions {
        for seq in 0..10 {
            id += 1;
            changes.push((
                Table::Messages,
                u64::to_be_bytes(id).to_vec(),
                Some(message_value(id)),
            ));
            changes.push((Table::Queue, session_key(s, seq), Some(queue_value(id))));
        }
        if changes.len() >= 1000 {
            engine.commit(&changes, false);
            changes.clear();
        }
    }
    engine.commit(&changes, true);
    engine
}

fn expected_records(sizes: &Sizes) -> u64 {
    sizes.retained + sizes.recovery_sessions * 20
}

struct Recovery {
    clean: Duration,
    after_crash: Duration,
    records: u64,
}

const CHILD_ENV: &str = "TERNMQ_STORE_BENCH_FILL";

/// Child mode: fill `dir` and exit without closing, as `kill -9` would.
fn child_fill() -> bool {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return false;
    };
    let (engine, rest) = spec.split_once(':').expect("engine:full:dir");
    let (full, dir) = rest.split_once(':').expect("full:dir");
    let sizes = if full == "1" { &FULL } else { &SMOKE };
    let dir = Path::new(dir);
    match engine {
        "fjall" => {
            let e = fill::<Fjall>(dir, sizes);
            std::mem::forget(e);
        }
        _ => {
            let e = fill::<Redb>(dir, sizes);
            std::mem::forget(e);
        }
    }
    std::process::exit(0);
}

fn time_scan<E: Engine>(dir: &Path) -> (Duration, u64) {
    let start = Instant::now();
    let engine = E::open(dir).expect("reopen");
    let (records, bad) = engine.scan();
    let took = start.elapsed();
    assert_eq!(bad, 0, "{}: read errors after a clean fill", E::NAME);
    engine.close();
    (took, records)
}

fn recovery<E: Engine>(root: &Path, sizes: &Sizes, full: bool) -> Recovery {
    let clean_dir = root.join(format!("{}-clean", E::NAME));
    fill::<E>(&clean_dir, sizes).close();
    let (clean, records) = time_scan::<E>(&clean_dir);
    assert_eq!(records, expected_records(sizes), "{}", E::NAME);

    let crash_dir = root.join(format!("{}-crash", E::NAME));
    let status = std::process::Command::new(std::env::current_exe().expect("exe"))
        .env(
            CHILD_ENV,
            format!("{}:{}:{}", E::NAME, u8::from(full), crash_dir.display()),
        )
        .status()
        .expect("child");
    assert!(status.success());
    let (after_crash, records) = time_scan::<E>(&crash_dir);
    assert_eq!(records, expected_records(sizes), "{} after crash", E::NAME);
    Recovery {
        clean,
        after_crash,
        records,
    }
}

/// The end of the file's data: the offset after its last non-zero byte.
fn data_end(path: &Path) -> u64 {
    let bytes = std::fs::read(path).expect("read");
    bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |i| i as u64 + 1)
}

/// What an engine does with a torn tail and with blocks of zeros, as text for the table.
fn damage<E: Engine>(root: &Path, sizes: &Sizes) -> Vec<(&'static str, String)> {
    let small = Sizes {
        retained: sizes.retained.min(20_000),
        recovery_sessions: sizes.recovery_sessions.min(2_000),
        ..*sizes
    };
    let expected = expected_records(&small);
    let describe = |dir: &Path| {
        let dir = dir.to_path_buf();
        // A damaged file may make an engine panic: count that, keep its message out of the table.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let outcome = std::panic::catch_unwind(move || match E::open(&dir) {
            Err(e) => format!(
                "refuses to open: {}",
                e.chars().take(70).collect::<String>()
            ),
            Ok(engine) => {
                let (ok, bad) = engine.scan();
                engine.close();
                format!("opens; {ok} of {expected} records read, {bad} read errors")
            }
        });
        std::panic::set_hook(hook);
        outcome.unwrap_or_else(|_| "panics".into())
    };
    let mut results = Vec::new();
    type Damage = fn(&Path, u64);
    let cases: [(&str, bool, Damage); 3] = [
        (
            "newest file cut 37 bytes before its end",
            false,
            |f, end| {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(f)
                    .expect("open");
                file.set_len(end.saturating_sub(37)).expect("truncate");
            },
        ),
        (
            "4 KiB of zeros in the middle of the newest file",
            false,
            |f, end| zero_block(f, end / 2, 4096),
        ),
        (
            "4 KiB of zeros in the middle of the largest table file",
            true,
            |f, end| zero_block(f, end / 2, 4096),
        ),
    ];
    for (name, flushed, hurt) in cases {
        let dir = root.join(format!("{}-damage-{}", E::NAME, results.len()));
        let mut engine = fill::<E>(&dir, &small);
        if flushed {
            engine.flush();
        }
        engine.close();
        let file = if flushed {
            E::table_file(&dir)
        } else {
            E::log_file(&dir)
        };
        hurt(&file, data_end(&file));
        results.push((name, describe(&dir)));
        let _ = std::fs::remove_dir_all(&dir);
    }
    results
}

fn zero_block(path: &Path, at: u64, len: usize) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.write_all(&vec![0u8; len]).expect("zero");
    f.sync_all().expect("sync");
}

fn engine_report<E: Engine>(root: &Path, sizes: &Sizes, full: bool) {
    for sync in [Sync::Always, Sync::Interval, Sync::Never] {
        let dir = root.join(format!("{}-{sync:?}", E::NAME));
        let r = churn::<E>(&dir, sizes, sync);
        println!(
            "| {} | {sync:?} | {:.0} msg/s | write amplification {} |",
            E::NAME,
            r.msgs_per_sec,
            r.write_amp.map_or("n/a".into(), |w| format!("{w:.1}x")),
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!(
        "| {} | disk bytes per queued message | {:.0} B |",
        E::NAME,
        queue_footprint::<E>(root, sizes)
    );
    let r = recovery::<E>(root, sizes, full);
    println!(
        "| {} | recovery of {} records | clean {:.0} ms | after a crash {:.0} ms |",
        E::NAME,
        r.records,
        r.clean.as_secs_f64() * 1e3,
        r.after_crash.as_secs_f64() * 1e3
    );
    for (case, outcome) in damage::<E>(root, sizes) {
        println!("| {} | {case} | {outcome} |", E::NAME);
    }
}

// ---- ternmq's store ----

fn message(id: u64, topic: String) -> StoredMessage {
    // Payload bytes vary, as real ones do (the engines compress).
    StoredMessage {
        id,
        topic: topic.into(),
        payload: (0..PAYLOAD as u64)
            .map(|i| (id.wrapping_mul(31).wrapping_add(i * 7) % 251) as u8)
            .collect::<Bytes>(),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
        expires_at: None,
    }
}

fn store_config(dir: &Path, sync: SyncMode) -> PersistenceConfig {
    PersistenceConfig {
        dir: dir.to_path_buf(),
        sync,
        ..PersistenceConfig::default()
    }
}

fn client(n: u64) -> ByteStr {
    format!("client-{n:06}").into()
}

fn enqueue(session: u64, seq: u64, m: Arc<StoredMessage>) -> Op {
    Op::Enqueue {
        client_id: client(session),
        seq,
        delivery: Delivery {
            message: m,
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: Vec::new(),
        },
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// `publishers` tasks at once, each submitting one enqueue and waiting for it to be durable
/// (as a connection waits before its PUBACK), with the dequeue of its message `LAG` back.
/// Returns messages per second, write amplification, and commits per submit.
fn store_churn(
    dir: &Path,
    sizes: &Sizes,
    sync: SyncMode,
    publishers: u64,
) -> (f64, Option<f64>, f64) {
    runtime().block_on(async {
        let store = Arc::new(DiskStore::open(&store_config(dir, sync)).expect("open store"));
        let sessions: Vec<Op> = (0..sizes.sessions)
            .map(|s| Op::PutSession {
                client_id: client(s),
                session: StoredSession::default(),
            })
            .collect();
        store.submit(sessions).await.expect("sessions");
        let commits_before = store.commits();
        let written_before = written_bytes();
        let start = Instant::now();
        let per_publisher = sizes.messages / publishers;
        let mut tasks = Vec::new();
        for p in 0..publishers {
            let store = store.clone();
            let sessions = sizes.sessions;
            tasks.push(tokio::spawn(async move {
                let mut logical = 0u64;
                let mut queued = std::collections::VecDeque::new();
                for i in 0..per_publisher {
                    // Ids (and so sequence numbers) only grow: unique keys, as the broker's.
                    let id = i * publishers + p + 1;
                    let session = id % sessions;
                    let m = Arc::new(message(id, format!("bench/{p}/{i}")));
                    logical += (PAYLOAD + 40 + 14 + 8) as u64;
                    let mut ops = vec![enqueue(session, id, m)];
                    queued.push_back((session, id));
                    if queued.len() as u64 > LAG {
                        let (session, seq) = queued.pop_front().expect("queued");
                        ops.push(Op::Dequeue {
                            client_id: client(session),
                            seq,
                        });
                    }
                    store.submit(ops).await.expect("durable");
                }
                logical
            }));
        }
        let mut logical = 0;
        for t in tasks {
            logical += t.await.expect("task");
        }
        let messages = per_publisher * publishers;
        let rate = messages as f64 / start.elapsed().as_secs_f64();
        let commits = (store.commits() - commits_before) as f64 / messages as f64;
        store.close().await.expect("close");
        let amp = match (written_before, written_bytes()) {
            (Some(a), Some(b)) if logical > 0 => Some((b - a) as f64 / logical as f64),
            _ => None,
        };
        (rate, amp, commits)
    })
}

/// The recovery data set through the store: retained messages, sessions with 10 queued
/// messages each. Returns (open + load time, bytes on disk per queued message).
fn store_recovery(dir: &Path, sizes: &Sizes) -> (Duration, f64, usize) {
    let rt = runtime();
    rt.block_on(async {
        let store = DiskStore::open(&store_config(dir, SyncMode::Never)).expect("open");
        let mut ops = Vec::new();
        for i in 0..sizes.retained {
            let mut m = message(0, format!("site/{:03}/device/{i:08}/state", i % 1000));
            m.retain = true;
            ops.push(Op::SetRetained(Arc::new(m)));
            if ops.len() >= 1000 {
                drop(store.submit(std::mem::take(&mut ops)));
            }
        }
        let mut id = 0;
        for s in 0..sizes.recovery_sessions {
            ops.push(Op::PutSession {
                client_id: client(s),
                session: StoredSession::default(),
            });
            for seq in 1..=10 {
                id += 1;
                ops.push(enqueue(s, seq, Arc::new(message(id, format!("cmd/{s}")))));
            }
            if ops.len() >= 1000 {
                drop(store.submit(std::mem::take(&mut ops)));
            }
        }
        store.submit(ops).await.expect("fill");
        store.close().await.expect("close");
    });
    drop(rt);
    let rt = runtime();
    let start = Instant::now();
    let (snapshot, store) = rt.block_on(async {
        let store = DiskStore::open(&store_config(dir, SyncMode::Never)).expect("reopen");
        (store.load(1000).await.expect("load"), store)
    });
    let took = start.elapsed();
    let queued: u64 = snapshot.sessions.iter().map(|s| s.queued).sum();
    assert_eq!(snapshot.retained.len() as u64, sizes.retained);
    assert_eq!(queued, sizes.recovery_sessions * 10);
    assert!(snapshot.recovery.is_clean(), "{:?}", snapshot.recovery);
    rt.block_on(store.close()).expect("close");
    let per_message = dir_bytes(dir) as f64 / (sizes.retained + queued) as f64;
    (took, per_message, snapshot.sessions.len())
}

fn store_report(root: &Path, sizes: &Sizes) {
    for (sync, name) in [
        (SyncMode::Always, "always"),
        (SyncMode::Interval, "interval"),
        (SyncMode::Never, "never"),
    ] {
        for publishers in [1, 64] {
            let dir = root.join(format!("store-{name}-{publishers}"));
            let (rate, amp, commits) = store_churn(&dir, sizes, sync, publishers);
            println!(
                "| ternmq store | {name} | {publishers} publishers waiting for durability | {rate:.0} msg/s | write amplification {} | {commits:.3} commits per message |",
                amp.map_or("n/a".into(), |w| format!("{w:.1}x"))
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let dir = root.join("store-recovery");
    let (took, per_message, sessions) = store_recovery(&dir, sizes);
    println!(
        "| ternmq store | recovery (open + load) of {} retained and {sessions} sessions x 10 queued | {:.0} ms | {per_message:.0} disk bytes per stored message |",
        sizes.retained,
        took.as_secs_f64() * 1e3
    );
}

fn main() {
    if child_fill() {
        return;
    }
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as a smoke test.
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = if full { &FULL } else { &SMOKE };
    let root = tempfile::tempdir().expect("tempdir");
    println!(
        "store bench: {} sessions, {} messages of {PAYLOAD} B in commits of {BATCH}; recovery of {} retained + {} sessions x 10 queued",
        sizes.sessions, sizes.messages, sizes.retained, sizes.recovery_sessions
    );
    let only = std::env::var("STORE_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "fjall" {
        engine_report::<Fjall>(root.path(), sizes, full);
    }
    if only.is_empty() || only == "redb" {
        engine_report::<Redb>(root.path(), sizes, full);
    }
    if only.is_empty() || only == "store" {
        store_report(root.path(), sizes);
    }
}
