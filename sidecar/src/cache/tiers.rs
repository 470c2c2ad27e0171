//! The tiers together: the read path with promotion, and the write-behind path.
//!
//! Lookups go L1 -> L2 -> L3 and stop at the first hit, which is copied into the tiers above it
//! (an L3 hit also lands on this replica's disk). Stores put the embedding in L1 at once and queue
//! the encoded bytes for the disk writer and Redis, so a response never waits for either. Every
//! failure of a lower tier is counted and then treated as a miss: the cache can make a request
//! faster, never make it fail.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::Key;
use super::codec::{self, Encoding};
use super::disk::{DiskError, DiskTier};
use super::memory::MemoryTier;
use super::redis::{Lookup, RedisConfig, RedisError, RedisTier};
use crate::labels::{ErrorKind, Tier};
use crate::metrics::Metrics;

/// Disk writes that may wait; beyond it writes are dropped and counted.
const DISK_QUEUE: usize = 4096;
/// Disk writes done per trip to the blocking pool.
const DISK_BATCH: usize = 64;

/// How the cache is set up.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// L1 capacity in entries (0: off until tuning grows it).
    pub memory_entries: u64,
    /// L2 directory.
    pub dir: PathBuf,
    /// L2 budget in bytes (0: no L2).
    pub disk_bytes: u64,
    /// L3, when configured.
    pub redis: Option<RedisConfig>,
    /// How values are stored in L2 and L3.
    pub encoding: Encoding,
}

/// Why the cache could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The disk tier could not be opened.
    #[error("disk cache: {0}")]
    Disk(#[from] DiskError),
    /// The Redis configuration is unusable.
    #[error("redis cache: {0}")]
    Redis(#[from] RedisError),
}

/// An embedding found in the cache and the tier that held it.
pub struct Hit {
    /// The model's output for the image.
    pub value: Arc<[f32]>,
    /// Where it was found.
    pub tier: Tier,
}

enum DiskJob {
    Write(Key, Arc<Vec<u8>>),
    Flush(oneshot::Sender<()>),
}

/// The three tiers.
pub struct Cache {
    dim: usize,
    encoding: Encoding,
    memory: MemoryTier,
    /// The capacity the operator (or the flag) asked for; memory pressure may hold L1 below it.
    target_entries: AtomicU64,
    disk: Option<Arc<DiskTier>>,
    disk_jobs: Option<mpsc::Sender<DiskJob>>,
    /// Whether the last disk write failed (a read-only or full disk): health reports it.
    disk_failing: Arc<AtomicBool>,
    redis: Option<Arc<RedisTier>>,
    metrics: Arc<Metrics>,
}

impl Cache {
    /// Opens the tiers for embeddings of `dim` values. Call inside a tokio runtime: the disk index
    /// is rebuilt in the background (lookups work meanwhile) and Redis connects in the background.
    pub fn open(cfg: &CacheConfig, dim: usize, metrics: Arc<Metrics>) -> Result<Arc<Cache>, CacheError> {
        let disk = match cfg.disk_bytes {
            0 => None,
            budget => Some(Arc::new(DiskTier::open(&cfg.dir, budget)?)),
        };
        let redis = cfg.redis.clone().map(|r| RedisTier::start(r, Arc::clone(&metrics))).transpose()?;
        let disk_failing = Arc::new(AtomicBool::new(false));
        let disk_jobs = disk.as_ref().map(|d| {
            let (tx, rx) = mpsc::channel(DISK_QUEUE);
            let writer =
                DiskWriter { disk: Arc::clone(d), metrics: Arc::clone(&metrics), failing: Arc::clone(&disk_failing) };
            tokio::spawn(writer.run(rx));
            tx
        });
        if let Some(d) = &disk {
            let (d, m) = (Arc::clone(d), Arc::clone(&metrics));
            tokio::task::spawn_blocking(move || match d.recover() {
                Ok(r) => {
                    m.cache_error_n(Tier::Disk, ErrorKind::Corrupt, r.corrupt);
                    tracing::info!(
                        entries = r.entries,
                        bytes = r.bytes,
                        removed = r.removed,
                        corrupt = r.corrupt,
                        "disk cache recovered"
                    );
                }
                Err(e) => {
                    m.cache_error(Tier::Disk, ErrorKind::Io);
                    tracing::warn!(error = %e, "disk cache recovery failed; entries are still read by key");
                }
            });
        }
        metrics.cache_memory_capacity.set(cfg.memory_entries as i64);
        Ok(Arc::new(Cache {
            dim,
            encoding: cfg.encoding,
            memory: MemoryTier::new(cfg.memory_entries),
            target_entries: AtomicU64::new(cfg.memory_entries),
            disk,
            disk_jobs,
            disk_failing,
            redis,
            metrics,
        }))
    }

    /// Whether any tier can hold an answer (memory capacity above zero, a disk tier or Redis).
    pub fn can_answer(&self) -> bool {
        self.memory_target() > 0 || self.disk.is_some() || self.redis.is_some()
    }

    /// Looks `key` up tier by tier; a hit is promoted to the tiers above the one that held it.
    pub async fn lookup(&self, key: &Key) -> Option<Hit> {
        let started = Instant::now();
        let value = self.memory.get(key);
        self.metrics.cache_lookup(Tier::Memory, Some(value.is_some()), started.elapsed());
        if let Some(value) = value {
            return Some(Hit { value, tier: Tier::Memory });
        }
        if let Some(value) = self.disk_lookup(key).await {
            self.memory.insert(*key, Arc::clone(&value));
            return Some(Hit { value, tier: Tier::Disk });
        }
        let redis = self.redis.as_ref()?;
        let started = Instant::now();
        let found = match redis.get(key).await {
            Lookup::Skipped => {
                self.metrics.cache_lookup(Tier::Redis, None, started.elapsed());
                return None;
            }
            Lookup::Miss => None,
            Lookup::Hit(bytes) => self.decode(Tier::Redis, &bytes).map(|v| (v, bytes)),
        };
        self.metrics.cache_lookup(Tier::Redis, Some(found.is_some()), started.elapsed());
        let (value, bytes) = found?;
        self.memory.insert(*key, Arc::clone(&value));
        self.queue_disk(*key, Arc::new(bytes));
        Some(Hit { value, tier: Tier::Redis })
    }

    async fn disk_lookup(&self, key: &Key) -> Option<Arc<[f32]>> {
        let disk = Arc::clone(self.disk.as_ref()?);
        let started = Instant::now();
        let k = *key;
        let read = tokio::task::spawn_blocking(move || disk.get(&k)).await;
        let value = match read {
            Ok(Ok(Some(bytes))) => self.decode(Tier::Disk, &bytes),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => {
                let kind = if matches!(e, DiskError::Corrupt { .. }) { ErrorKind::Corrupt } else { ErrorKind::Io };
                self.metrics.cache_error(Tier::Disk, kind);
                tracing::warn!(error = %e, "disk cache entry dropped");
                None
            }
            Err(e) => {
                self.metrics.cache_error(Tier::Disk, ErrorKind::Io);
                tracing::warn!(error = %e, "disk cache read task failed");
                None
            }
        };
        self.metrics.cache_lookup(Tier::Disk, Some(value.is_some()), started.elapsed());
        value
    }

    fn decode(&self, tier: Tier, bytes: &[u8]) -> Option<Arc<[f32]>> {
        match codec::decode(bytes, self.dim) {
            Ok(v) => Some(Arc::from(v)),
            Err(e) => {
                self.metrics.cache_error(tier, ErrorKind::Corrupt);
                tracing::warn!(tier = tier.as_str(), error = %e, "cached value refused");
                None
            }
        }
    }

    /// Stores a computed embedding: L1 now, L2 and L3 in the background.
    pub fn store(&self, key: Key, value: Arc<[f32]>) {
        self.memory.insert(key, Arc::clone(&value));
        if self.disk.is_none() && self.redis.is_none() {
            return;
        }
        let bytes = Arc::new(codec::encode(&value, self.encoding));
        if let Some(redis) = &self.redis {
            redis.put(key, bytes.to_vec());
        }
        self.queue_disk(key, bytes);
    }

    fn queue_disk(&self, key: Key, bytes: Arc<Vec<u8>>) {
        if let Some(jobs) = &self.disk_jobs
            && jobs.try_send(DiskJob::Write(key, bytes)).is_err()
        {
            self.metrics.cache_error(Tier::Disk, ErrorKind::Dropped);
        }
    }

    /// Waits until every write queued so far has reached the disk and Redis (or was dropped).
    pub async fn flush(&self) {
        if let Some(jobs) = &self.disk_jobs {
            let (tx, rx) = oneshot::channel();
            if jobs.send(DiskJob::Flush(tx)).await.is_ok() {
                let _ = rx.await;
            }
        }
        if let Some(redis) = &self.redis {
            redis.flush().await;
        }
    }

    /// Sets the L1 capacity the operator asked for (tuning), applied at once.
    pub fn set_memory_target(&self, entries: u64) {
        self.target_entries.store(entries, Ordering::Relaxed);
        self.resize_memory(entries);
    }

    /// The L1 capacity asked for, which memory pressure may hold the tier below.
    pub fn memory_target(&self) -> u64 {
        self.target_entries.load(Ordering::Relaxed)
    }

    /// Changes the L1 capacity in force without changing the target (memory pressure).
    pub fn resize_memory(&self, entries: u64) {
        self.memory.resize(entries);
        self.metrics.cache_memory_capacity.set(entries as i64);
    }

    /// The L1 tier.
    pub fn memory(&self) -> &MemoryTier {
        &self.memory
    }

    /// The metrics the cache records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The disk tier's entries, bytes and budget, when it is on.
    pub fn disk_stats(&self) -> Option<(u64, u64, u64)> {
        self.disk.as_ref().map(|d| (d.entries(), d.bytes(), d.budget()))
    }

    /// Whether the disk tier's last write failed for a reason of the disk's (read-only, full,
    /// gone), not of the entry's.
    pub fn disk_writes_failing(&self) -> bool {
        self.disk_failing.load(Ordering::Relaxed)
    }

    /// The Redis tier, when configured.
    pub fn redis(&self) -> Option<&Arc<RedisTier>> {
        self.redis.as_ref()
    }

    /// Empties L1 and, if asked, L2; returns the entries removed per tier.
    pub async fn clear(&self, disk_too: bool) -> Result<(u64, u64), DiskError> {
        let memory = self.memory.clear();
        let disk = match (&self.disk, disk_too) {
            (Some(d), true) => {
                self.flush().await;
                let d = Arc::clone(d);
                tokio::task::spawn_blocking(move || d.clear()).await.unwrap_or(Ok(0))?
            }
            _ => 0,
        };
        self.refresh_gauges();
        Ok((memory, disk))
    }

    /// Updates the entries/bytes gauges (called before metrics are read).
    pub fn refresh_gauges(&self) {
        self.metrics.cache_size(Tier::Memory, self.memory.len(), self.memory.bytes(self.dim));
        if let Some(d) = &self.disk {
            self.metrics.cache_size(Tier::Disk, d.entries(), d.bytes());
        }
    }

    /// What each tier holds, for the admin API.
    pub fn stats(&self) -> serde_json::Value {
        json!({
            "memory": {
                "entries": self.memory.len(),
                "bytes": self.memory.bytes(self.dim),
                "capacity": self.memory.capacity(),
                "target": self.memory_target(),
            },
            "disk": self.disk.as_ref().map(|d| json!({
                "entries": d.entries(), "bytes": d.bytes(), "budget": d.budget(),
            })),
            "redis": self.redis.as_ref().map(|r| json!({
                "connected": r.is_connected(),
                "circuit": format!("{:?}", r.state()).to_ascii_lowercase(),
            })),
            "encoding": format!("{:?}", self.encoding).to_ascii_lowercase(),
        })
    }
}

/// Writes queued entries to disk, a batch per trip to the blocking pool.
struct DiskWriter {
    disk: Arc<DiskTier>,
    metrics: Arc<Metrics>,
    failing: Arc<AtomicBool>,
}

impl DiskWriter {
    async fn run(self, mut rx: mpsc::Receiver<DiskJob>) {
        let this = Arc::new(self);
        let mut jobs = Vec::with_capacity(DISK_BATCH);
        while rx.recv_many(&mut jobs, DISK_BATCH).await > 0 {
            let batch = std::mem::take(&mut jobs);
            let w = Arc::clone(&this);
            let done = tokio::task::spawn_blocking(move || w.write(batch)).await;
            for tx in done.unwrap_or_default() {
                let _ = tx.send(());
            }
        }
    }

    /// Writes one batch; returns the flushes it contained, to be answered once it is on disk.
    fn write(&self, batch: Vec<DiskJob>) -> Vec<oneshot::Sender<()>> {
        let mut flushes = Vec::new();
        for job in batch {
            match job {
                DiskJob::Write(key, bytes) => match self.disk.put(&key, &bytes) {
                    Ok(()) => self.failing.store(false, Ordering::Relaxed),
                    Err(e) => {
                        self.metrics.cache_error(Tier::Disk, ErrorKind::Io);
                        let disk_fault = !matches!(e, DiskError::TooLarge { .. });
                        // One line when writes start failing, not one per entry of a full disk.
                        if disk_fault && !self.failing.swap(true, Ordering::Relaxed) {
                            tracing::warn!(error = %e, "disk cache writes fail; serving from the other tiers until one succeeds");
                        } else {
                            tracing::debug!(error = %e, "disk cache write failed");
                        }
                    }
                },
                DiskJob::Flush(tx) => flushes.push(tx),
            }
        }
        flushes
    }
}
