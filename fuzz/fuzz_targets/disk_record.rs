//! Any bytes as a disk-cache file (a torn write, a disk error, an edited file): reading it back
//! must give a miss or the stored value, count it, and never panic; recovery must cope too.
#![no_main]

use std::path::{Path, PathBuf};

use inferpool_sidecar::cache::Key;
use inferpool_sidecar::cache::disk::DiskTier;
use libfuzzer_sys::fuzz_target;

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() { out.extend(files(&path)) } else { out.push(path) }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let tier = DiskTier::open(dir.path(), 1 << 20).expect("a disk tier");
    let key = Key::of("fuzz-model@1", b"an image");
    tier.put(&key, b"a stored value").expect("a put");
    let written = files(dir.path());
    for file in &written {
        std::fs::write(file, data).expect("overwriting the entry");
    }
    match tier.get(&key) {
        Ok(Some(value)) => assert_eq!(value, b"a stored value", "a damaged entry was served"),
        Ok(None) | Err(_) => {}
    }
    let reopened = DiskTier::open(dir.path(), 1 << 20).expect("reopening");
    let _ = reopened.recover();
    let _ = reopened.get(&key);
});
