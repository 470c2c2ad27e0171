//! Robust judging: direct scores, keypoint verification of candidates, and the global rule for
//! references without keypoints.
use super::*;
use crate::profiles::{ProfileStore, Signal};

const ROBUST: Rules = Rules {
    threshold: 0.6,
    verification: Some(Verification { direct: 0.7, floor: 0.25, min_inliers: 18 }),
    mode: Mode::Robust,
};
const GLOBAL: Rules = Rules { mode: Mode::Global, ..ROBUST };

/// Keypoints of a picture of random grey blocks: many corners, and none shared between seeds.
fn blocks(seed: u32) -> Keypoints {
    let mut state = seed.max(1);
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state >> 24) as u8
    };
    let (w, h) = (320usize, 240usize);
    let cells: Vec<u8> = (0..(w / 8) * (h / 8)).map(|_| next()).collect();
    let rgb: Vec<u8> = (0..w * h).flat_map(|i| [cells[(i / w / 8) * (w / 8) + (i % w) / 8]; 3]).collect();
    Keypoints::of_rgb(w as u32, h as u32, &rgb)
}

/// A unit query whose cosine with `[1, 0, 0, 0]` is `c`.
fn at(c: f32) -> [f32; 4] {
    [c, (1.0 - c * c).sqrt(), 0.0, 0.0]
}

type Case = (&'static str, f32, Option<u32>, Rules, Option<SignalKind>, bool);

#[test]
fn robust_matching_verifies_candidates_below_the_direct_score() {
    let dir = tempfile::tempdir().unwrap();
    let store = ProfileStore::open(dir.path(), "model-a", 4).unwrap();
    let reference = blocks(7);
    assert!(reference.len() > 100, "{} keypoints", reference.len());
    let refs = vec![("photo".to_owned(), Signal::Image(vec![1.0, 0.0, 0.0, 0.0], reference))];
    let (profile, _) = store.put("robust", None, refs).unwrap();
    let (same, other) = (blocks(7), blocks(8));
    // (case, cosine, image keypoints: Some(seed), rules, signal, asks for keypoints)
    let cases: [Case; 9] = [
        ("a direct score", 0.75, None, ROBUST, Some(SignalKind::Embedding), false),
        ("over the threshold but under direct, no keypoints yet", 0.65, None, ROBUST, None, true),
        ("over the threshold, keypoints agree", 0.65, Some(7), ROBUST, Some(SignalKind::Keypoints), false),
        ("over the threshold, another picture's keypoints", 0.65, Some(8), ROBUST, None, false),
        ("a low score, keypoints agree", 0.3, Some(7), ROBUST, Some(SignalKind::Keypoints), false),
        ("under the floor", 0.2, Some(7), ROBUST, None, false),
        ("global: the threshold alone", 0.65, None, GLOBAL, Some(SignalKind::Embedding), false),
        ("global: keypoints are not looked at", 0.3, Some(7), GLOBAL, None, false),
        ("no verification in the card", 0.3, Some(7), Rules { verification: None, ..ROBUST }, None, false),
    ];
    for (case, cosine, image, rules, signal, asks) in cases {
        let query = at(cosine);
        let keypoints = image.map(|seed| if seed == 7 { &same } else { &other });
        let v = profile.judge(&Probe { embedding: Some(&query), pdq: None, keypoints }, &rules);
        assert_eq!((v.signal, v.needs_keypoints), (signal, asks), "{case}: {v:?}");
        assert!((v.score.unwrap() - cosine).abs() < 1e-5, "{case}: the reference's score is reported");
        if signal == Some(SignalKind::Keypoints) {
            assert!(v.inliers.unwrap() >= 18, "{case}: {v:?}");
        }
        if image == Some(8) && rules.mode == Mode::Robust {
            assert!(v.inliers.unwrap() < 18, "{case}: the count of the best check is reported: {v:?}");
        }
    }
}

#[test]
fn references_without_keypoints_keep_the_global_rule_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let store = ProfileStore::open(dir.path(), "model-a", 4).unwrap();
    let refs = vec![("given".to_owned(), Signal::Embedding(vec![1.0, 0.0, 0.0, 0.0]))];
    let (profile, _) = store.put("old", None, refs).unwrap();
    assert_eq!(profile.without_keypoints(), 1);
    let query = at(0.65);
    let v = profile.judge(&Probe { embedding: Some(&query), ..Probe::default() }, &ROBUST);
    assert_eq!((v.signal, v.needs_keypoints), (Some(SignalKind::Embedding), false));
}
