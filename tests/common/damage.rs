//! Damage done to a data directory's fjall files, as a crash or a bad disk leaves it.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The fjall journal of data directory `data` holding the newest writes, and where its
/// data ends (journals are preallocated with zeros).
pub fn newest_journal(data: &Path) -> (PathBuf, u64) {
    let journal = std::fs::read_dir(data.join("db"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
        .max_by_key(|p| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok())
        })
        .expect("a journal");
    let bytes = std::fs::read(&journal).unwrap();
    let end = bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |i| i as u64 + 1);
    (journal, end)
}

/// Overwrites `len` bytes of `path` at `at` with zeros, on disk.
pub fn zero(path: &Path, at: u64, len: usize) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&vec![0; len]).unwrap();
    f.sync_all().unwrap();
}
