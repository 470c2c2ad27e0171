//! The OS threads of a pipeline stage, joined once when the stage shuts down.

use parking_lot::{Condvar, Mutex, MutexGuard};
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
        let threads = std::mem::take(&mut *self.0.lock());
        for t in threads {
            let _ = t.join();
        }
    }
}

/// A stage's state shared with its threads: a mutex, and the condition variable they wait on.
pub struct Guarded<S> {
    state: Mutex<S>,
    /// Woken when the state changes in a way a waiting thread may care about.
    pub wake: Condvar,
}

impl<S> Guarded<S> {
    /// Guards `state`.
    pub fn new(state: S) -> Self {
        Guarded { state: Mutex::new(state), wake: Condvar::new() }
    }

    /// Locks the state. Every mutation the stages make under the lock is a single push, pop or
    /// counter step, so a thread that panicked elsewhere cannot have left it half-changed (the
    /// lock does not poison).
    pub fn lock(&self) -> MutexGuard<'_, S> {
        self.state.lock()
    }

    /// Waits for a wake-up (or `timeout`), releasing the lock meanwhile.
    pub fn wait<'a>(&self, mut guard: MutexGuard<'a, S>, timeout: Option<std::time::Duration>) -> MutexGuard<'a, S> {
        match timeout {
            Some(t) => {
                // Timed out or woken: the caller looks at the state either way.
                let _ = self.wake.wait_for(&mut guard, t);
            }
            None => self.wake.wait(&mut guard),
        }
        guard
    }
}
