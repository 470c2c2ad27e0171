//! Tests of the profile store: validation, durability across reopen, corrupt files.
use super::*;
use crate::pdq::Pdq;

const DIM: usize = 4;
/// The embedding alone against 0.6, as before robust matching.
const GLOBAL: Rules = Rules { threshold: 0.6, verification: None, mode: Mode::Global };
type Refs = Vec<(String, Vec<f32>)>;

fn refs(list: &[(&str, [f32; DIM])]) -> Refs {
    list.iter().map(|(id, e)| (id.to_string(), e.to_vec())).collect()
}

fn one() -> Refs {
    refs(&[("a", [1.0; DIM])])
}

fn store(dir: &Path) -> ProfileStore {
    ProfileStore::open(dir, "model-a", DIM).unwrap()
}

#[test]
fn put_replace_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let (first, created) = store.put("shoes", Some(0.8), refs(&[("a", [3.0, 4.0, 0.0, 0.0])])).unwrap();
    assert!(created);
    assert_eq!((first.version, first.model.as_str(), first.threshold), (1, "model-a", Some(0.8)));
    assert_eq!(first.references[0].embedding, [0.6, 0.8, 0.0, 0.0], "normalised");

    let (second, created) = store.put("shoes", None, refs(&[("b", [0.0, 0.0, 2.0, 0.0])])).unwrap();
    assert_eq!((created, second.version, second.threshold), (false, 2, None));
    assert_eq!(store.get("shoes").unwrap().references[0].id, "b");
    assert!(matches!(store.get("hats"), Err(ProfileError::NotFound(id)) if id == "hats"));

    // A directory where the tmp file goes makes the write fail, even when running as root.
    fs::create_dir(dir.path().join("profiles/shoes.json.tmp")).unwrap();
    assert!(matches!(store.put("shoes", None, one()), Err(ProfileError::Io(..))));
    assert_eq!(store.get("shoes").unwrap().version, 2, "a failed write changes nothing");

    store.delete("shoes").unwrap();
    assert!(!dir.path().join("profiles/shoes.json").exists());
    assert!(matches!(store.delete("shoes"), Err(ProfileError::NotFound(_))));
    assert!(store.is_empty() && self::store(dir.path()).is_empty());
}

#[test]
fn profiles_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let written = store(dir.path()).put("p1", Some(-0.5), refs(&[("x", [1.0, 2.0, 3.0, 4.0])])).unwrap().0;
    store(dir.path()).put("p2", None, one()).unwrap();

    let reopened = store(dir.path());
    assert_eq!(reopened.len(), 2);
    let read = reopened.get("p1").unwrap();
    assert_eq!(
        (&read.id, read.threshold, &read.references, read.version, &read.model, read.updated_at),
        (&written.id, written.threshold, &written.references, 1, &written.model, written.updated_at)
    );
    assert_eq!(reopened.put("p1", None, one()).unwrap().0.version, 2);
}

#[test]
fn unusable_files_are_moved_aside_and_the_rest_load() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path()).put("good", None, one()).unwrap();
    let profiles = dir.path().join("profiles");
    let good = fs::read(profiles.join("good.json")).unwrap();
    fs::write(profiles.join("bad.json"), b"{\"id\": \"bad\", \"refer").unwrap();
    fs::write(profiles.join("renamed.json"), &good).unwrap(); // the id inside says "good"
    fs::write(profiles.join("good.json.tmp"), b"{\"id\": \"go").unwrap(); // a write cut short by a crash
    fs::write(profiles.join("notes.txt"), b"left alone").unwrap();

    let reopened = store(dir.path());
    assert_eq!(reopened.all().iter().map(|p| p.id.as_str()).collect::<Vec<_>>(), ["good"]);
    assert_eq!(fs::read(profiles.join("bad.json.corrupt")).unwrap(), b"{\"id\": \"bad\", \"refer");
    assert_eq!(fs::read(profiles.join("renamed.json.corrupt")).unwrap(), good);
    fs::write(profiles.join("bad.json"), b"broken again").unwrap();
    store(dir.path());
    assert_eq!(fs::read(profiles.join("bad.json.1.corrupt")).unwrap(), b"broken again", "earlier copy kept");
    for gone in ["bad.json", "renamed.json", "good.json.tmp"] {
        assert!(!profiles.join(gone).exists(), "{gone}");
    }
    assert!(profiles.join("notes.txt").exists());
}

#[test]
fn invalid_content_is_refused_with_a_specific_message() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let ok = [1.0; DIM];
    let cases: Vec<(Refs, Option<f32>, &str)> = vec![
        (vec![], None, "must not be empty"),
        (vec![("a".to_owned(), ok.to_vec()); MAX_REFERENCES + 1], None, "at most 10000"),
        (refs(&[("a", ok), ("b", [0.0; DIM])]), None, "references[1].embedding (\"b\") is all zeros"),
        (refs(&[("a", [f32::NAN, 1.0, 1.0, 1.0])]), None, "references[0].embedding (\"a\") has a non-finite"),
        (refs(&[("a", [f32::INFINITY, 1.0, 1.0, 1.0])]), None, "non-finite"),
        (refs(&[("a", ok), ("b", ok), ("a", ok)]), None, "references[2].id \"a\" repeats references[0].id"),
        (refs(&[("", ok)]), None, "references[0].id is empty"),
        (one(), Some(1.5), "threshold 1.5"),
        (one(), Some(f32::NAN), "threshold NaN"),
    ];
    for (refs, threshold, want) in cases {
        match store.put("p", threshold, refs) {
            Err(ProfileError::Invalid(msg)) => assert!(msg.contains(want), "{msg:?} should contain {want:?}"),
            other => panic!("{want}: got {other:?}"),
        }
    }
    let err = store.put("p", None, vec![("a".to_owned(), ok.to_vec()), ("short".to_owned(), vec![1.0; 3])]);
    assert!(matches!(
        err,
        Err(ProfileError::DimensionMismatch { ref reference, expected: DIM, got: 3 }) if reference == "short"
    ));
    assert!(store.is_empty());
    assert!(store.put("p", Some(-1.0), one()).is_ok(), "the bounds are inclusive");
}

#[test]
fn ids_must_be_safe_file_names() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let long = "x".repeat(MAX_ID_LEN + 1);
    for id in ["", "../x", "a/b", "a\\b", ".hidden", "..", "a b", "caf\u{e9}", "a\0b", long.as_str()] {
        assert!(matches!(store.put(id, None, one()), Err(ProfileError::InvalidId(_))), "{id:?}");
        assert!(matches!(store.get(id), Err(ProfileError::InvalidId(_))), "{id:?}");
        assert!(matches!(store.delete(id), Err(ProfileError::InvalidId(_))), "{id:?}");
    }
    for id in ["a", "Shoes-2024_v1.final", &"y".repeat(MAX_ID_LEN)] {
        assert!(store.put(id, None, one()).is_ok(), "{id:?}");
    }
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "nothing written outside profiles/");
}

#[test]
fn best_match_picks_the_highest_score_unless_stale() {
    let dir = tempfile::tempdir().unwrap();
    let list = [("far", [0.0, 1.0, 0.0, 0.0]), ("near", [1.0, 0.2, 0.0, 0.0]), ("opposite", [-1.0, 0.0, 0.0, 0.0])];
    let (profile, _) = store(dir.path()).put("p", None, refs(&list)).unwrap();
    let (id, score) = profile.best_match(&[1.0, 0.0, 0.0, 0.0]).unwrap();
    assert_eq!(id, "near");
    assert!((score - 1.0 / 1.04f32.sqrt()).abs() < 1e-6);
    assert_eq!(profile.best_match(&[-1.0, 0.0, 0.0, 0.0]).unwrap().0, "opposite");

    // After a model upgrade the profile is still listed, but never matches until it is put again.
    let upgraded = ProfileStore::open(dir.path(), "model-b", 8).unwrap();
    let old = upgraded.get("p").unwrap();
    assert!(old.is_stale("model-b") && !old.is_stale("model-a") && upgraded.len() == 1);
    assert_eq!(old.best_match(&[1.0, 0.0, 0.0, 0.0]), None);
    let (fresh, created) = upgraded.put("p", None, vec![("a".to_owned(), vec![1.0; 8])]).unwrap();
    assert!(!created && fresh.version == 2 && !fresh.is_stale("model-b"));
    assert!(fresh.best_match(&[0.5; 8]).is_some());
}

#[test]
fn concurrent_writes_to_one_id_get_distinct_versions() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let put_five = || (0..5).map(|_| store.put("hot", None, one()).unwrap().0.version).collect::<Vec<_>>();
    let mut versions: Vec<u64> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8).map(|_| s.spawn(put_five)).collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    versions.sort_unstable();
    assert_eq!(versions, (1..=40).collect::<Vec<_>>());
    assert_eq!(self::store(dir.path()).get("hot").unwrap().version, 40);
}

fn hash(fill: u16) -> Pdq {
    Pdq::from_hex(&format!("{fill:04x}").repeat(16)).unwrap()
}

/// (what, probe, signal that matched, reference named, PDQ distance).
type JudgeCase<'a> = (&'a str, Probe<'a>, Option<SignalKind>, Option<&'a str>, Option<u32>);

#[test]
fn pdq_references_are_judged_by_distance_and_quality() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let refs = vec![
        ("e".to_owned(), Signal::Embedding(vec![1.0, 0.0, 0.0, 0.0])),
        ("p".to_owned(), Signal::Pdq(hash(0), Some(80))),
        ("weak".to_owned(), Signal::Pdq(hash(0xffff), Some(49))),
    ];
    let settings = Settings { threshold: Some(0.9), pdq_distance: Some(16) };
    let (profile, _) = store.put("mixed", settings, refs).unwrap();
    assert!(profile.has_embeddings() && profile.has_pdq());
    let near = hash(0x0001); // 16 bits from hash(0): one per word
    let far = hash(0x0003);
    let probe =
        |embedding: &'static [f32], pdq: Option<(Pdq, u8)>| Probe { embedding: Some(embedding), pdq, keypoints: None };
    let cases: &[JudgeCase<'_>] = &[
        (
            "embedding wins when both match",
            probe(&[1.0, 0.0, 0.0, 0.0], Some((near, 90))),
            Some(SignalKind::Embedding),
            Some("e"),
            Some(16),
        ),
        (
            "pdq at the bound",
            probe(&[0.0, 1.0, 0.0, 0.0], Some((near, 90))),
            Some(SignalKind::Pdq),
            Some("p"),
            Some(16),
        ),
        ("pdq past the bound", probe(&[0.0, 1.0, 0.0, 0.0], Some((far, 90))), None, Some("e"), Some(32)),
        ("query hash of low quality", probe(&[0.0, 1.0, 0.0, 0.0], Some((hash(0), 49))), None, Some("e"), None),
        (
            "the weak reference is not used",
            probe(&[0.0, 1.0, 0.0, 0.0], Some((hash(0xffff), 100))),
            None,
            Some("e"),
            Some(256),
        ),
        ("no hash", probe(&[0.0, 1.0, 0.0, 0.0], None), None, Some("e"), None),
    ];
    for (what, probe, signal, reference, distance) in cases {
        let v = profile.judge(probe, &GLOBAL);
        assert_eq!((v.signal, v.reference, v.distance), (*signal, *reference, *distance), "{what}");
    }
    let hashes_only = Probe { embedding: None, pdq: Some((near, 90)), keypoints: None };
    assert_eq!(profile.judge(&hashes_only, &GLOBAL).score, None);
}

#[test]
fn hash_profiles_round_trip_and_do_not_go_stale_with_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let refs = vec![("p".to_owned(), Signal::Pdq(hash(0xabcd), None))];
    let settings = Settings { threshold: None, pdq_distance: Some(20) };
    let (written, _) = store(dir.path()).put("list", settings, refs).unwrap();
    let text = std::fs::read_to_string(dir.path().join("profiles/list.json")).unwrap();
    assert!(text.contains(&format!("\"pdq\":\"{}\"", "abcd".repeat(16))) && !text.contains("embedding"), "{text}");

    let upgraded = ProfileStore::open(dir.path(), "model-b", 8).unwrap();
    let read = upgraded.get("list").unwrap();
    assert!(!read.is_stale("model-b"), "hashes do not depend on the model");
    assert_eq!((&read.references, read.pdq_distance), (&written.references, Some(20)));
    let probe = Probe { embedding: None, pdq: Some((hash(0xabcd), 100)), keypoints: None };
    assert_eq!(read.judge(&probe, &GLOBAL).signal, Some(SignalKind::Pdq));
}

#[test]
fn profile_files_from_before_pdq_load_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("profiles")).unwrap();
    let old = r#"{"id":"old","threshold":null,"references":[{"id":"a","embedding":[1.0,0.0,0.0,0.0]}],"version":3,"model":"model-a","updated_at":1}"#;
    std::fs::write(dir.path().join("profiles/old.json"), old).unwrap();
    let empty =
        r#"{"id":"empty","threshold":null,"references":[{"id":"a"}],"version":1,"model":"model-a","updated_at":1}"#;
    std::fs::write(dir.path().join("profiles/empty.json"), empty).unwrap();
    let store = store(dir.path());
    let p = store.get("old").unwrap();
    assert_eq!((p.version, p.pdq_distance(), p.has_pdq()), (3, crate::pdq::DEFAULT_MATCH_DISTANCE, false));
    assert_eq!(p.best_match(&[1.0, 0.0, 0.0, 0.0]), Some(("a", 1.0)));
    assert!(store.get("empty").is_err(), "a reference with neither signal is refused");
    assert!(dir.path().join("profiles/empty.json.corrupt").exists(), "and kept aside");
}
