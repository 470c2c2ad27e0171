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
