//! Profiles: named sets of reference embeddings that images are matched against, kept on disk.
//!
//! Each profile is one JSON file, `<data_dir>/profiles/<id>.json`, written with the classic
//! tmp-file, fsync, rename, fsync-directory sequence before a write is acknowledged, so a crash
//! leaves either the old or the new profile and never a torn one. Ids are restricted to characters
//! that are safe as a file name, which keeps a request from naming a path outside the directory.
//!
//! Reads (every match and scan) vastly outnumber writes, so the profiles live in memory behind an
//! `RwLock` as `Arc`s that readers clone cheaply. Writers to the same id are serialised by a small
//! set of striped locks so version numbers are never handed out twice, and the file is written
//! before the map changes, so a failed write changes nothing.
//!
//! A reference is an embedding (of an uploaded image, or computed elsewhere) or a PDQ hash from a
//! partner's hash list. Embeddings only mean something to the model that produced them. Each
//! profile records the fingerprint of its model; a profile with embeddings made by another model
//! stays on disk and is listed (nothing is lost on a model upgrade) but is stale: it never matches
//! until it is put again. PDQ hashes do not depend on the model, so a profile of hashes alone is
//! never stale.

use std::collections::HashMap;
use std::fs::{self, File};
use std::hash::{Hash, Hasher};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard};
use serde::{Deserialize, Serialize};

use crate::keypoints::Keypoints;
use crate::matcher;
use crate::pdq::{self, Pdq};

mod matching;
pub mod sync;
mod validate;

use validate::validate_references;

pub use matching::{Mode, Probe, Rules, SignalKind, Verdict};

/// Most references one profile may hold.
pub const MAX_REFERENCES: usize = 10_000;
/// Longest profile id, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Number of write locks that ids are spread over.
const WRITE_STRIPES: usize = 16;

/// Why a profile operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The id is not 1..=128 characters of `[A-Za-z0-9._-]` or starts with '.'.
    #[error("invalid profile id {0:?}: use 1 to 128 characters of A-Z a-z 0-9 . _ - not starting with '.'")]
    InvalidId(String),
    /// No profile has this id.
    #[error("profile {0:?} not found")]
    NotFound(String),
    /// The request's content cannot be stored; the message names the field.
    #[error("invalid profile: {0}")]
    Invalid(String),
    /// A reference's embedding does not have the model's dimension.
    #[error("reference {reference:?} has {got} values but the model's embeddings have {expected}")]
    DimensionMismatch {
        /// The reference's id.
        reference: String,
        /// The model's embedding dimension.
        expected: usize,
        /// The embedding's length.
        got: usize,
    },
    /// Reading or writing the profile directory failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

/// A named set of references, as stored on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Profile {
    /// Unique id, also the file name.
    pub id: String,
    /// Score at or above which a reference matches; the model card's default when absent.
    pub threshold: Option<f32>,
    /// Hamming distance at or below which a PDQ reference matches; 31 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pdq_distance: Option<u32>,
    /// The references, embeddings of unit length or PDQ hashes.
    pub references: Vec<Reference>,
    /// 1 when created, incremented by each replacement.
    pub version: u64,
    /// Fingerprint of the model that made the embeddings.
    pub model: String,
    /// When the profile was last written, in unix seconds.
    pub updated_at: u64,
    /// Set by the store when `model` is not the model being served.
    #[serde(skip)]
    stale: bool,
}

/// One reference: an image's embedding, or a PDQ hash.
///
/// Profile files written before PDQ references existed have an embedding on every reference and
/// load unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    /// Caller-chosen id, unique within its profile.
    pub id: String,
    /// Unit-length embedding; empty for a PDQ reference.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embedding: Vec<f32>,
    /// The PDQ hash of a hash-list entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pdq: Option<Pdq>,
    /// The hash's quality (0-100) when the list gives it; under 50 the hash is kept but not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<u8>,
    /// The image's keypoints, for robust matching; none for a reference given as an embedding or
    /// a hash, or written before keypoints existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keypoints: Option<Keypoints>,
}

/// What a reference of a new profile brings.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// An embedding, normalised by the store.
    Embedding(Vec<f32>),
    /// An uploaded image's embedding and keypoints.
    Image(Vec<f32>, Keypoints),
    /// A PDQ hash, with its quality when known.
    Pdq(Pdq, Option<u8>),
}

impl From<Vec<f32>> for Signal {
    fn from(v: Vec<f32>) -> Self {
        Signal::Embedding(v)
    }
}

/// A profile's own matching settings; absent ones take the defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Settings {
    /// Cosine score at or above which an embedding reference matches.
    pub threshold: Option<f32>,
    /// Hamming distance at or below which a PDQ reference matches.
    pub pdq_distance: Option<u32>,
}

impl From<Option<f32>> for Settings {
    fn from(threshold: Option<f32>) -> Self {
        Settings { threshold, pdq_distance: None }
    }
}

impl Profile {
    /// Best-scoring embedding reference for a unit-length query embedding: (reference id, cosine).
    ///
    /// None if the profile is stale or has no embedding references.
    pub fn best_match(&self, query: &[f32]) -> Option<(&str, f32)> {
        self.scores(query).max_by(|a, b| a.1.total_cmp(&b.1)).map(|(r, score)| (r.id.as_str(), score))
    }

    /// Each embedding reference with its cosine to a unit-length query; none if the profile is
    /// stale (its embeddings are another model's).
    pub fn scores<'a, 'q>(&'a self, query: &'q [f32]) -> impl Iterator<Item = (&'a Reference, f32)> + use<'a, 'q> {
        let references = if self.stale { &[][..] } else { &self.references[..] };
        references.iter().filter(|r| !r.embedding.is_empty()).map(move |r| (r, matcher::cosine(query, &r.embedding)))
    }

    /// Whether it holds embeddings made by a different model than the one now served.
    pub fn is_stale(&self, model: &str) -> bool {
        self.model != model && self.has_embeddings()
    }

    /// Whether any reference is an embedding (matching it needs the query's embedding).
    pub fn has_embeddings(&self) -> bool {
        self.references.iter().any(|r| !r.embedding.is_empty())
    }

    /// Whether any PDQ reference is good enough to match on (matching needs the query's hash).
    pub fn has_pdq(&self) -> bool {
        self.references.iter().any(Reference::pdq_usable)
    }

    /// The Hamming distance at or below which a PDQ reference matches.
    pub fn pdq_distance(&self) -> u32 {
        self.pdq_distance.unwrap_or(pdq::DEFAULT_MATCH_DISTANCE)
    }
}

impl Reference {
    /// Its PDQ hash, when it has one of enough quality to match on.
    fn pdq_usable(&self) -> bool {
        self.pdq.is_some() && self.quality.is_none_or(|q| q >= pdq::MIN_MATCH_QUALITY)
    }
}

/// All profiles, in memory and on disk.
pub struct ProfileStore {
    dir: PathBuf,
    model: String,
    dim: usize,
    profiles: RwLock<HashMap<String, Arc<Profile>>>,
    writes: [Mutex<()>; WRITE_STRIPES],
}

impl ProfileStore {
    /// Opens (creating) `<data_dir>/profiles/` and loads every profile in it.
    ///
    /// A file that cannot be used is moved aside to `*.corrupt` with a warning, never deleted, and
    /// the rest still load. Profiles made by a model other than `model` load as stale.
    pub fn open(data_dir: &Path, model: &str, dim: usize) -> Result<Self, ProfileError> {
        let dir = data_dir.join("profiles");
        fs::create_dir_all(&dir).map_err(|e| io_err("cannot create", &dir, e))?;
        let entries = fs::read_dir(&dir).map_err(|e| io_err("cannot list", &dir, e))?;
        let mut profiles = HashMap::new();
        for entry in entries {
            let path = entry.map_err(|e| io_err("cannot list", &dir, e))?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            if name.ends_with(".json.tmp") {
                // A write that crashed before its rename; the previous `<id>.json` is intact.
                if let Err(e) = fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove unfinished profile write");
                }
                continue;
            }
            let Some(id) = name.strip_suffix(".json") else { continue };
            match load(&path, id, model, dim) {
                Ok(profile) => {
                    profiles.insert(profile.id.clone(), Arc::new(profile));
                }
                Err(reason) => quarantine(&path, &reason),
            }
        }
        let stale = profiles.values().filter(|p| p.stale).count();
        let unverifiable = profiles.values().filter(|p| p.without_keypoints() > 0).count();
        tracing::info!(dir = %dir.display(), profiles = profiles.len(), stale, unverifiable, "loaded profiles");
        if unverifiable > 0 {
            tracing::warn!(
                profiles = unverifiable,
                "profiles with references that have no keypoints (given as embeddings, or written before \
                 keypoints existed) match those by the embedding alone; upload their images again for robust \
                 matching (GET /api/v1/profiles/{{id}} shows without_keypoints)"
            );
        }
        Ok(Self {
            dir,
            model: model.to_owned(),
            dim,
            profiles: RwLock::new(profiles),
            writes: std::array::from_fn(|_| Mutex::new(())),
        })
    }

    /// Creates or replaces a profile, on disk before returning; returns it and whether it is new.
    ///
    /// Embeddings are normalised here. References must be 1..=10 000, each embedding `dim` long,
    /// finite and non-zero, each quality 0..=100, with non-empty ids unique within the profile; a
    /// threshold must be within -1..=1 and a PDQ distance within 0..=256.
    pub fn put<S: Into<Signal>>(
        &self,
        id: &str,
        settings: impl Into<Settings>,
        refs: Vec<(String, S)>,
    ) -> Result<(Arc<Profile>, bool), ProfileError> {
        check_id(id)?;
        let Settings { threshold, pdq_distance } = settings.into();
        if let Some(t) = threshold.filter(|t| !(-1.0..=1.0).contains(t)) {
            return Err(ProfileError::Invalid(format!("threshold {t} must be within -1..=1")));
        }
        if let Some(d) = pdq_distance.filter(|d| *d > 256) {
            return Err(ProfileError::Invalid(format!("pdq_distance {d} must be within 0..=256 (bits of a PDQ hash)")));
        }
        let references = validate_references(refs, self.dim)?;
        let _write = self.write_lock(id);
        let previous = self.read().get(id).map(|p| p.version);
        let profile = Profile {
            id: id.to_owned(),
            threshold,
            pdq_distance,
            references,
            version: previous.map_or(1, |v| v + 1),
            model: self.model.clone(),
            updated_at: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            stale: false,
        };
        self.write_file(&profile)?;
        let profile = Arc::new(profile);
        self.profiles.write().insert(id.to_owned(), Arc::clone(&profile));
        Ok((profile, previous.is_none()))
    }

    /// The profile with this id.
    pub fn get(&self, id: &str) -> Result<Arc<Profile>, ProfileError> {
        check_id(id)?;
        self.read().get(id).cloned().ok_or_else(|| ProfileError::NotFound(id.to_owned()))
    }

    /// Deletes a profile and its file, durably.
    pub fn delete(&self, id: &str) -> Result<(), ProfileError> {
        check_id(id)?;
        let _write = self.write_lock(id);
        if !self.read().contains_key(id) {
            return Err(ProfileError::NotFound(id.to_owned()));
        }
        let path = self.dir.join(format!("{id}.json"));
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("cannot remove", &path, e)),
        }
        sync_dir(&self.dir)?;
        self.profiles.write().remove(id);
        Ok(())
    }

    /// Stores a profile as another replica wrote it (shared through Redis), on disk first.
    /// Returns false when the local copy is already the same. The profile is checked like a local
    /// write: a malformed one is refused and the local state is left as it is.
    pub fn adopt(&self, mut profile: Profile) -> Result<bool, ProfileError> {
        check_id(&profile.id)?;
        profile.stale = profile.is_stale(&self.model);
        if let Err(reason) = check_loaded(&profile, self.dim) {
            return Err(ProfileError::Invalid(format!("profile {:?}: {reason}", profile.id)));
        }
        let _write = self.write_lock(&profile.id);
        if self.read().get(&profile.id).is_some_and(|p| same(p, &profile)) {
            return Ok(false);
        }
        self.write_file(&profile)?;
        self.profiles.write().insert(profile.id.clone(), Arc::new(profile));
        Ok(true)
    }

    /// Deletes a profile if it exists; returns whether it did.
    pub fn forget(&self, id: &str) -> Result<bool, ProfileError> {
        match self.delete(id) {
            Ok(()) => Ok(true),
            Err(ProfileError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every profile, stale ones included, for scans and listings.
    pub fn all(&self) -> Vec<Arc<Profile>> {
        self.read().values().cloned().collect()
    }

    /// Number of profiles.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether there are no profiles.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    // A panic while holding a lock cannot leave the map half-changed (each change is one insert or
    // remove), so a poisoned lock is used as is rather than taking the server down.
    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Arc<Profile>>> {
        self.profiles.read()
    }

    fn write_lock(&self, id: &str) -> MutexGuard<'_, ()> {
        let mut hasher = std::hash::DefaultHasher::new();
        id.hash(&mut hasher);
        let stripe = (hasher.finish() % WRITE_STRIPES as u64) as usize;
        self.writes[stripe].lock()
    }

    /// Writes `<id>.json` atomically and durably.
    fn write_file(&self, profile: &Profile) -> Result<(), ProfileError> {
        let tmp = self.dir.join(format!("{}.json.tmp", profile.id));
        let path = self.dir.join(format!("{}.json", profile.id));
        let written = (|| {
            let mut out = BufWriter::new(File::create(&tmp)?);
            serde_json::to_writer(&mut out, profile)?;
            out.flush()?;
            out.get_ref().sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("cannot write", &tmp, e));
        }
        fs::rename(&tmp, &path).map_err(|e| io_err("cannot rename into", &path, e))?;
        sync_dir(&self.dir)
    }
}

// Summarised: the embeddings can run to hundreds of megabytes.
impl std::fmt::Debug for ProfileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (dir, model, dim, profiles) = (&self.dir, &self.model, self.dim, self.len());
        f.debug_struct("ProfileStore")
            .field("dir", dir)
            .field("model", model)
            .field("dim", &dim)
            .field("profiles", &profiles)
            .finish()
    }
}

/// Whether two profiles hold the same content (the stale flag is derived, not content).
fn same(a: &Profile, b: &Profile) -> bool {
    (a.version, a.updated_at, &a.model, a.threshold, a.pdq_distance, &a.references)
        == (b.version, b.updated_at, &b.model, b.threshold, b.pdq_distance, &b.references)
}

/// Checks a profile id: 1..=128 characters of `[A-Za-z0-9._-]`, not starting with '.', so it is
/// always a safe file name. Callers may use it to refuse a bad id before reading a request body.
pub fn check_id(id: &str) -> Result<(), ProfileError> {
    let valid = (1..=MAX_ID_LEN).contains(&id.len())
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid { Ok(()) } else { Err(ProfileError::InvalidId(id.to_owned())) }
}

/// Reads one profile file; the error says why it cannot be used.
fn load(path: &Path, id: &str, model: &str, dim: usize) -> Result<Profile, String> {
    let bytes = fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut profile: Profile = serde_json::from_slice(&bytes).map_err(|e| format!("not a profile: {e}"))?;
    if profile.id != id || check_id(id).is_err() {
        return Err(format!("file name does not match the profile id {:?}", profile.id));
    }
    profile.stale = profile.is_stale(model);
    check_loaded(&profile, dim)?;
    Ok(profile)
}

/// What a profile read from a file or another replica must hold: every reference an embedding or
/// a hash, and embeddings of the served model's length unless it is stale.
fn check_loaded(profile: &Profile, dim: usize) -> Result<(), String> {
    if let Some(r) = profile.references.iter().find(|r| r.embedding.is_empty() && r.pdq.is_none()) {
        return Err(format!("reference {:?} has neither an embedding nor a PDQ hash", r.id));
    }
    if !profile.stale && profile.references.iter().any(|r| !r.embedding.is_empty() && r.embedding.len() != dim) {
        return Err(format!("embeddings are not {dim} long although made by the model now served"));
    }
    Ok(())
}

/// Moves an unusable profile file aside so that it is kept for inspection but not loaded again.
/// An earlier `.corrupt` file of the same name is kept too: the new one gets a number.
fn quarantine(path: &Path, reason: &str) {
    let aside = (0..1000)
        .map(|n| if n == 0 { format!("{}.corrupt", path.display()) } else { format!("{}.{n}.corrupt", path.display()) })
        .map(PathBuf::from)
        .find(|p| !p.exists())
        .unwrap_or_else(|| path.with_extension("json.corrupt"));
    match fs::rename(path, &aside) {
        Ok(()) => tracing::warn!(path = %path.display(), moved_to = ?aside, reason, "profile file is unusable"),
        Err(e) => {
            tracing::warn!(path = %path.display(), reason, error = %e, "profile file is unusable and cannot be moved")
        }
    }
}

/// Makes renames and removals in a directory durable.
fn sync_dir(dir: &Path) -> Result<(), ProfileError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err("cannot sync", dir, e))
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> ProfileError {
    ProfileError::Io(format!("{what} {}", path.display()), e)
}

#[cfg(test)]
mod tests;
