//! The Redis tier (L3) of the embedding cache, shared by the replicas of a pool.
//!
//! Redis is an optimisation, never a dependency: a request must not fail or wait long because
//! Redis is slow, down or not there yet. So:
//! - [`RedisTier::start`] only validates the URL; a background task connects, retrying with
//!   backoff, and the [`ConnectionManager`] it gets reconnects by itself afterwards.
//! - Every operation runs under a timeout (the lookup budget, or ten times it for profiles and
//!   write-behind batches, whose values are bigger), and a [`Breaker`] skips the tier outright after
//!   a few consecutive failures; see [`super::breaker`].
//! - Lookups are batched: a reader task takes whatever lookups are waiting and sends one `MGET`, so
//!   a burst of requests costs one round trip. Writes are queued for a write-behind task that
//!   pipelines them; a full queue drops writes instead of slowing anyone.
//!
//! Keys (docs/cache.md has the layout): embeddings at `{embedding prefix}emb:{hex key}` with a
//! TTL; profiles in the hash `{prefix}profiles` (an empty value is a deletion's tombstone, so other
//! replicas learn of it), with a counter `{prefix}profiles:version` incremented in the same
//! transaction as each change, so a replica polls one small key to learn whether anything changed.
//! The operator gives each pool its own prefix, so pools on one Redis never see each other's
//! keys; the embedding prefix is the pool's too unless the pool opts into sharing embeddings (the
//! key hashes the model fingerprint, so only pools serving the same model ever share an entry).
//!
//! Failures are counted in `inferpool_cache_errors_total{tier="redis"}` by kind and the breaker's
//! state is exported as `inferpool_cache_circuit_state`. Logs name Redis by `host:port` only: the
//! URL may carry a password.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ConnectionAddr, FromRedisValue, Pipeline, RedisResult};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::error::Elapsed;

use self::url::{connection_info, redact};
use super::Key;
pub use super::breaker::BreakerState;
use super::breaker::{Admit, Breaker};
use crate::labels::{ErrorKind, Tier};
use crate::metrics::Metrics;

mod url;

/// Most lookups in one `MGET`, and most writes in one pipeline.
const BATCH: usize = 128;
/// Writes waiting for the write-behind task; more are dropped.
const WRITE_QUEUE: usize = 4096;
/// Lookups waiting for the reader task; they wait at most one lookup budget anyway.
const LOOKUP_QUEUE: usize = 4096;
/// First delay between connection attempts; it doubles (plus jitter) up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest delay between connection attempts.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Profile operations and write batches get this many lookup budgets...
const SLOW_FACTOR: u32 = 10;
/// ...and at least this long.
const SLOW_MIN: Duration = Duration::from_millis(200);
/// Shortest budget for establishing a connection (TCP, TLS and the handshake).
const CONNECT_MIN: Duration = Duration::from_secs(1);

/// How to reach Redis and how to use it.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db` or `rediss://...` for TLS.
    pub url: String,
    /// ACL username (e.g. from a Secret); overrides the URL's.
    pub username: Option<String>,
    /// Password read from a file or the environment; overrides the URL's.
    pub password: Option<String>,
    /// How long embeddings live in Redis.
    pub ttl: Duration,
    /// Budget for one lookup; a lookup that takes longer is skipped.
    pub timeout: Duration,
    /// Prefix of the pool's own keys (profiles), e.g. `inferpool:prod:shop:`.
    pub prefix: String,
    /// Prefix of embedding entries: the pool's prefix, or one shared by pools that opt in.
    pub embedding_prefix: String,
}

impl RedisConfig {
    /// Settings for `url` with the defaults the sidecar's flags have: no credentials beyond the
    /// URL's, a one-hour TTL, a 20 ms lookup budget, and `prefix` for every key.
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> RedisConfig {
        let prefix = prefix.into();
        RedisConfig {
            url: url.into(),
            username: None,
            password: None,
            ttl: Duration::from_secs(3600),
            timeout: Duration::from_millis(20),
            embedding_prefix: prefix.clone(),
            prefix,
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact(&self.url))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("ttl", &self.ttl)
            .field("timeout", &self.timeout)
            .field("prefix", &self.prefix)
            .field("embedding_prefix", &self.embedding_prefix)
            .finish()
    }
}

/// Why a Redis operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The URL is not a usable `redis://` or `rediss://` URL.
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(String),
    /// Not connected yet, the connection is lost, or the circuit breaker is open.
    #[error("Redis is unavailable (not connected, or the circuit breaker is open)")]
    Unavailable,
    /// Redis did not answer within the budget.
    #[error("Redis did not answer in time")]
    Timeout,
    /// Redis answered with an error.
    #[error("Redis command failed: {0}")]
    Command(String),
}

/// The answer to one lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The stored bytes.
    Hit(Vec<u8>),
    /// Redis answered: no such key.
    Miss,
    /// Redis was not asked (breaker open, not connected) or did not answer in time; any failure
    /// is counted in the metrics.
    Skipped,
}

/// Every profile with the version it was read at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileSnapshot {
    /// The value of the version counter, read in the same transaction as the entries.
    pub version: u64,
    /// Profiles by id, sorted; `None` is a deleted profile (tombstone).
    pub entries: Vec<(String, Option<Vec<u8>>)>,
}

/// The Redis tier: batched lookups, write-behind writes and profile storage; see the module docs.
pub struct RedisTier {
    shared: Arc<Shared>,
    lookups: mpsc::Sender<(Key, oneshot::Sender<Lookup>)>,
    writes: mpsc::Sender<Write>,
}

/// What the tier's handle and its tasks share.
struct Shared {
    metrics: Arc<Metrics>,
    /// `host:port`, the only part of the URL that is logged.
    addr: String,
    prefix: String,
    embedding_prefix: String,
    ttl_ms: u64,
    timeout: Duration,
    slow_timeout: Duration,
    /// Set once, by the connect task; the manager reconnects by itself after that.
    conn: OnceLock<ConnectionManager>,
    connected: watch::Sender<bool>,
    breaker: Mutex<Breaker>,
    state: watch::Sender<BreakerState>,
}

/// One command or pipeline, so that it can be sent again.
#[derive(Clone, Copy)]
enum Request<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a Pipeline),
}

impl Request<'_> {
    async fn query<T: FromRedisValue>(self, conn: &mut ConnectionManager) -> RedisResult<T> {
        match self {
            Request::Cmd(cmd) => cmd.query_async(conn).await,
            Request::Pipe(pipe) => pipe.query_async(conn).await,
        }
    }
}

/// A message to the write-behind task.
enum Write {
    Set(Key, Vec<u8>),
    /// Answered once every write queued before it has been sent or dropped.
    Flush(oneshot::Sender<()>),
}

impl RedisTier {
    /// Validates the URL and returns at once; a background task connects, retrying with backoff
    /// (100 ms doubling to 5 s, with jitter), so Redis being down at start is not an error.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(cfg: RedisConfig, metrics: Arc<Metrics>) -> Result<Arc<RedisTier>, RedisError> {
        let info = connection_info(&cfg)?;
        if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
            // rustls needs a process-wide crypto provider; an error means one is installed already.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let addr = info.addr().to_string();
        let client = Client::open(info).map_err(|e| RedisError::InvalidUrl(e.to_string()))?;
        let slow_timeout = (cfg.timeout * SLOW_FACTOR).max(SLOW_MIN);
        // The manager's response timeout is a backstop for requests abandoned by the outer
        // timeouts. It makes one attempt per reconnect: retrying with backoff inside the manager
        // would keep requests waiting out their budget for a connection that is not coming,
        // whereas failing at once lets the breaker (and the connect loop) pace the attempts.
        let manager_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(slow_timeout.max(CONNECT_MIN)))
            .set_response_timeout(Some(slow_timeout))
            .set_number_of_retries(0)
            .set_min_delay(RETRY_MIN)
            .set_max_delay(RETRY_MAX);
        metrics.cache_circuit(Tier::Redis, BreakerState::Closed.gauge());
        let shared = Arc::new(Shared {
            metrics,
            addr,
            prefix: cfg.prefix,
            embedding_prefix: cfg.embedding_prefix,
            ttl_ms: u64::try_from(cfg.ttl.as_millis()).unwrap_or(u64::MAX).max(1),
            timeout: cfg.timeout,
            slow_timeout,
            conn: OnceLock::new(),
            connected: watch::Sender::new(false),
            breaker: Mutex::new(Breaker::new(Instant::now())),
            state: watch::Sender::new(BreakerState::Closed),
        });
        let (lookups, lookup_rx) = mpsc::channel(LOOKUP_QUEUE);
        let (writes, write_rx) = mpsc::channel(WRITE_QUEUE);
        tokio::spawn(connect_loop(Arc::downgrade(&shared), client, manager_cfg));
        tokio::spawn(read_loop(shared.clone(), lookup_rx));
        tokio::spawn(write_loop(shared.clone(), write_rx));
        Ok(Arc::new(RedisTier { shared, lookups, writes }))
    }

    /// Looks `key` up, within the lookup budget whatever Redis does.
    pub async fn get(&self, key: &Key) -> Lookup {
        if self.shared.conn.get().is_none() {
            return Lookup::Skipped;
        }
        let (tx, rx) = oneshot::channel();
        let ask = async {
            self.lookups.send((*key, tx)).await.ok()?;
            rx.await.ok()
        };
        // The reader times its MGET out too (and counts it); this bounds the wait in its queue.
        match tokio::time::timeout(self.shared.timeout, ask).await {
            Ok(Some(found)) => found,
            Ok(None) | Err(_) => Lookup::Skipped,
        }
    }

    /// Queues a write (`SET key value PX ttl`) for the write-behind task and returns at once; when
    /// the queue is full, the breaker is open or Redis is not connected, the write is dropped and
    /// counted as [`ErrorKind::Dropped`].
    pub fn put(&self, key: Key, value: Vec<u8>) {
        let skip = self.shared.conn.get().is_none() || self.state() == BreakerState::Open;
        if skip || self.writes.try_send(Write::Set(key, value)).is_err() {
            self.shared.metrics.cache_error(Tier::Redis, ErrorKind::Dropped);
        }
    }

    /// The circuit breaker's state.
    pub fn state(&self) -> BreakerState {
        *self.shared.state.borrow()
    }

    /// Follows the circuit breaker's state, for tests and readiness reports.
    pub fn subscribe_state(&self) -> watch::Receiver<BreakerState> {
        self.shared.state.subscribe()
    }

    /// Whether the tier holds a connection that worked for its last operation.
    pub fn is_connected(&self) -> bool {
        *self.shared.connected.borrow()
    }

    /// Follows [`RedisTier::is_connected`].
    pub fn subscribe_connected(&self) -> watch::Receiver<bool> {
        self.shared.connected.subscribe()
    }

    /// Resolves once every write queued before the call has been sent (or dropped). For tests and
    /// shutdown.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.writes.send(Write::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Stores a profile (its value must not be empty: that is a tombstone) and bumps the version.
    pub async fn profile_put(&self, id: &str, value: &[u8]) -> Result<(), RedisError> {
        self.profile_change(id, value).await
    }

    /// Deletes a profile by writing its tombstone, so other replicas see the deletion.
    pub async fn profile_delete(&self, id: &str) -> Result<(), RedisError> {
        self.profile_change(id, b"").await
    }

    /// `Ok(None)` while the profiles' version is still `seen`; otherwise every profile with its
    /// version.
    pub async fn profiles_since(&self, seen: u64) -> Result<Option<ProfileSnapshot>, RedisError> {
        let version_key = self.shared.key("profiles:version");
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&version_key);
        let (version,): (Option<u64>,) = self.shared.call(self.shared.slow_timeout, Request::Pipe(&pipe)).await?;
        if version.unwrap_or(0) == seen {
            return Ok(None);
        }
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("GET").arg(&version_key).cmd("HGETALL").arg(self.shared.key("profiles"));
        let (version, all): (Option<u64>, HashMap<String, Vec<u8>>) =
            self.shared.call(self.shared.slow_timeout, Request::Pipe(&pipe)).await?;
        let mut entries: Vec<_> =
            all.into_iter().map(|(id, value)| (id, Some(value).filter(|v| !v.is_empty()))).collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(Some(ProfileSnapshot { version: version.unwrap_or(0), entries }))
    }

    async fn profile_change(&self, id: &str, value: &[u8]) -> Result<(), RedisError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(self.shared.key("profiles"))
            .arg(id)
            .arg(value)
            .ignore()
            .cmd("INCR")
            .arg(self.shared.key("profiles:version"))
            .ignore();
        self.shared.call(self.shared.slow_timeout, Request::Pipe(&pipe)).await
    }
}

impl Shared {
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn emb_key(&self, key: &Key) -> String {
        format!("{}emb:{}", self.embedding_prefix, key.hex())
    }

    /// The connection and the breaker's permission for one operation, or `None` to skip it.
    fn admit(&self) -> Option<(ConnectionManager, Admit)> {
        let conn = self.conn.get()?.clone();
        let mut breaker = self.breaker.lock();
        let (how, changed) = breaker.admit(Instant::now());
        if let Some(state) = changed {
            self.report(state, &breaker);
        }
        (how != Admit::Reject).then_some((conn, how))
    }

    /// Counts an operation's outcome, feeds it to the breaker and maps its error.
    fn finish<T>(&self, how: Admit, result: Result<RedisResult<T>, Elapsed>) -> Result<T, RedisError> {
        let failure = match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err((classify(&e), Some(e))),
            Err(_) => Err((ErrorKind::Timeout, None)),
        };
        let kind = failure.as_ref().err().map(|(kind, _)| *kind);
        if let Some(kind) = kind {
            self.metrics.cache_error(Tier::Redis, kind);
        }
        // Redis answering with an error is still Redis answering: only an unreachable or silent
        // Redis counts against the breaker.
        let reachable = !matches!(kind, Some(ErrorKind::Timeout | ErrorKind::Connection));
        // A timeout says nothing about the connection; an answer, even an error, says it works.
        if kind != Some(ErrorKind::Timeout) {
            let up = kind != Some(ErrorKind::Connection);
            self.connected.send_if_modified(|c| std::mem::replace(c, up) != up);
        }
        {
            let mut breaker = self.breaker.lock();
            if let Some(state) = breaker.record(Instant::now(), how, reachable) {
                self.report(state, &breaker);
            }
        }
        failure.map_err(|(kind, e)| match (kind, e) {
            (ErrorKind::Timeout, _) => RedisError::Timeout,
            (ErrorKind::Connection, _) => RedisError::Unavailable,
            (_, e) => RedisError::Command(e.map(|e| e.to_string()).unwrap_or_default()),
        })
    }

    /// Runs `req` through the breaker under `budget`.
    async fn call<T: FromRedisValue>(&self, budget: Duration, req: Request<'_>) -> Result<T, RedisError> {
        let (conn, how) = self.admit().ok_or(RedisError::Unavailable)?;
        self.run(conn, how, budget, req).await
    }

    /// Runs `req`, admitted as `how`, under `budget`, and records the outcome.
    async fn run<T: FromRedisValue>(
        &self,
        mut conn: ConnectionManager,
        how: Admit,
        budget: Duration,
        req: Request<'_>,
    ) -> Result<T, RedisError> {
        let attempts = async {
            match req.query(&mut conn).await {
                // An I/O error makes the manager reconnect; one more try, on the new connection,
                // turns the first request after a Redis restart into a success, not a failure.
                Err(e) if e.is_io_error() && !e.is_timeout() => req.query(&mut conn).await,
                done => done,
            }
        };
        let result = tokio::time::timeout(budget, attempts).await;
        self.finish(how, result)
    }

    /// Publishes a breaker transition; called with the breaker locked so reports stay in order.
    fn report(&self, state: BreakerState, breaker: &Breaker) {
        self.metrics.cache_circuit(Tier::Redis, state.gauge());
        match state {
            BreakerState::Open => tracing::warn!(
                redis = %self.addr,
                cooldown_ms = breaker.cooldown().as_millis() as u64,
                "Redis circuit breaker open: skipping the Redis tier"
            ),
            BreakerState::HalfOpen => tracing::debug!(redis = %self.addr, "Redis circuit breaker half-open: probing"),
            BreakerState::Closed => tracing::info!(redis = %self.addr, "Redis circuit breaker closed"),
        }
        self.state.send_replace(state);
    }

    /// Answers one batch of lookups with one `MGET`.
    async fn lookup_batch(&self, batch: Vec<(Key, oneshot::Sender<Lookup>)>) {
        let mut cmd = redis::cmd("MGET");
        for (key, _) in &batch {
            cmd.arg(self.emb_key(key));
        }
        // Skipped or failed (and counted): every lookup of the batch reads as Skipped.
        let values: Vec<Option<Vec<u8>>> = self.call(self.timeout, Request::Cmd(&cmd)).await.unwrap_or_default();
        let mut values = values.into_iter();
        for (_, tx) in batch {
            let found = match values.next() {
                Some(Some(bytes)) => Lookup::Hit(bytes),
                Some(None) => Lookup::Miss,
                None => Lookup::Skipped,
            };
            let _ = tx.send(found);
        }
    }

    /// Sends one pipeline of `SET`s, or drops them.
    async fn write_batch(&self, pipe: Pipeline, count: usize) {
        let Some((conn, how)) = self.admit() else {
            for _ in 0..count {
                self.metrics.cache_error(Tier::Redis, ErrorKind::Dropped);
            }
            return;
        };
        // A failed batch is counted by its cause (in `finish`); the writes are lost, which a
        // cache can afford.
        let _: Result<(), _> = self.run(conn, how, self.slow_timeout, Request::Pipe(&pipe)).await;
    }
}

/// Connects, retrying with backoff until it succeeds or the tier is dropped.
async fn connect_loop(shared: Weak<Shared>, client: Client, cfg: ConnectionManagerConfig) {
    // Jitter keeps the replicas of a pool from reconnecting in step when Redis comes back.
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(RETRY_MIN)
        .with_max_delay(RETRY_MAX)
        .with_jitter()
        .without_max_times()
        .build();
    for attempt in 1u64.. {
        let result = ConnectionManager::new_with_config(client.clone(), cfg.clone()).await;
        let Some(shared) = shared.upgrade() else { return };
        match result {
            Ok(conn) => {
                let _ = shared.conn.set(conn);
                shared.connected.send_replace(true);
                tracing::info!(redis = %shared.addr, attempt, "connected to Redis");
                return;
            }
            Err(e) => {
                shared.metrics.cache_error(Tier::Redis, classify(&e));
                // The first failure is worth a warning; the retries that follow are not news.
                if attempt == 1 {
                    tracing::warn!(redis = %shared.addr, error = %e, "cannot connect to Redis; retrying in the background");
                } else {
                    tracing::debug!(redis = %shared.addr, error = %e, attempt, "cannot connect to Redis");
                }
            }
        }
        drop(shared);
        tokio::time::sleep(delays.next().unwrap_or(RETRY_MAX).min(RETRY_MAX)).await;
    }
}

/// Takes the first waiting lookup and whatever else is queued, and answers them with one `MGET`.
async fn read_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<(Key, oneshot::Sender<Lookup>)>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        // Lookups whose caller gave up (its budget ran out while queued) are not worth asking.
        batch.retain(|(_, tx)| !tx.is_closed());
        if !batch.is_empty() {
            shared.lookup_batch(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))).await;
        }
    }
}

/// Drains queued writes into one pipeline at a time; answers flushes once the writes before them
/// are sent.
async fn write_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<Write>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let mut pipe = redis::pipe();
        let mut count = 0;
        let mut flushes = vec![];
        for write in batch.drain(..) {
            match write {
                Write::Set(key, value) => {
                    pipe.cmd("SET").arg(shared.emb_key(&key)).arg(value).arg("PX").arg(shared.ttl_ms).ignore();
                    count += 1;
                }
                Write::Flush(tx) => flushes.push(tx),
            }
        }
        if count > 0 {
            shared.write_batch(pipe, count).await;
        }
        for tx in flushes {
            let _ = tx.send(());
        }
    }
}

/// The metric label for a failed operation.
fn classify(e: &redis::RedisError) -> ErrorKind {
    if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_io_error()
        || matches!(e.kind(), redis::ErrorKind::AuthenticationFailed)
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"))
    {
        // A missing or rejected password leaves the tier as unusable as a refused connection.
        ErrorKind::Connection
    } else {
        ErrorKind::Protocol
    }
}
