//! State files (`inferpool-local up --state-file`): the store's objects and resourceVersion
//! counter, loaded at start and saved on shutdown and a second after changes, so a local control
//! plane survives a restart. A file is written whole to a temporary sibling and renamed over the
//! old one, so a crash never leaves half a state; a file that cannot be read back is an error,
//! never an empty start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::store::Store;

/// How long changes are gathered before a save.
const DEBOUNCE: Duration = Duration::from_secs(1);

/// Everything a store holds that outlives a restart: its objects and counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// The global resourceVersion counter.
    pub resource_version: u64,
    /// The uid counter.
    pub uids: u64,
    /// Every object.
    pub objects: Vec<Stored>,
}

/// One object in a [`Snapshot`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stored {
    /// `group/version/plural` (`/v1/pods` in the core group).
    pub resource: String,
    /// Namespace ("" when cluster-scoped).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The object as stored.
    pub object: Value,
}

/// A snapshot that does not fit the resources served.
#[derive(Debug, thiserror::Error)]
#[error("object {name:?} of unknown resource {resource:?}")]
pub struct RestoreError {
    resource: String,
    name: String,
}

impl RestoreError {
    /// An object of `resource` named `name` that cannot be restored.
    pub fn new(resource: &str, name: &str) -> Self {
        RestoreError { resource: resource.to_owned(), name: name.to_owned() }
    }
}

/// Why a state file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// It exists but cannot be read, or cannot be written.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// It is not a state file (or one of another version of the served resources).
    #[error("state file {path} is corrupt: {problem}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io { path: path.to_owned(), source }
}

/// Loads `path` into `store`; false when there is no such file yet.
pub fn load(store: &Store, path: &Path) -> Result<bool, StateError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(path)(e)),
    };
    let corrupt = |problem: String| StateError::Corrupt { path: path.to_owned(), problem };
    let snapshot: Snapshot = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
    store.restore(snapshot).map_err(|e| corrupt(e.to_string()))?;
    Ok(true)
}

/// Saves `store` to `path` atomically (a temporary sibling renamed over it).
pub fn save(store: &Store, path: &Path) -> Result<(), StateError> {
    let text = serde_json::to_vec(&store.snapshot())
        .map_err(|e| StateError::Corrupt { path: path.to_owned(), problem: e.to_string() })?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&text).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Keeps a state file: loaded at [`Saver::start`], saved a second after changes and at
/// [`Saver::finish`].
pub struct Saver {
    store: Arc<Store>,
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Saver {
    /// Loads `path` (when it exists) into `store` and starts saving changes to it.
    pub fn start(store: Arc<Store>, path: PathBuf) -> Result<Saver, StateError> {
        if load(&store, &path)? {
            tracing::info!(path = %path.display(), "state loaded");
        }
        let mut events = store.subscribe();
        let (s, p) = (Arc::clone(&store), path.clone());
        let task = tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                }
                tokio::time::sleep(DEBOUNCE).await;
                while matches!(events.try_recv(), Ok(_) | Err(TryRecvError::Lagged(_))) {}
                if let Err(e) = save(&s, &p) {
                    tracing::error!(error = %e, "state not saved");
                }
            }
        });
        Ok(Saver { store, path, task })
    }

    /// Stops the periodic saves and saves once more.
    pub fn finish(self) -> Result<(), StateError> {
        self.task.abort();
        save(&self.store, &self.path)
    }
}

impl Drop for Saver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
