//! Any bytes as the JSON the sidecar accepts from outside: a tuning push (`PUT /api/v1/tuning`),
//! a profile another replica published to Redis (adopted into the local store only when valid),
//! profile ids, and the admin `Authorization` header. Refusals are errors, never panics.
#![no_main]

use std::sync::OnceLock;

use inferpool_crds::Tuning;
use inferpool_crds::wire;
use inferpool_sidecar::profiles::{Profile, ProfileStore, check_id};
use libfuzzer_sys::fuzz_target;

/// One profile store for the whole run (opening one per input would dominate the time).
fn store() -> &'static ProfileStore {
    static STORE: OnceLock<(tempfile::TempDir, ProfileStore)> = OnceLock::new();
    let (_, store) = STORE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = ProfileStore::open(dir.path(), "fuzz-model@1", 4).expect("a profile store");
        (dir, store)
    });
    store
}

fuzz_target!(|data: &[u8]| {
    if let Ok(tuning) = serde_json::from_slice::<Tuning>(data) {
        let _ = tuning.validate();
    }
    if let Ok(profile) = serde_json::from_slice::<Profile>(data) {
        let id = profile.id.clone();
        if store().adopt(profile).is_ok() {
            // What was adopted can be read back and forgotten.
            assert!(store().get(&id).is_ok(), "an adopted profile is readable");
            let _ = store().forget(&id);
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = check_id(text);
        if let Some(token) = wire::parse_bearer(text) {
            assert!(!token.is_empty() && !token.starts_with(' '));
        }
    }
});
