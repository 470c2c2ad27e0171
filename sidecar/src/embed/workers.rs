//! The OS threads of a pipeline stage, joined once when the stage shuts down.

use std::sync::Mutex;
use std::thread::JoinHandle;

/// A stage's threads.
#[derive(Default)]
pub struct Workers(Mutex<Vec<JoinHandle<()>>>);

impl Workers {
    /// Keeps `threads` until [`Workers::join`].
    pub fn new(threads: Vec<JoinHandle<()>>) -> Self {
        Workers(Mutex::new(threads))
    }

    /// Starts a named thread.
    pub fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new().name(name).spawn(f)
    }

    /// Waits for every thread to end; later calls return at once. A thread that panicked has
    /// already answered or dropped its work, so its panic is not passed on.
    pub fn join(&self) {
        let threads = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// A stage's state shared with its threads: a mutex, and the condition variable they wait on.
pub struct Guarded<S> {
    state: std::sync::Mutex<S>,
    /// Woken when the state changes in a way a waiting thread may care about.
    pub wake: std::sync::Condvar,
}

impl<S> Guarded<S> {
    /// Guards `state`.
    pub fn new(state: S) -> Self {
        Guarded { state: std::sync::Mutex::new(state), wake: std::sync::Condvar::new() }
    }

    /// Locks the state. Every mutation the stages make under the lock is a single push, pop or
    /// counter step, so a thread that panicked elsewhere cannot have left it half-changed and a
    /// poisoned lock is used as it is.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, S> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a wake-up (or `timeout`), releasing the lock meanwhile.
    pub fn wait<'a>(
        &self,
        guard: std::sync::MutexGuard<'a, S>,
        timeout: Option<std::time::Duration>,
    ) -> std::sync::MutexGuard<'a, S> {
        match timeout {
            Some(t) => self.wake.wait_timeout(guard, t).unwrap_or_else(|p| p.into_inner()).0,
            None => self.wake.wait(guard).unwrap_or_else(|p| p.into_inner()),
        }
    }
}
