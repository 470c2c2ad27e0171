//! Bounded label sets shared by the cache (which reports with them), the metrics (which export
//! them) and the SLA windows (which count hits by tier).
//!
//! They live apart from all three so that none of them needs another only for its vocabulary: the
//! cache records into the metrics, and the metrics hold the SLA windows.

/// A cache tier, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// L1: in-process memory.
    Memory,
    /// L2: the local disk.
    Disk,
    /// L3: Redis, shared by the replicas of a pool.
    Redis,
}

impl Tier {
    /// Every tier, top first.
    pub const ALL: [Tier; 3] = [Tier::Memory, Tier::Disk, Tier::Redis];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::Redis => "redis",
        }
    }
}

/// Why a tier failed, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A stored entry failed its checksum or format check; it was dropped.
    Corrupt,
    /// The tier did not answer within its timeout.
    Timeout,
    /// The tier could not be reached.
    Connection,
    /// A local read or write failed.
    Io,
    /// A write was dropped because the write-behind queue was full.
    Dropped,
    /// The tier answered something unexpected.
    Protocol,
}

impl ErrorKind {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connection => "connection",
            ErrorKind::Io => "io",
            ErrorKind::Dropped => "dropped",
            ErrorKind::Protocol => "protocol",
        }
    }
}
