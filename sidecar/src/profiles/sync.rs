//! Profiles shared through Redis, so every replica of a pool matches against the same profiles.
//!
//! The local store stays the durable copy and the one requests read; Redis carries changes between
//! replicas. A write goes to disk first and is then published (hash `profiles`, a tombstone for a
//! delete, and a version counter bumped in the same transaction). Each replica pulls when the
//! counter moves — every second in the background, and at once when a request names a profile it
//! does not have — and adopts what changed. Profiles only this replica has (written while Redis
//! was away, or lost by a Redis restart) are published again on the next pull. When Redis is down
//! every replica keeps serving its local profiles.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use super::{Profile, ProfileStore};
use crate::cache::redis::{RedisError, RedisTier};

/// How often the background task pulls.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// What one pull changed locally.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pulled {
    /// Profiles written or replaced.
    pub adopted: usize,
    /// Profiles deleted.
    pub deleted: usize,
    /// Local-only profiles published again.
    pub republished: usize,
}

/// Keeps the local store and Redis in step.
pub struct ProfileSync {
    redis: Arc<RedisTier>,
    store: Arc<ProfileStore>,
    /// The last version pulled; one pull at a time.
    seen: Mutex<u64>,
    /// Deletions made while Redis was unreachable, published on the next pull (in memory only).
    pending_deletes: parking_lot::Mutex<HashSet<String>>,
}

impl ProfileSync {
    /// Syncs `store` through `redis`.
    pub fn new(redis: Arc<RedisTier>, store: Arc<ProfileStore>) -> Self {
        ProfileSync { redis, store, seen: Mutex::new(0), pending_deletes: Default::default() }
    }

    /// Publishes a profile just written locally.
    pub async fn publish(&self, profile: &Profile) -> Result<(), RedisError> {
        let bytes = serde_json::to_vec(profile).map_err(|e| RedisError::Command(e.to_string()))?;
        self.redis.profile_put(&profile.id, &bytes).await
    }

    /// Publishes the deletion of a profile; one that cannot be published now is retried by the
    /// next pull, so the profile does not come back from Redis.
    pub async fn publish_delete(&self, id: &str) -> Result<(), RedisError> {
        let result = self.redis.profile_delete(id).await;
        if result.is_err() {
            self.pending().insert(id.to_owned());
        }
        result
    }

    fn pending(&self) -> parking_lot::MutexGuard<'_, HashSet<String>> {
        self.pending_deletes.lock()
    }

    /// Adopts the changes other replicas published since the last pull.
    pub async fn pull(&self) -> Result<Pulled, RedisError> {
        let mut seen = self.seen.lock().await;
        let pending: Vec<String> = self.pending().iter().cloned().collect();
        for id in pending {
            self.redis.profile_delete(&id).await?;
            self.pending().remove(&id);
        }
        let Some(snapshot) = self.redis.profiles_since(*seen).await? else { return Ok(Pulled::default()) };
        let mut out = Pulled::default();
        let mut known = HashSet::with_capacity(snapshot.entries.len());
        let mut adopt = Vec::new();
        for (id, value) in snapshot.entries {
            known.insert(id.clone());
            match value {
                Some(bytes) => match serde_json::from_slice::<Profile>(&bytes) {
                    Ok(p) if p.id == id => adopt.push(p),
                    Ok(_) | Err(_) => tracing::warn!(id, "shared profile is malformed; keeping the local copy"),
                },
                None => {
                    let store = Arc::clone(&self.store);
                    let id2 = id.clone();
                    match tokio::task::spawn_blocking(move || store.forget(&id2)).await {
                        Ok(Ok(true)) => out.deleted += 1,
                        Ok(Ok(false)) => {}
                        Ok(Err(e)) => tracing::warn!(id, error = %e, "cannot delete profile deleted elsewhere"),
                        Err(e) => tracing::warn!(id, error = %e, "profile delete task failed"),
                    }
                }
            }
        }
        if !adopt.is_empty() {
            let store = Arc::clone(&self.store);
            let adopted = tokio::task::spawn_blocking(move || {
                let mut n = 0;
                for p in adopt {
                    let id = p.id.clone();
                    match store.adopt(p) {
                        Ok(changed) => n += usize::from(changed),
                        Err(e) => tracing::warn!(id, error = %e, "shared profile refused"),
                    }
                }
                n
            })
            .await;
            out.adopted = adopted.unwrap_or(0);
        }
        let missing: Vec<_> = self.store.all().into_iter().filter(|p| !known.contains(&p.id)).collect();
        for p in &missing {
            self.publish(p).await?;
            out.republished += 1;
        }
        *seen = snapshot.version;
        if out != Pulled::default() {
            tracing::info!(
                adopted = out.adopted,
                deleted = out.deleted,
                republished = out.republished,
                "profiles synced"
            );
        }
        Ok(out)
    }

    /// Pulls every [`INTERVAL`] until the runtime stops.
    pub fn spawn(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(INTERVAL);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                if let Err(e) = self.pull().await {
                    tracing::debug!(error = %e, "profile sync skipped");
                }
            }
        })
    }
}
