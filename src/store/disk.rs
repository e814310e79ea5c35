//! The crash-safe store on disk: fjall (an LSM tree with a checksummed journal) holding the
//! records of `codec`, written by the group-commit thread of `writer`.
//!
//! The data directory holds `LOCK` (held while a broker uses it), `db/` (fjall's files) and,
//! after a clean shutdown, `clean-shutdown`. Start-up reads every record once: it checks each
//! checksum, rebuilds the message reference counts, and deals with damage (docs/persistence.md):
//! what fjall cuts from the journals while opening them is counted, and the journals as they
//! were are kept as `journal.cut-<time>` (copied beforehand: `JournalCopy`); records failing
//! their checksum are skipped and removed; a store the engine cannot read through is moved
//! aside as `db.corrupt-<time>` and what could be read from it is copied into a fresh one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::batch::{self, Builder, Lookup, Refs, HIGH_WATER_KEY};
use super::codec::{self, DeliveryRef, FORMAT_VERSION};
use super::writer::{Backend, Writer};
use super::{
    BoxFuture, Durable, InflightEntry, InflightStage, OnCorruption, Op, PersistenceConfig,
    QueuedEntry, RecoveryReport, SessionSnapshot, Snapshot, Store, StoreError, StoredMessage,
};
use crate::protocol::ByteStr;

const DB_DIR: &str = "db";
const LOCK_FILE: &str = "LOCK";
const CLEAN_MARKER: &str = "clean-shutdown";
/// The journals as they were before the engine opened them (`JournalCopy`), while it does.
const JOURNAL_COPY: &str = "db.journals";
/// What the copy becomes when the engine cut something: `journal.cut-<UTC time>`.
const JOURNAL_KEPT: &str = "journal.cut";
const KEYSPACE: &str = "ternmq";
/// Memory a keyspace buffers before writing a table file; also what a restart replays.
const MEMTABLE_BYTES: u64 = 8 << 20;
/// Journal size past which fjall flushes memtables (its minimum).
const JOURNAL_BYTES: u64 = 64 << 20;
const CACHE_BYTES: u64 = 16 << 20;
/// Records copied per batch when salvaging.
const SALVAGE_BATCH: usize = 1000;
/// Every table, in the order start-up reads them: sessions before what belongs to them,
/// references before the messages they reference.
const TABLES: [u8; 9] = [
    codec::VERSION,
    codec::SESSION,
    codec::SUBSCRIPTION,
    codec::QUEUE,
    codec::INFLIGHT,
    codec::INCOMING,
    codec::MESSAGE,
    codec::RETAINED,
    HIGH_WATER_KEY[0],
];

/// The disk store. Open it once per data directory: the directory is locked while it is open.
pub struct DiskStore {
    writer: Writer,
    recovery: RecoveryReport,
    dir: PathBuf,
    /// Held for the life of the store (the lock goes with the file).
    _lock: File,
}

impl DiskStore {
    /// Opens (or creates) the store in `config.dir`, recovering from damage as
    /// `config.on_corruption` says.
    pub fn open(config: &PersistenceConfig) -> Result<DiskStore, StoreError> {
        let dir = config.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
        let lock = lock(&dir)?;
        let (engine, refs, recovery) = recover(&dir, config.on_corruption)?;
        let backend = Disk {
            engine,
            refs,
            recovery: recovery.clone(),
            dir: dir.clone(),
        };
        let writer = Writer::start(
            backend,
            config.sync,
            config.sync_interval(),
            config.max_disk_bytes,
        )?;
        Ok(DiskStore {
            writer,
            recovery,
            dir,
            _lock: lock,
        })
    }

    /// What start-up found wrong and did (also in every `Snapshot`).
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Batches written so far: one per group commit, however many submits it gathered.
    pub fn commits(&self) -> u64 {
        self.writer.commits()
    }
}

impl Store for DiskStore {
    fn load(&self, queue_head: usize) -> BoxFuture<'_, Result<Snapshot, StoreError>> {
        Box::pin(self.writer.load(queue_head))
    }

    fn submit(&self, batch: Vec<Op>) -> Durable {
        self.writer.submit(batch)
    }

    fn read_queue(
        &self,
        client_id: &ByteStr,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<QueuedEntry>, StoreError>> {
        Box::pin(self.writer.read_queue(client_id.clone(), after_seq, limit))
    }

    fn pending_bytes(&self) -> u64 {
        self.writer.pending_bytes()
    }

    fn has_room(&self) -> bool {
        self.writer.has_room()
    }

    fn is_behind(&self) -> bool {
        self.writer.is_behind()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.writer.close())
    }
}

fn io_error(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        source: Arc::new(e),
    }
}

fn engine_error(e: impl std::fmt::Debug) -> StoreError {
    StoreError::Engine(format!("{e:?}"))
}

/// Takes the directory's lock: a second broker on the same directory is refused.
fn lock(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io_error(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
            dir: dir.to_path_buf(),
            lock: path,
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io_error(&path, e)),
    }
}

// ---- the engine ----

struct Engine {
    db: fjall::Database,
    ks: fjall::Keyspace,
}

impl Engine {
    /// Opens fjall's files in `path`; a panic inside the engine (some damage makes it panic)
    /// counts as an error.
    fn open(path: &Path) -> Result<Engine, String> {
        let path = path.to_path_buf();
        let opened = std::panic::catch_unwind(move || -> Result<Engine, fjall::Error> {
            let db = fjall::Database::builder(&path)
                .max_journaling_size(JOURNAL_BYTES)
                .cache_size(CACHE_BYTES)
                .open()?;
            let ks = db.keyspace(KEYSPACE, || {
                fjall::KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
            })?;
            Ok(Engine { db, ks })
        });
        match opened {
            Ok(Ok(engine)) => Ok(engine),
            Ok(Err(e)) if is_damage(&e) => Err(format!("{e:?}")),
            Ok(Err(e)) => Err(format!("not damage: {e:?}")),
            Err(_) => Err("the storage engine panicked while opening it".into()),
        }
    }

    fn write(&self, changes: Vec<batch::Change>, sync: bool) -> Result<(), StoreError> {
        if changes.is_empty() {
            // Everything cancelled out (or nothing to do): earlier batches are already as
            // durable as the mode promises.
            return Ok(());
        }
        let mut b = self.db.batch();
        if sync {
            b = b.durability(Some(fjall::PersistMode::SyncData));
        }
        for (key, value) in changes {
            match value {
                Some(v) => b.insert(&self.ks, key, v),
                None => b.remove(&self.ks, key),
            }
        }
        b.commit().map_err(engine_error)
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.db
            .persist(fjall::PersistMode::SyncData)
            .map_err(engine_error)
    }

    /// Calls `f` with every record under `prefix`, in order, reading past damage: after a
    /// failed read, the records beyond it are read from the end backwards. Returns the
    /// number of failed reads (0: the engine read everything).
    fn each(&self, prefix: &[u8], mut f: impl FnMut(&[u8], &[u8])) -> u64 {
        let mut failed = 0;
        let mut last: Option<Vec<u8>> = None;
        for item in self.ks.prefix(prefix) {
            match item.into_inner() {
                Ok((k, v)) => {
                    f(&k, &v);
                    last = Some(k.to_vec());
                }
                Err(e) => {
                    tracing::error!("store: cannot read past {last:?}: {e:?}");
                    failed += 1;
                    break;
                }
            }
        }
        if failed > 0 {
            let mut tail = Vec::new();
            for item in self.ks.prefix(prefix).rev() {
                match item.into_inner() {
                    Ok((k, v)) => {
                        if last.as_deref().is_some_and(|l| &*k <= l) {
                            break;
                        }
                        tail.push((k.to_vec(), v.to_vec()));
                    }
                    Err(_) => {
                        failed += 1;
                        break;
                    }
                }
            }
            for (k, v) in tail.iter().rev() {
                f(k, v);
            }
        }
        failed
    }
}

impl Lookup for Engine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.ks
            .get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(engine_error)
    }

    fn keys(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        self.ks
            .prefix(prefix)
            .map(|g| g.key().map(|k| k.to_vec()).map_err(engine_error))
            .collect()
    }
}

/// Whether an error opening the engine means damaged files (rather than, say, permissions).
fn is_damage(e: &fjall::Error) -> bool {
    use std::io::ErrorKind;
    match e {
        fjall::Error::Locked | fjall::Error::Poisoned | fjall::Error::KeyspaceDeleted => false,
        _ => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
            while let Some(s) = source {
                if let Some(io) = s.downcast_ref::<std::io::Error>() {
                    return matches!(
                        io.kind(),
                        ErrorKind::InvalidData | ErrorKind::UnexpectedEof | ErrorKind::NotFound
                    );
                }
                source = s.source();
            }
            true
        }
    }
}

// ---- the writer's backend ----

struct Disk {
    engine: Engine,
    refs: Refs,
    recovery: RecoveryReport,
    dir: PathBuf,
}

impl Backend for Disk {
    fn write(&mut self, ops: Vec<Op>, sync: bool) -> Result<(), StoreError> {
        let mut b = Builder::new(&self.engine, &mut self.refs);
        for op in ops {
            b.apply(op)?;
        }
        let changes = b.finish();
        self.engine.write(changes, sync)
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        self.engine.sync()
    }

    fn read_queue(
        &mut self,
        client_id: &ByteStr,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<QueuedEntry>, StoreError> {
        let start = codec::queue_key(client_id, after_seq.saturating_add(1));
        let end = codec::queue_key(client_id, u64::MAX);
        let mut entries = Vec::new();
        let mut messages: HashMap<u64, Option<Arc<StoredMessage>>> = HashMap::new();
        for item in self.engine.ks.range(start..=end) {
            if entries.len() >= limit {
                break;
            }
            let (k, v) = item.into_inner().map_err(engine_error)?;
            let Ok(seq) = codec::split_client_key(&k).and_then(|(_, rest)| codec::key_u64(rest))
            else {
                continue;
            };
            let Ok(d) = codec::unseal(&k, &v).and_then(codec::decode_delivery) else {
                tracing::warn!(%client_id, seq, "store: skipping a damaged queue entry");
                continue;
            };
            let message = match messages.get(&d.message_id) {
                Some(m) => m.clone(),
                None => {
                    let m = read_message(&self.engine, d.message_id)?;
                    messages.insert(d.message_id, m.clone());
                    m
                }
            };
            match message {
                Some(m) => entries.push(QueuedEntry {
                    seq,
                    delivery: d.resolve(m),
                }),
                None => {
                    tracing::warn!(%client_id, seq, "store: skipping a queue entry whose message is lost")
                }
            }
        }
        Ok(entries)
    }

    fn load(&mut self, queue_head: usize) -> Result<Snapshot, StoreError> {
        let mut snapshot = load(&self.engine, queue_head);
        snapshot.recovery = self.recovery.clone();
        snapshot.max_message_id = snapshot.max_message_id.max(self.refs.high_water);
        Ok(snapshot)
    }

    fn disk_bytes(&self) -> u64 {
        allocated_bytes(&self.dir.join(DB_DIR))
    }

    fn close(&mut self) -> Result<(), StoreError> {
        self.engine
            .db
            .persist(fjall::PersistMode::SyncAll)
            .map_err(engine_error)?;
        // Lets the next start tell a torn journal (a crash) from a damaged one, and skip
        // copying journals that are still what was written (`JournalCopy`).
        let marker = self.dir.join(CLEAN_MARKER);
        let digest = journal_digest(&journal_ends(&self.dir.join(DB_DIR)));
        File::create(&marker)
            .and_then(|mut f| f.write_all(digest.as_bytes()).and_then(|()| f.sync_all()))
            .and_then(|()| sync_dir(&self.dir))
            .map_err(|e| io_error(&marker, e))
    }
}

fn read_message(engine: &Engine, id: u64) -> Result<Option<Arc<StoredMessage>>, StoreError> {
    let key = codec::message_key(id);
    Ok(engine
        .get(&key)?
        .and_then(|v| codec::unseal(&key, &v).and_then(codec::decode_message).ok())
        .map(Arc::new))
}

/// Disk space used under `path`: blocks allocated, not file lengths (fjall preallocates its
/// journal as a sparse file).
pub fn allocated_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated_bytes(&e.path()),
            #[cfg(unix)]
            Ok(m) => std::os::unix::fs::MetadataExt::blocks(&m) * 512,
            #[cfg(not(unix))]
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

// ---- start-up ----

/// Opens the engine in `dir`, checks every record and deals with damage. The journals are
/// copied first (`JournalCopy`): what the engine cuts from them while opening is kept as
/// `journal.cut-<UTC time>`, and a start that `stop` refuses puts them back as they were.
fn recover(
    dir: &Path,
    on_corruption: OnCorruption,
) -> Result<(Engine, Refs, RecoveryReport), StoreError> {
    let db_dir = dir.join(DB_DIR);
    let stop = on_corruption == OnCorruption::Stop;
    let journals = journal_ends(&db_dir);
    // Journals just as a clean shutdown left them are not cut: no copy needed.
    let intact = std::fs::read_to_string(dir.join(CLEAN_MARKER))
        .is_ok_and(|digest| digest == journal_digest(&journals));
    let copy = if intact {
        None
    } else {
        match JournalCopy::take(&db_dir, &journals) {
            Ok(copy) => copy,
            Err(e) if stop => {
                return Err(StoreError::Engine(format!(
                    "cannot copy the journals aside before opening the store ({e}); \
                     on_corruption = \"stop\" needs the copy to leave a damaged store as it was"
                )))
            }
            Err(e) => {
                tracing::warn!("store: cannot copy the journals before opening the store ({e}): what the engine cuts from them is lost");
                None
            }
        }
    };
    let result = open_checked(dir, &db_dir, on_corruption, &journals);
    let Some(copy) = copy else {
        return result;
    };
    match result {
        Ok((engine, refs, mut report)) if report.discarded_tail_bytes > 0 => {
            match copy.keep() {
                Ok(kept) => {
                    tracing::warn!(
                        "store: the journals as they were before the engine cut them are kept in {}",
                        kept.display()
                    );
                    report.journals_kept = Some(kept);
                }
                Err(e) => tracing::error!("store: cannot keep the journals as they were: {e}"),
            }
            Ok((engine, refs, report))
        }
        Ok(opened) => {
            copy.discard();
            Ok(opened)
        }
        // Nothing was moved aside under `stop`: the journals go back where they were.
        Err(e) if stop => match copy.restore() {
            Ok(()) => Err(e),
            Err(restoring) => {
                tracing::error!("store: cannot put the journals back as they were: {restoring}; they are kept in {}", copy_dir(&db_dir).display());
                Err(e)
            }
        },
        Err(e) => {
            if copy.cut() > 0 {
                if let Ok(kept) = copy.keep() {
                    tracing::error!(
                        "store: the journals as they were before opening are kept in {}",
                        kept.display()
                    );
                }
            } else {
                copy.discard();
            }
            Err(e)
        }
    }
}

/// `recover`'s work once the journals are copied (`journals`: where their data ended).
#[allow(clippy::too_many_lines)] // the recovery's steps in the order they run: open, check, salvage, report
fn open_checked(
    dir: &Path,
    db_dir: &Path,
    on_corruption: OnCorruption,
    journals: &HashMap<PathBuf, u64>,
) -> Result<(Engine, Refs, RecoveryReport), StoreError> {
    let db_dir = db_dir.to_path_buf();
    let marker = dir.join(CLEAN_MARKER);
    let clean_shutdown = marker.exists();
    let stop = on_corruption == OnCorruption::Stop;
    let damaged = |detail: String| StoreError::Corrupt {
        path: db_dir.clone(),
        detail,
    };
    let mut report = RecoveryReport::default();

    let opened = Engine::open(&db_dir);
    // fjall cuts a journal at its first bad batch: a torn write after a crash, damage otherwise.
    let bytes: u64 = journals
        .iter()
        .map(|(name, end)| end.saturating_sub(data_end(name).unwrap_or(*end)))
        .sum();
    let engine = match opened {
        Ok(engine) => engine,
        Err(e) if e.starts_with("not damage") => {
            return Err(StoreError::Engine(format!(
                "cannot open {}: {e}",
                db_dir.display()
            )))
        }
        Err(e) if stop => return Err(damaged(format!("the engine cannot open it: {e}"))),
        Err(e) => {
            let aside = move_aside(&db_dir, "db.corrupt")?;
            tracing::error!(
                "store: {} cannot be opened ({e}); moved aside to {}; starting without what it held",
                db_dir.display(),
                aside.display()
            );
            report.moved_aside = Some(aside);
            Engine::open(&db_dir).map_err(|e| {
                StoreError::Engine(format!("cannot create {}: {e}", db_dir.display()))
            })?
        }
    };
    report.discarded_tail_bytes = bytes;
    if bytes > 0 {
        if clean_shutdown {
            if stop {
                return Err(damaged(format!(
                    "{bytes} bytes of its journal could not be read after a clean shutdown"
                )));
            }
            tracing::error!("store: {bytes} bytes of the journal were damaged and are lost");
        } else {
            tracing::warn!(
                "store: the last write before the crash was torn: {bytes} bytes dropped"
            );
        }
    }

    let check = check(&engine);
    if let Some(found) = check.version.filter(|&v| v != FORMAT_VERSION) {
        return Err(StoreError::UnsupportedVersion {
            path: db_dir,
            found,
            supported: FORMAT_VERSION,
        });
    }
    if stop && (check.unreadable > 0 || check.skipped > 0) {
        return Err(damaged(format!(
            "{} reads failed, {} records failed their checksum or could not be decoded",
            check.unreadable, check.skipped
        )));
    }
    // Past the refusals of `stop`, which leave the store as it was, marker included.
    if clean_shutdown {
        std::fs::remove_file(&marker)
            .and_then(|()| sync_dir(dir))
            .map_err(|e| io_error(&marker, e))?;
    }
    let (engine, check) = if check.unreadable > 0 {
        // Unreadable parts stay unreadable: keep the damaged store, start from a clean copy.
        let aside = salvage(engine, &db_dir)?;
        tracing::error!(
            "store: {} has unreadable parts ({} failed reads); moved aside to {}, its readable records copied into a fresh store",
            db_dir.display(),
            check.unreadable,
            aside.display()
        );
        report.moved_aside = Some(aside);
        report.skipped += check.skipped;
        let engine = Engine::open(&db_dir).map_err(|e| {
            StoreError::Engine(format!(
                "cannot open the salvaged {}: {e}",
                db_dir.display()
            ))
        })?;
        let again = self::check(&engine);
        (engine, again)
    } else {
        (engine, check)
    };
    report.skipped += check.skipped;
    report.recovered = check.recovered;
    if check.skipped > 0 {
        tracing::error!(
            skipped = check.skipped,
            "store: records failing their checksum or naming lost data were skipped and removed"
        );
    }

    // Remove what was skipped, the orphans, and write the format version of a new store.
    let mut changes: Vec<batch::Change> = check.remove.into_iter().map(|k| (k, None)).collect();
    if check.version.is_none() {
        let key = vec![codec::VERSION];
        let value = codec::seal(&key, &[FORMAT_VERSION]);
        changes.push((key, Some(value)));
    }
    engine.write(changes, true)?;
    Ok((engine, check.refs, report))
}

/// The offset after the last non-zero byte of each journal: how far it holds data.
fn journal_ends(db_dir: &Path) -> HashMap<PathBuf, u64> {
    let Ok(entries) = std::fs::read_dir(db_dir) else {
        return HashMap::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
        .filter_map(|p| data_end(&p).ok().map(|end| (p, end)))
        .collect()
}

fn data_end(path: &Path) -> std::io::Result<u64> {
    const CHUNK: u64 = 64 << 10;
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    // fjall preallocates journals: skip the hole at the end instead of reading it.
    #[cfg(target_os = "linux")]
    let mut end = last_extent_end(&f, len).unwrap_or(len);
    #[cfg(not(target_os = "linux"))]
    let mut end = len;
    let mut buf = vec![0u8; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let chunk = &mut buf[..(end - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b != 0) {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Where the file's last data extent ends (Linux `SEEK_DATA`/`SEEK_HOLE`); `None` when the
/// file system cannot tell.
#[cfg(target_os = "linux")]
fn last_extent_end(f: &File, len: u64) -> Option<u64> {
    use rustix::fs::{seek, SeekFrom};
    let (mut pos, mut end) = (0, 0);
    while pos < len {
        // No data past `pos` (ENXIO): `end` is the end of the last extent.
        let Ok(data) = seek(f, SeekFrom::Data(pos)) else {
            break;
        };
        end = seek(f, SeekFrom::Hole(data)).ok()?;
        pos = end;
    }
    Some(end.min(len))
}

/// Each journal holding data (`ends`): its name, where its data ends and the CRC-32 of
/// the data, a line each. An unreadable journal makes a digest no start takes for intact.
fn journal_digest(ends: &HashMap<PathBuf, u64>) -> String {
    let mut journals: Vec<_> = ends.iter().filter(|(_, &end)| end > 0).collect();
    journals.sort();
    let mut digest = String::new();
    for (path, &end) in journals {
        let mut crc = crc32fast::Hasher::new();
        let read = File::open(path).and_then(|f| {
            let mut data = f.take(end);
            let mut buf = vec![0; 64 << 10];
            loop {
                match data.read(&mut buf)? {
                    0 => return Ok(()),
                    n => crc.update(&buf[..n]),
                }
            }
        });
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        match read {
            Ok(()) => digest.push_str(&format!("{name} {end} {:08x}\n", crc.finalize())),
            Err(e) => digest.push_str(&format!("{name} unreadable: {e}\n")),
        }
    }
    digest
}

/// Renames `path` to `<name>-<UTC time>` beside it (`db.corrupt-...` for a damaged store).
fn move_aside(path: &Path, name: &str) -> Result<PathBuf, StoreError> {
    let stamp = utc_stamp(super::now_millis() / 1000);
    let mut aside = path.with_file_name(format!("{name}-{stamp}"));
    let mut n = 1;
    while aside.exists() {
        aside = path.with_file_name(format!("{name}-{stamp}-{n}"));
        n += 1;
    }
    std::fs::rename(path, &aside).map_err(|e| io_error(path, e))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent).map_err(|e| io_error(parent, e))?;
        prune_aside(parent, name);
    }
    Ok(aside)
}

/// Copies kept per kind (`db.corrupt-*`, `journal.cut-*`): the newest ones. A device that
/// keeps losing power would otherwise fill its disk with them.
const KEEP_ASIDE: usize = 3;

/// Removes all but the newest `KEEP_ASIDE` of `<name>-<UTC time>` in `dir` (the stamps
/// sort as they were made), saying so in the log.
fn prune_aside(dir: &Path, name: &str) {
    let prefix = format!("{name}-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut kept: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect();
    kept.sort();
    let excess = kept.len().saturating_sub(KEEP_ASIDE);
    for old in &kept[..excess] {
        let removed = if old.is_dir() {
            std::fs::remove_dir_all(old)
        } else {
            std::fs::remove_file(old)
        };
        match removed {
            Ok(()) => tracing::warn!(
                "store: removed {} (only the newest {KEEP_ASIDE} copies set aside are kept)",
                old.display()
            ),
            Err(e) => tracing::warn!("store: cannot remove {}: {e}", old.display()),
        }
    }
}

fn copy_dir(db_dir: &Path) -> PathBuf {
    db_dir.with_file_name(JOURNAL_COPY)
}

/// The journals of a store as they were before the engine opened it. fjall cuts a journal
/// at its first bad batch while opening, before ternmq can look at it, and that may be
/// damage rather than a torn write: so the data of every journal (not the zeros fjall
/// preallocates after it) is copied first, unless a clean shutdown's digest shows them
/// intact. Bounded: fjall starts a new journal past 64 MB and flushes the oldest ones'
/// memtables once they hold `JOURNAL_BYTES`, so journals hold about 128 MB at most.
struct JournalCopy {
    dir: PathBuf,
    /// Each journal copied: its path, its length, where its data ended.
    files: Vec<(PathBuf, u64, u64)>,
}

impl JournalCopy {
    /// Copies the journals of `db_dir` that hold data (`ends`) to `db.journals` beside it;
    /// None when none does.
    fn take(
        db_dir: &Path,
        ends: &HashMap<PathBuf, u64>,
    ) -> Result<Option<JournalCopy>, StoreError> {
        let dir = copy_dir(db_dir);
        if dir.exists() {
            // A start ended between copying and checking: its copy may hold what that start
            // saw cut. Kept, not trusted.
            let kept = move_aside(&dir, JOURNAL_KEPT)?;
            tracing::warn!(
                "store: an interrupted start left a copy of the journals, kept in {}",
                kept.display()
            );
        }
        let mut files = Vec::new();
        for (path, &end) in ends.iter().filter(|(_, &end)| end > 0) {
            let len = std::fs::metadata(path)
                .map_err(|e| io_error(path, e))?
                .len();
            files.push((path.clone(), len, end));
        }
        if files.is_empty() {
            return Ok(None);
        }
        std::fs::create_dir(&dir).map_err(|e| io_error(&dir, e))?;
        let copy = JournalCopy { dir, files };
        for (path, _, end) in &copy.files {
            let to = copy.copy_of(path);
            let copied = File::open(path)
                .and_then(|from| std::io::copy(&mut from.take(*end), &mut File::create(&to)?));
            if let Err(e) = copied {
                copy.discard();
                return Err(io_error(&to, e));
            }
        }
        Ok(Some(copy))
    }

    fn copy_of(&self, journal: &Path) -> PathBuf {
        self.dir.join(journal.file_name().unwrap_or_default())
    }

    /// Bytes the engine cut from the journals.
    fn cut(&self) -> u64 {
        let files = self.files.iter();
        files
            .map(|(path, _, end)| end.saturating_sub(data_end(path).unwrap_or(*end)))
            .sum()
    }

    /// Makes the copy lasting, as `journal.cut-<UTC time>`; returns where it is.
    fn keep(self) -> Result<PathBuf, StoreError> {
        for (path, _, _) in &self.files {
            let copy = self.copy_of(path);
            File::open(&copy)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_error(&copy, e))?;
        }
        move_aside(&self.dir, JOURNAL_KEPT)
    }

    /// Puts every journal the engine changed back as it was, then drops the copy.
    fn restore(&self) -> Result<(), StoreError> {
        for (path, len, end) in &self.files {
            if data_end(path).ok() == Some(*end) {
                continue;
            }
            let copy = self.copy_of(path);
            let restored = File::open(&copy).and_then(|mut from| {
                let mut to = File::options()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)?;
                std::io::copy(&mut from, &mut to)?;
                to.set_len(*len)?;
                to.sync_all()
            });
            restored.map_err(|e| io_error(path, e))?;
        }
        self.discard();
        Ok(())
    }

    fn discard(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!("store: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// Copies every readable record of `engine` into a fresh store that takes the place of
/// `db_dir`, and moves the damaged one aside. Returns where it went.
fn salvage(engine: Engine, db_dir: &Path) -> Result<PathBuf, StoreError> {
    let fresh_dir = db_dir.with_file_name(format!("{DB_DIR}.salvage"));
    if fresh_dir.exists() {
        std::fs::remove_dir_all(&fresh_dir).map_err(|e| io_error(&fresh_dir, e))?;
    }
    let fresh = Engine::open(&fresh_dir)
        .map_err(|e| StoreError::Engine(format!("cannot create {}: {e}", fresh_dir.display())))?;
    let mut pending = Vec::new();
    let mut result = Ok(());
    for tag in TABLES {
        engine.each(&[tag], |k, v| {
            if result.is_err() || codec::unseal(k, v).is_err() {
                return;
            }
            pending.push((k.to_vec(), Some(v.to_vec())));
            if pending.len() >= SALVAGE_BATCH {
                result = fresh.write(std::mem::take(&mut pending), false);
            }
        });
    }
    result?;
    fresh.write(pending, true)?;
    drop(fresh);
    drop(engine);
    let aside = move_aside(db_dir, "db.corrupt")?;
    std::fs::rename(&fresh_dir, db_dir).map_err(|e| io_error(&fresh_dir, e))?;
    if let Some(parent) = db_dir.parent() {
        sync_dir(parent).map_err(|e| io_error(parent, e))?;
    }
    Ok(aside)
}

/// What the start-up check of every record found.
#[derive(Default)]
struct Check {
    refs: Refs,
    version: Option<u8>,
    recovered: u64,
    /// Records failing their checksum or decoding, or naming a lost session or message.
    skipped: u64,
    /// Failed engine reads.
    unreadable: u64,
    /// Keys to delete: what was skipped, and messages nothing references.
    remove: Vec<Vec<u8>>,
}

impl Check {
    fn skip(&mut self, key: &[u8]) {
        self.skipped += 1;
        self.remove.push(key.to_vec());
    }
}

/// Reads every record once: checksums, reference counts, orphans.
#[allow(clippy::too_many_lines)] // one pass over every keyspace, each with its own checks
fn check(engine: &Engine) -> Check {
    let mut c = Check::default();
    let mut sessions: HashSet<Vec<u8>> = HashSet::new();
    // Client keys of what belongs to a session: the session's key with the table's tag.
    let owner = |key: &[u8]| codec::split_client_key(key).map(|(id, _)| codec::session_key(&id));
    for tag in TABLES {
        let mut messages = HashSet::new();
        let unreadable = engine.each(&[tag], |k, v| {
            let Ok(body) = codec::unseal(k, v) else {
                if tag == codec::VERSION {
                    // A damaged version record: the raw byte still tells a newer format apart.
                    c.version = v.first().copied().filter(|&b| b > FORMAT_VERSION);
                }
                c.skip(k);
                return;
            };
            let ok = match tag {
                codec::VERSION => {
                    c.version = body.first().copied();
                    body.len() == 1
                }
                codec::SESSION => {
                    let ok = codec::decode_session(body).is_ok();
                    if ok {
                        sessions.insert(k.to_vec());
                    }
                    ok
                }
                codec::SUBSCRIPTION | codec::INCOMING => {
                    owner(k).is_ok_and(|s| sessions.contains(&s))
                        && (tag == codec::INCOMING || codec::decode_subscription(body).is_ok())
                }
                codec::QUEUE | codec::INFLIGHT => {
                    let id = batch::referenced_message(k, v);
                    match (owner(k).is_ok_and(|s| sessions.contains(&s)), id) {
                        (true, Ok(Some(id))) => {
                            c.refs.add(id);
                            true
                        }
                        (true, Ok(None)) => true,
                        _ => false,
                    }
                }
                codec::MESSAGE => match codec::key_u64(&k[1..]) {
                    Ok(id) if codec::decode_message(body).is_ok() => {
                        c.refs.high_water = c.refs.high_water.max(id);
                        if c.refs.count(id) == 0 {
                            // Referenced by nothing: not damage, just not needed.
                            c.remove.push(k.to_vec());
                            return;
                        }
                        messages.insert(id);
                        true
                    }
                    _ => false,
                },
                codec::RETAINED => codec::decode_message(body).is_ok(),
                _ if k == HIGH_WATER_KEY => match <[u8; 8]>::try_from(body) {
                    Ok(b) => {
                        c.refs.high_water = c.refs.high_water.max(u64::from_le_bytes(b));
                        true
                    }
                    Err(_) => false,
                },
                _ => false,
            };
            if ok {
                c.recovered += 1;
            } else {
                c.skip(k);
            }
        });
        c.unreadable += unreadable;
        if tag == codec::MESSAGE {
            // Entries whose message was lost are lost too.
            let lost: HashSet<u64> = c.refs.ids().filter(|id| !messages.contains(id)).collect();
            if !lost.is_empty() {
                for t in [codec::QUEUE, codec::INFLIGHT] {
                    let mut dangling = Vec::new();
                    engine.each(&[t], |k, v| {
                        if let Ok(Some(id)) = batch::referenced_message(k, v) {
                            if lost.contains(&id) {
                                dangling.push(k.to_vec());
                            }
                        }
                    });
                    for k in dangling {
                        c.recovered = c.recovered.saturating_sub(1);
                        c.skip(&k);
                    }
                }
                c.refs.forget(&lost);
            }
        }
    }
    c
}

/// Everything stored, each session's queue up to `queue_head` entries.
#[allow(clippy::too_many_lines)] // one pass over every keyspace into the snapshot
fn load(engine: &Engine, queue_head: usize) -> Snapshot {
    let mut sessions: BTreeMap<ByteStr, SessionSnapshot> = BTreeMap::new();
    let mut heads: Vec<(ByteStr, u64, DeliveryRef)> = Vec::new();
    let mut inflight: Vec<(ByteStr, u16, u64, Option<DeliveryRef>)> = Vec::new();
    let mut wanted = HashSet::new();
    let mut snapshot = Snapshot::default();

    for tag in TABLES {
        let mut messages: HashMap<u64, Arc<StoredMessage>> = HashMap::new();
        engine.each(&[tag], |k, v| {
            let Ok(body) = codec::unseal(k, v) else {
                return;
            };
            let client = || codec::split_client_key(k).ok();
            match tag {
                codec::SESSION => {
                    if let (Some((id, _)), Ok(session)) = (client(), codec::decode_session(body)) {
                        sessions.insert(
                            id.clone(),
                            SessionSnapshot {
                                client_id: id,
                                session,
                                ..SessionSnapshot::default()
                            },
                        );
                    }
                }
                codec::SUBSCRIPTION => {
                    if let Some((id, rest)) = client() {
                        if let (Some(s), Ok(filter), Ok(sub)) = (
                            sessions.get_mut(&id),
                            codec::key_str(rest),
                            codec::decode_subscription(body),
                        ) {
                            s.subscriptions.push((filter, sub));
                        }
                    }
                }
                codec::QUEUE => {
                    if let Some((id, rest)) = client() {
                        if let (Some(s), Ok(seq), Ok(d)) = (
                            sessions.get_mut(&id),
                            codec::key_u64(rest),
                            codec::decode_delivery(body),
                        ) {
                            s.queued += 1;
                            s.last_seq = s.last_seq.max(seq);
                            if (s.queued as usize) <= queue_head {
                                wanted.insert(d.message_id);
                                heads.push((id, seq, d));
                            }
                        }
                    }
                }
                codec::INFLIGHT => {
                    if let Some((id, rest)) = client() {
                        if let (true, Ok(pkid), Ok((order, d))) = (
                            sessions.contains_key(&id),
                            codec::key_u16(rest),
                            codec::decode_inflight(body),
                        ) {
                            if let Some(d) = &d {
                                wanted.insert(d.message_id);
                            }
                            inflight.push((id, pkid, order, d));
                        }
                    }
                }
                codec::INCOMING => {
                    if let Some((id, rest)) = client() {
                        if let (Some(s), Ok(pkid)) = (sessions.get_mut(&id), codec::key_u16(rest)) {
                            s.incoming.push(pkid);
                        }
                    }
                }
                codec::MESSAGE => {
                    if let Ok(id) = codec::key_u64(&k[1..]) {
                        snapshot.max_message_id = snapshot.max_message_id.max(id);
                        if wanted.contains(&id) {
                            if let Ok(m) = codec::decode_message(body) {
                                messages.insert(id, Arc::new(m));
                            }
                        }
                    }
                }
                codec::RETAINED => {
                    if let Ok(m) = codec::decode_message(body) {
                        snapshot.retained.push(m);
                    }
                }
                _ => {}
            }
        });
        if tag == codec::MESSAGE {
            for (id, seq, d) in heads.drain(..) {
                if let (Some(s), Some(m)) = (sessions.get_mut(&id), messages.get(&d.message_id)) {
                    s.queue.push(QueuedEntry {
                        seq,
                        delivery: d.resolve(m.clone()),
                    });
                }
            }
            for (id, pkid, order, d) in inflight.drain(..) {
                let stage = match d {
                    None => InflightStage::PubRel,
                    Some(d) => match messages.get(&d.message_id) {
                        Some(m) => InflightStage::Publish(d.resolve(m.clone())),
                        None => continue,
                    },
                };
                if let Some(s) = sessions.get_mut(&id) {
                    s.inflight.push(InflightEntry { pkid, order, stage });
                }
            }
        }
    }
    snapshot.max_message_id = snapshot
        .retained
        .iter()
        .map(|m| m.id)
        .fold(snapshot.max_message_id, u64::max);
    snapshot.sessions = sessions
        .into_values()
        .map(|mut s| {
            s.inflight.sort_by_key(|e| e.order);
            s
        })
        .collect();
    snapshot
}

/// `YYYYMMDDTHHMMSSZ` for unix seconds `secs` (UTC).
fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {

    #[test]
    fn only_the_newest_copies_set_aside_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        for stamp in [
            "2026-01-01T00-00-00Z",
            "2026-03-01T00-00-00Z",
            "2026-02-01T00-00-00Z",
        ] {
            std::fs::create_dir(dir.path().join(format!("journal.cut-{stamp}"))).unwrap();
        }
        std::fs::write(dir.path().join("db.corrupt-2025-01-01T00-00-00Z"), b"x").unwrap();
        let store = dir.path().join("journal.copy");
        std::fs::create_dir(&store).unwrap();
        let aside = move_aside(&store, "journal.cut").unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left.len(), 4, "{left:?}");
        assert!(
            !left.contains(&"journal.cut-2026-01-01T00-00-00Z".to_owned()),
            "{left:?}"
        );
        assert!(
            left.contains(&"db.corrupt-2025-01-01T00-00-00Z".to_owned()),
            "{left:?}"
        );
        assert!(aside.exists());
    }
    use super::*;

    #[test]
    fn a_newer_format_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join(DB_DIR);
        let engine = Engine::open(&db).unwrap();
        let key = vec![codec::VERSION];
        let mut value = codec::seal(&key, &[FORMAT_VERSION + 1]);
        value[0] = FORMAT_VERSION + 1;
        engine.write(vec![(key, Some(value))], true).unwrap();
        drop(engine);
        for on_corruption in [OnCorruption::Recover, OnCorruption::Stop] {
            let err = recover(dir.path(), on_corruption).err().unwrap();
            assert!(
                matches!(
                    err,
                    StoreError::UnsupportedVersion {
                        found: 2,
                        supported: 1,
                        ..
                    }
                ),
                "{err}"
            );
        }
    }

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_796_130_900), "20261201T131500Z");
    }
}
