//! Coalescing: concurrent requests for the same uncached image share one inference.
//!
//! The first request for a key becomes its leader and computes; the others follow, waiting on a
//! `watch` channel for the leader's result. A leader that goes away without a result (its client
//! disconnected and hyper dropped the handler) drops its sender, and its followers try again, one
//! of them becoming the new leader, so no follower waits for work nobody is doing.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

use super::Key;

/// A shared result: the value or the leader's error, behind an Arc so every follower gets it.
pub type Shared<V, E> = Result<V, Arc<E>>;

type Slot<V, E> = watch::Receiver<Option<Shared<V, E>>>;

/// Keys being computed now.
pub struct Coalescer<V, E> {
    inflight: Mutex<HashMap<Key, Slot<V, E>>>,
}

/// What a caller should do for a key.
pub enum Role<'a, V, E> {
    /// Compute, then [`Leader::finish`].
    Leader(Leader<'a, V, E>),
    /// Wait for the leader with [`follow`].
    Follower(Slot<V, E>),
}

/// The one computing a key; dropping it unfinished lets followers retry.
pub struct Leader<'a, V, E> {
    owner: &'a Coalescer<V, E>,
    key: Key,
    tx: watch::Sender<Option<Shared<V, E>>>,
}

impl<V: Clone, E> Default for Coalescer<V, E> {
    fn default() -> Self {
        Coalescer { inflight: Mutex::new(HashMap::new()) }
    }
}

impl<V: Clone, E> Coalescer<V, E> {
    /// Leads `key` if nobody is computing it, else follows.
    pub fn join(&self, key: Key) -> Role<'_, V, E> {
        let mut inflight = self.inflight.lock();
        if let Some(rx) = inflight.get(&key)
            && rx.has_changed().is_ok()
        {
            return Role::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        inflight.insert(key, rx);
        Role::Leader(Leader { owner: self, key, tx })
    }

    /// Keys in flight.
    pub fn len(&self) -> usize {
        self.inflight.lock().len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<V, E> Leader<'_, V, E> {
    /// Hands the result to every follower.
    pub fn finish(self, result: Shared<V, E>) {
        self.tx.send_replace(Some(result));
        // Drop removes the key.
    }
}

impl<V, E> Drop for Leader<'_, V, E> {
    fn drop(&mut self) {
        let mut inflight = self.owner.inflight.lock();
        // Remove only our own entry: a retrying follower may already lead a new one.
        if inflight.get(&self.key).is_some_and(|rx| rx.same_channel(&self.tx.subscribe())) {
            inflight.remove(&self.key);
        }
    }
}

/// Waits for the leader: `Some(result)`, or `None` when it gave up (try again).
pub async fn follow<V: Clone, E>(mut rx: Slot<V, E>) -> Option<Shared<V, E>> {
    match rx.wait_for(Option::is_some).await {
        Ok(v) => v.clone(),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_the_leaders_result() {
        let c: Coalescer<u32, String> = Coalescer::default();
        let k = Key::of("m", b"x");
        let Role::Leader(leader) = c.join(k) else { panic!("first caller must lead") };
        let followers: Vec<_> = (0..5)
            .map(|_| match c.join(k) {
                Role::Follower(rx) => tokio::spawn(follow(rx)),
                Role::Leader(_) => panic!("second caller must follow"),
            })
            .collect();
        leader.finish(Ok(7));
        for f in followers {
            assert_eq!(f.await.unwrap(), Some(Ok(7)));
        }
        assert!(c.is_empty());
        assert!(matches!(c.join(k), Role::Leader(_)), "a finished key is computed afresh");
    }

    #[tokio::test]
    async fn errors_are_shared_and_abandoned_keys_are_retried() {
        let c: Coalescer<u32, String> = Coalescer::default();
        let k = Key::of("m", b"y");
        let Role::Leader(leader) = c.join(k) else { panic!() };
        let Role::Follower(rx) = c.join(k) else { panic!() };
        leader.finish(Err(Arc::new("bad image".to_owned())));
        assert_eq!(follow(rx).await.unwrap().unwrap_err().as_str(), "bad image");

        let Role::Leader(leader) = c.join(k) else { panic!() };
        let Role::Follower(rx) = c.join(k) else { panic!() };
        drop(leader);
        assert!(follow(rx).await.is_none(), "an abandoned key tells followers to retry");
        assert!(matches!(c.join(k), Role::Leader(_)));
    }
}
