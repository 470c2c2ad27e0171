//! The L2 tier of the embedding cache: one file per entry on the local disk, bounded by a byte budget.
//!
//! Layout: `<dir>/<first 2 hex chars of the key>/<64 hex chars>`, so no directory grows past a few
//! thousand names. A write goes to `<dir>/tmp/` and is `rename`d into place, so a reader sees the
//! old file or the new one, never half of one. Nothing is fsynced: this is a cache, and a file torn
//! by a crash is caught by its checksum, deleted and read as a miss.
//!
//! Entry format (little-endian): magic `IPDC`, format version (u32), the 32-byte key, the value
//! length (u32), the first 16 bytes of blake3 over key, length and value, then the value. [`DiskTier::get`]
//! checks all of it, so a file with any content fails a check instead of panicking.
//!
//! The budget counts what the disk really spends: each entry is accounted as its file length rounded
//! up to a 4 KiB block. Eviction runs before an insert, so [`DiskTier::bytes`] never exceeds the budget
//! once a `put` returns.
//!
//! Eviction is an approximated LFU with aging, as in Redis: every index entry carries a saturating
//! hit counter and the tick of its last access, and to make room the tier samples 8 random entries and
//! evicts the one with the lowest (counter, last access). All counters are halved whenever more
//! operations than 8 × entries have happened since the last halving, so entries that were hot
//! yesterday but are cold now lose their lead and can leave.
//!
//! Concurrency: the index sits behind one mutex that guards no file I/O. File changes to one key's
//! path (rename into place, deletion after eviction or corruption) are serialised by a striped lock
//! taken before the index lock; an evicted file is only unlinked if its key has not been re-admitted
//! meanwhile, which keeps the index and the files in step. A file that vanishes under a reader is a miss.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fs::{self, File};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};

use super::{KEY_LEN, Key};

const MAGIC: [u8; 4] = *b"IPDC";
const VERSION: u32 = 1;
const KEY_AT: usize = 8;
const LEN_AT: usize = KEY_AT + KEY_LEN;
const SUM_AT: usize = LEN_AT + 4;
const SUM_LEN: usize = 16;
/// Bytes before the value in an entry file.
pub const HEADER_LEN: usize = SUM_AT + SUM_LEN;
/// The filesystem block an entry is rounded up to in the accounting.
pub const BLOCK: u64 = 4096;
/// Entries sampled per eviction.
const SAMPLES: usize = 8;
/// Locks that serialise file changes per key; keys are hashes, so their first byte spreads evenly.
const STRIPES: usize = 64;
const TMP_DIR: &str = "tmp";

/// Why the disk tier failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// An entry failed its checks; it has been deleted and will read as a miss from now on.
    #[error("disk cache entry {} is corrupt ({reason}); deleted", path.display())]
    Corrupt {
        /// The entry's file.
        path: PathBuf,
        /// Which check failed.
        reason: &'static str,
    },
    /// A read or write failed.
    #[error("disk cache I/O failed on {}", path.display())]
    Io {
        /// The file or directory that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The value can never fit in the budget.
    #[error("a {bytes}-byte entry can never fit the {budget}-byte disk cache budget")]
    TooLarge {
        /// The entry's accounted size.
        bytes: u64,
        /// The tier's budget.
        budget: u64,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DiskError + '_ {
    move |source| DiskError::Io { path: path.to_path_buf(), source }
}

/// What [`DiskTier::recover`] found on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Entries indexed after the scan.
    pub entries: u64,
    /// Accounted bytes after the scan.
    pub bytes: u64,
    /// Leftover temp files and badly named files deleted, plus entries evicted to fit the budget
    /// and the corrupt ones below.
    pub removed: u64,
    /// Entries deleted because their length cannot be right (torn or truncated files).
    pub corrupt: u64,
}

/// The disk tier: a directory of checksummed entry files with an in-memory LFU index.
pub struct DiskTier {
    dir: PathBuf,
    budget: u64,
    index: Mutex<Index>,
    stripes: [Mutex<()>; STRIPES],
    /// Names this instance's temp files, so `recover` never deletes a write still in flight.
    tmp_prefix: String,
    tmp_seq: AtomicU64,
}

impl DiskTier {
    /// Opens (creating if needed) the tier in `dir`. Does not scan: call [`DiskTier::recover`] for that.
    pub fn open(dir: &Path, budget_bytes: u64) -> Result<DiskTier, DiskError> {
        let tmp = dir.join(TMP_DIR);
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let seed = RandomState::new().build_hasher().finish();
        Ok(DiskTier {
            dir: dir.to_path_buf(),
            budget: budget_bytes,
            index: Mutex::new(Index::new(seed)),
            stripes: std::array::from_fn(|_| Mutex::new(())),
            tmp_prefix: format!("{}-{:016x}-", std::process::id(), seed),
            tmp_seq: AtomicU64::new(0),
        })
    }

    /// Scans the directory (metadata only), indexes the entries found, deletes leftover temp files
    /// and badly named files, and evicts down to the budget.
    pub fn recover(&self) -> Result<Recovered, DiskError> {
        let (mut removed, mut corrupt) = (0, 0);
        let mut found = Vec::new();
        for top in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let top = top.map_err(io_err(&self.dir))?;
            let (path, name) = (top.path(), top.file_name());
            let is_dir = top.file_type().map_err(io_err(&path))?.is_dir();
            let shard = name.to_str().filter(|n| n.len() == 2 && n.bytes().all(|b| b.is_ascii_hexdigit()));
            if !is_dir {
                removed += remove_quietly(&path);
            } else if name == TMP_DIR {
                for f in fs::read_dir(&path).map_err(io_err(&path))? {
                    let f = f.map_err(io_err(&path))?;
                    let ours = f.file_name().to_str().is_some_and(|n| n.starts_with(&self.tmp_prefix));
                    if !ours && f.file_type().is_ok_and(|t| t.is_file()) {
                        removed += remove_quietly(&f.path());
                    }
                }
            } else if let Some(shard) = shard {
                for f in fs::read_dir(&path).map_err(io_err(&path))? {
                    let f = f.map_err(io_err(&path))?;
                    // A file evicted since the listing is simply gone; a sub-directory is not ours to judge.
                    let Ok(meta) = f.metadata() else { continue };
                    if meta.is_dir() {
                        continue;
                    }
                    match f.file_name().to_str().and_then(|n| key_of_name(shard, n)) {
                        Some(key) if self.plausible_len(meta.len()) => found.push((key, accounted(meta.len()))),
                        // An entry whose length cannot be right was torn or truncated.
                        Some(_) => corrupt += remove_quietly(&f.path()),
                        None => removed += remove_quietly(&f.path()),
                    }
                }
            }
            // Other directories are left alone: never delete a tree this tier did not write.
        }
        let victims = {
            let mut index = self.lock_index();
            for (key, bytes) in found {
                index.insert_recovered(key, bytes);
            }
            index.shrink_to(self.budget)
        };
        removed += self.discard(victims);
        let index = self.lock_index();
        Ok(Recovered { entries: index.keys.len() as u64, bytes: index.total, removed: removed + corrupt, corrupt })
    }

    /// Reads the value under `key`. Works before [`DiskTier::recover`] ran, since it reads by path.
    pub fn get(&self, key: &Key) -> Result<Option<Vec<u8>>, DiskError> {
        let path = self.path_of(key);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget_missing(key, &path);
                return Ok(None);
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let meta = file.metadata().map_err(io_err(&path))?;
        let checked = if self.plausible_len(meta.len()) {
            // Read at most one byte past the advertised length, so a file growing under us is caught
            // by the length check instead of being read without bound.
            let mut buf = Vec::with_capacity(meta.len() as usize);
            (&mut file).take(meta.len() + 1).read_to_end(&mut buf).map_err(io_err(&path))?;
            decode(key, buf)
        } else {
            Err("too short or too long for an entry")
        };
        match checked {
            Ok(value) => {
                let bytes = accounted((HEADER_LEN + value.len()) as u64);
                let victims = self.lock_index().touch_or_admit(*key, bytes, self.budget);
                self.discard(victims);
                Ok(Some(value))
            }
            Err(reason) => {
                self.delete_corrupt(key, &path, &meta);
                Err(DiskError::Corrupt { path, reason })
            }
        }
    }

    /// Stores `value` under `key`, replacing any existing entry and evicting others to fit the budget.
    pub fn put(&self, key: &Key, value: &[u8]) -> Result<(), DiskError> {
        let len = u32::try_from(value.len())
            .map_err(|_| DiskError::TooLarge { bytes: value.len() as u64, budget: self.budget })?;
        let bytes = accounted((HEADER_LEN + value.len()) as u64);
        if bytes > self.budget {
            return Err(DiskError::TooLarge { bytes, budget: self.budget });
        }
        let tmp = self.write_tmp(&encode(key, len, value))?;
        let path = self.path_of(key);
        let victims = {
            let stripe = self.stripe(key);
            let victims = self.lock_index().admit(*key, bytes, self.budget);
            if let Err(e) = rename_into_place(&tmp, &path) {
                // Whatever is at the path now is stale or absent; drop both so index and disk agree.
                self.lock_index().remove(key);
                remove_quietly(&path);
                remove_quietly(&tmp);
                drop(stripe);
                self.discard(victims);
                return Err(io_err(&path)(e));
            }
            victims
        };
        self.discard(victims);
        Ok(())
    }

    /// Removes every entry (indexed or not), returning how many files were deleted.
    pub fn clear(&self) -> Result<u64, DiskError> {
        self.lock_index().clear();
        let mut removed = 0;
        for top in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let top = top.map_err(io_err(&self.dir))?;
            let name = top.file_name();
            let Some(shard) = name.to_str().filter(|_| top.file_type().is_ok_and(|t| t.is_dir())) else {
                continue;
            };
            let dir = top.path();
            for f in fs::read_dir(&dir).map_err(io_err(&dir))? {
                let f = f.map_err(io_err(&dir))?;
                if let Some(key) = f.file_name().to_str().and_then(|n| key_of_name(shard, n)) {
                    // A put that landed after the index was emptied is a new entry; keep it.
                    let _stripe = self.stripe(&key);
                    if !self.lock_index().map.contains_key(&key) {
                        removed += remove_quietly(&f.path());
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Entries in the index.
    pub fn entries(&self) -> u64 {
        self.lock_index().keys.len() as u64
    }

    /// Accounted bytes of the indexed entries (file lengths rounded up to [`BLOCK`]).
    pub fn bytes(&self) -> u64 {
        self.lock_index().total
    }

    /// The byte budget this tier keeps [`DiskTier::bytes`] under.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    fn path_of(&self, key: &Key) -> PathBuf {
        let hex = key.hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Whether a file this long can hold an entry that fits the budget; bounds what `get` will read.
    fn plausible_len(&self, file_len: u64) -> bool {
        (HEADER_LEN as u64..=HEADER_LEN as u64 + u64::from(u32::MAX)).contains(&file_len)
            && accounted(file_len) <= self.budget
    }

    fn lock_index(&self) -> MutexGuard<'_, Index> {
        // The index is consistent after every statement that can panic, so a poisoned lock is usable.
        self.index.lock()
    }

    fn stripe(&self, key: &Key) -> MutexGuard<'_, ()> {
        self.stripes[key.0[0] as usize % STRIPES].lock()
    }

    fn write_tmp(&self, data: &[u8]) -> Result<PathBuf, DiskError> {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(TMP_DIR).join(format!("{}{seq}", self.tmp_prefix));
        let written = File::create_new(&tmp).and_then(|mut f| f.write_all(data));
        if let Err(e) = written {
            remove_quietly(&tmp);
            return Err(io_err(&tmp)(e));
        }
        Ok(tmp)
    }

    /// Deletes evicted files, skipping keys that were re-admitted since; returns how many went.
    fn discard(&self, victims: Vec<Key>) -> u64 {
        let mut removed = 0;
        for key in victims {
            let _stripe = self.stripe(&key);
            if !self.lock_index().map.contains_key(&key) {
                // A failed unlink leaves an orphan file that the next recover() sweeps up.
                removed += remove_quietly(&self.path_of(&key));
            }
        }
        removed
    }

    /// Drops an indexed entry whose file is gone (deleted from outside, or lost a race).
    fn forget_missing(&self, key: &Key, path: &Path) {
        let _stripe = self.stripe(key);
        if self.lock_index().map.contains_key(key) && matches!(path.try_exists(), Ok(false)) {
            self.lock_index().remove(key);
        }
    }

    /// Deletes the corrupt file that was read, unless a put has already replaced it with a new one.
    fn delete_corrupt(&self, key: &Key, path: &Path, read: &fs::Metadata) {
        let _stripe = self.stripe(key);
        let same = fs::symlink_metadata(path).is_ok_and(|m| m.ino() == read.ino() && m.dev() == read.dev());
        if same {
            remove_quietly(path);
            self.lock_index().remove(key);
        }
    }
}

/// Removes a file, treating "already gone" as done; returns 1 if this call deleted it.
fn remove_quietly(path: &Path) -> u64 {
    u64::from(fs::remove_file(path).is_ok())
}

fn rename_into_place(tmp: &Path, path: &Path) -> io::Result<()> {
    match fs::rename(tmp, path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Shard directories are created on first use rather than all 256 at open.
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::rename(tmp, path)
        }
        other => other,
    }
}

/// A file length is accounted as the blocks it occupies.
fn accounted(file_len: u64) -> u64 {
    file_len.div_ceil(BLOCK) * BLOCK
}

/// The key an entry file in directory `shard` is named for; only the exact name `put` writes counts.
fn key_of_name(shard: &str, name: &str) -> Option<Key> {
    Key::from_hex(name).filter(|k| name.starts_with(shard) && k.hex() == name)
}

fn checksum(key: &Key, len: u32, value: &[u8]) -> [u8; SUM_LEN] {
    let mut h = blake3::Hasher::new();
    h.update(&key.0);
    h.update(&len.to_le_bytes());
    h.update(value);
    let mut sum = [0; SUM_LEN];
    sum.copy_from_slice(&h.finalize().as_bytes()[..SUM_LEN]);
    sum
}

/// The bytes of an entry file.
fn encode(key: &Key, len: u32, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + value.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&key.0);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&checksum(key, len, value));
    out.extend_from_slice(value);
    out
}

/// Checks an entry file read for `key` and returns its value, or which check failed.
fn decode(key: &Key, mut file: Vec<u8>) -> Result<Vec<u8>, &'static str> {
    let header = file.get(..HEADER_LEN).ok_or("shorter than the header")?;
    if header[..4] != MAGIC {
        return Err("bad magic");
    }
    if header[4..KEY_AT] != VERSION.to_le_bytes() {
        return Err("unknown format version");
    }
    if header[KEY_AT..LEN_AT] != key.0 {
        return Err("holds another key");
    }
    let len = u32::from_le_bytes([header[LEN_AT], header[LEN_AT + 1], header[LEN_AT + 2], header[LEN_AT + 3]]);
    if file.len() - HEADER_LEN != len as usize {
        return Err("length does not match the header");
    }
    if header[SUM_AT..HEADER_LEN] != checksum(key, len, &file[HEADER_LEN..]) {
        return Err("checksum mismatch");
    }
    file.drain(..HEADER_LEN);
    Ok(file)
}

/// One indexed entry.
struct Slot {
    bytes: u64,
    freq: u16,
    last: u64,
    /// Position in `Index::keys`, for O(1) removal.
    pos: usize,
}

/// The in-memory LFU index: pure bookkeeping, no I/O.
struct Index {
    map: HashMap<Key, Slot>,
    /// Every indexed key, so sampling a random entry is O(1).
    keys: Vec<Key>,
    total: u64,
    tick: u64,
    ops_since_aging: u64,
    rng: u64,
}

impl Index {
    fn new(seed: u64) -> Index {
        Index { map: HashMap::new(), keys: Vec::new(), total: 0, tick: 0, ops_since_aging: 0, rng: seed | 1 }
    }

    /// Advances the clock and halves every counter once enough operations have passed.
    fn step(&mut self) -> u64 {
        self.tick += 1;
        self.ops_since_aging += 1;
        if self.ops_since_aging > self.keys.len() as u64 * 8 {
            self.ops_since_aging = 0;
            self.map.values_mut().for_each(|s| s.freq /= 2);
        }
        self.tick
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64: sampling needs spread, not quality.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Inserts or replaces `key`, evicting others first so the total stays within `budget`.
    /// Returns the evicted keys, whose files the caller deletes.
    fn admit(&mut self, key: Key, bytes: u64, budget: u64) -> Vec<Key> {
        let tick = self.step();
        if bytes > budget {
            // put() refuses these up front; this guards get() indexing a file that grew under it.
            self.remove(&key);
            return vec![key];
        }
        let old = self.map.get(&key).map_or(0, |s| s.bytes);
        let mut victims = Vec::new();
        while self.total - old + bytes > budget {
            let Some(victim) = self.pick_victim(Some(&key)) else { break };
            self.remove(&victim);
            victims.push(victim);
        }
        match self.map.get_mut(&key) {
            Some(slot) => {
                self.total = self.total - slot.bytes + bytes;
                slot.bytes = bytes;
                slot.freq = slot.freq.saturating_add(1);
                slot.last = tick;
            }
            None => {
                self.map.insert(key, Slot { bytes, freq: 1, last: tick, pos: self.keys.len() });
                self.keys.push(key);
                self.total += bytes;
            }
        }
        victims
    }

    /// Counts a hit on `key`, indexing it if it is not yet (a file read before recover ran).
    fn touch_or_admit(&mut self, key: Key, bytes: u64, budget: u64) -> Vec<Key> {
        if !self.map.contains_key(&key) {
            return self.admit(key, bytes, budget);
        }
        let tick = self.step();
        if let Some(slot) = self.map.get_mut(&key) {
            slot.freq = slot.freq.saturating_add(1);
            slot.last = tick;
        }
        Vec::new()
    }

    /// Indexes an entry found by the scan, unless a get or put indexed it already.
    fn insert_recovered(&mut self, key: Key, bytes: u64) {
        if !self.map.contains_key(&key) {
            // Tick 0: found entries are older than anything accessed since start-up.
            self.map.insert(key, Slot { bytes, freq: 1, last: 0, pos: self.keys.len() });
            self.keys.push(key);
            self.total += bytes;
        }
    }

    /// Evicts until the total fits `budget`; returns the evicted keys.
    fn shrink_to(&mut self, budget: u64) -> Vec<Key> {
        let mut victims = Vec::new();
        while self.total > budget {
            let Some(victim) = self.pick_victim(None) else { break };
            self.remove(&victim);
            victims.push(victim);
        }
        victims
    }

    /// The least valuable of a few random entries other than `spare`.
    fn pick_victim(&mut self, spare: Option<&Key>) -> Option<Key> {
        let mut best: Option<(u16, u64, Key)> = None;
        for _ in 0..SAMPLES {
            if self.keys.is_empty() {
                return None;
            }
            let at = (self.next_rand() % self.keys.len() as u64) as usize;
            let key = self.keys[at];
            let Some(slot) = self.map.get(&key).filter(|_| Some(&key) != spare) else { continue };
            if best.is_none_or(|(f, l, _)| (slot.freq, slot.last) < (f, l)) {
                best = Some((slot.freq, slot.last, key));
            }
        }
        // With very few entries every sample can hit `spare`; fall back to any other key.
        best.map(|(_, _, k)| k).or_else(|| self.keys.iter().find(|k| Some(*k) != spare).copied())
    }

    fn remove(&mut self, key: &Key) -> Option<Slot> {
        let slot = self.map.remove(key)?;
        self.keys.swap_remove(slot.pos);
        if let Some(moved) = self.keys.get(slot.pos)
            && let Some(s) = self.map.get_mut(moved)
        {
            s.pos = slot.pos;
        }
        self.total -= slot.bytes;
        Some(slot)
    }

    fn clear(&mut self) {
        self.map.clear();
        self.keys.clear();
        self.total = 0;
    }
}

#[cfg(test)]
mod tests;
