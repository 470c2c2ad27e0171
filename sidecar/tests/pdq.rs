//! PDQ against the reference implementation (PyPI `pdqhash`: Python bindings of Meta's C++),
//! on the real photos `make setup` installs, and `POST /api/v1/hash` over HTTP.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::*;
use http::{Method, StatusCode};
use inferpool_sidecar::pdq::Pdq;

/// Photos of every kind the set has: colour, grey, large, small, JPEG.
const PHOTOS: &[&str] = &[
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "camera.png",
    "coins.png",
    "horse.png",
    "motorcycle_left.png",
    "page.png",
    "rocket.jpg",
    "retina.jpg",
    "hubble_deep_field.jpg",
    "grass.png",
];

/// The reference's hex hash and quality of each photo, decoded by Pillow as RGB.
fn reference() -> BTreeMap<String, (String, u8)> {
    let script = r#"
import sys, pathlib, numpy, pdqhash, skimage
from PIL import Image
data = pathlib.Path(skimage.__file__).parent / "data"
for name in sys.argv[1:]:
    bits, quality = pdqhash.compute(numpy.asarray(Image.open(data / name).convert("RGB")))
    print(name, "".join("%x" % int("".join(map(str, bits[i:i + 4])), 2) for i in range(0, 256, 4)), quality)
"#;
    let out = Command::new(python()).arg("-c").arg(script).args(PHOTOS).output().expect("run the venv's python");
    assert!(out.status.success(), "pdqhash failed (run `make setup`): {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_owned(), (f[1].to_owned(), f[2].parse().unwrap()))
        })
        .collect()
}

fn ours(name: &str) -> (Pdq, u8) {
    let rgb = decode(&photo(name)).to_rgb8();
    Pdq::of_rgb(rgb.width(), rgb.height(), rgb.as_raw()).unwrap()
}

#[test]
fn hashes_agree_with_the_reference_within_8_bits_on_every_photo() {
    let reference = reference();
    let mut exact = 0;
    for name in PHOTOS {
        let (hash, quality) = ours(name);
        let (hex, ref_quality) = &reference[*name];
        let distance = hash.distance(&Pdq::from_hex(hex).unwrap());
        eprintln!("{name}: distance {distance}, quality {quality} (reference {ref_quality})");
        assert!(distance <= 8, "{name}: {hash} vs the reference's {hex}: {distance} bits apart");
        assert!(quality.abs_diff(*ref_quality) <= 2, "{name}: quality {quality} vs {ref_quality}");
        exact += usize::from(distance == 0);
        assert_eq!(ours(name), (hash, quality), "{name}: the same pixels give the same hash");
    }
    eprintln!("{exact} of {} photos hash exactly as the reference does", PHOTOS.len());
}

#[test]
fn distinct_photos_are_far_apart() {
    let hashes: Vec<_> = PHOTOS.iter().map(|n| (n, ours(n).0)).collect();
    for (i, (a, ha)) in hashes.iter().enumerate() {
        for (b, hb) in &hashes[i + 1..] {
            let d = ha.distance(hb);
            assert!(d > inferpool_sidecar::pdq::DEFAULT_MATCH_DISTANCE, "{a} and {b} are only {d} bits apart");
        }
    }
}

#[tokio::test]
async fn the_hash_endpoint_answers_the_reference_form_and_refuses_what_it_cannot_hash() {
    let s = Server::start(&[]).await;
    let chelsea = photo("chelsea.png");
    let r = send(Method::POST, &s.url("/api/v1/hash"), &[("content-type", "image/png")], chelsea.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let body = r.json();
    let (hash, quality) = ours("chelsea.png");
    assert_eq!(body["pdq"], hash.to_string());
    assert_eq!(body["quality"], quality);
    assert_eq!(body["usable"], quality >= inferpool_sidecar::pdq::MIN_MATCH_QUALITY);

    let tiny = png(&image::DynamicImage::new_rgb8(3, 3));
    let cases: &[(&str, Vec<u8>, &str, StatusCode, &str)] = &[
        ("empty", vec![], "image/png", StatusCode::BAD_REQUEST, "empty_body"),
        ("not an image", b"hello".to_vec(), "image/png", StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_image"),
        ("3x3 pixels", tiny, "image/png", StatusCode::UNPROCESSABLE_ENTITY, "image_too_small"),
        ("JSON", chelsea.clone(), "application/json", StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
        (
            "truncated",
            chelsea[..chelsea.len() / 2].to_vec(),
            "image/png",
            StatusCode::UNPROCESSABLE_ENTITY,
            "corrupt_image",
        ),
    ];
    for (name, body, content_type, status, code) in cases {
        let r = send(Method::POST, &s.url("/api/v1/hash"), &[("content-type", content_type)], body.clone()).await;
        assert_eq!((r.status, r.code().as_str()), (*status, *code), "{name}: {}", r.text());
    }
    let r = send(Method::GET, &s.url("/api/v1/hash"), &[], vec![]).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    s.stop().await;
}

/// A profile made from a partner's hash list (hashes, no images) matches re-encodes of the photo
/// by PDQ, reports the signal and distance, honours its own distance bound, and survives a restart.
#[tokio::test]
async fn pdq_references_load_match_and_report_their_signal() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(dir.path(), &[]).await;
    let (chelsea, quality) = ours("chelsea.png");
    let (coffee, _) = ours("coffee.png");
    let list = serde_json::json!({"references": [
        {"id": "chelsea", "pdq": chelsea.to_string(), "quality": quality},
        {"id": "coffee", "pdq": coffee.to_string().to_uppercase()},
    ]});
    let r = put_json(&s.url("/api/v1/profiles/partner"), &list).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());

    let copy = jpeg(&decode(&photo("chelsea.png")).resize(200, 200, image::imageops::FilterType::Triangle), 40);
    let (w, h, rgb) = {
        let img = decode(&copy).to_rgb8();
        (img.width(), img.height(), img.into_raw())
    };
    let expected = Pdq::of_rgb(w, h, &rgb).unwrap().0.distance(&chelsea);
    assert!((1..=31).contains(&expected), "the copy's hash moved by {expected} bits; the test needs 1..=31");

    let m = post_image(&s.url("/api/v1/match?profile=partner"), &copy).await.json();
    assert_eq!((m["matched"].as_bool(), m["signal"].as_str()), (Some(true), Some("pdq")), "{m}");
    assert_eq!((m["reference"].as_str(), m["distance"].as_u64()), (Some("chelsea"), Some(u64::from(expected))), "{m}");
    assert!(m["score"].is_null() && m["cache"].is_null(), "no embedding was needed: {m}");
    let other = post_image(&s.url("/api/v1/match?profile=partner"), &photo("astronaut.png")).await.json();
    assert_eq!((other["matched"].as_bool(), other["signal"].as_str()), (Some(false), None), "{other}");
    assert!(other["distance"].as_u64().unwrap() > 31, "{other}");

    // A scan finds it among embedding profiles, and says by which signal.
    let cats = profile_body(&[("chelsea", &photo("chelsea.png"))]);
    assert_eq!(put_json(&s.url("/api/v1/profiles/cats"), &cats).await.status, StatusCode::CREATED);
    let scan = post_image(&s.url("/api/v1/scan"), &copy).await.json();
    let signals: Vec<_> =
        scan["matches"].as_array().unwrap().iter().map(|m| (m["profile"].clone(), m["signal"].clone())).collect();
    assert!(signals.contains(&("partner".into(), "pdq".into())), "{scan}");
    assert!(signals.contains(&("cats".into(), "embedding".into())), "{scan}");

    // Its own bound: below the copy's distance it no longer matches. A hash of low quality is kept
    // but never used.
    let strict = serde_json::json!({"pdq_distance": expected - 1, "references": [{"id": "chelsea", "pdq": chelsea.to_string()}]});
    assert_eq!(put_json(&s.url("/api/v1/profiles/strict"), &strict).await.status, StatusCode::CREATED);
    let m = post_image(&s.url("/api/v1/match?profile=strict"), &copy).await.json();
    assert_eq!(
        (m["matched"].as_bool(), m["pdq_distance"].as_u64()),
        (Some(false), Some(u64::from(expected - 1))),
        "{m}"
    );
    let weak = serde_json::json!({"references": [{"id": "chelsea", "pdq": chelsea.to_string(), "quality": 49}]});
    assert_eq!(put_json(&s.url("/api/v1/profiles/weak"), &weak).await.status, StatusCode::CREATED);
    let m = post_image(&s.url("/api/v1/match?profile=weak"), &photo("chelsea.png")).await.json();
    assert_eq!((m["matched"].as_bool(), &m["distance"]), (Some(false), &serde_json::Value::Null), "{m}");

    s.stop().await;
    let s = Server::start_in(dir.path(), &[]).await;
    let p = get(&s.url("/api/v1/profiles/partner")).await.json();
    assert_eq!(
        p["references"][0],
        serde_json::json!({"id": "chelsea", "pdq": chelsea.to_string(), "quality": quality})
    );
    assert_eq!(p["references"][1]["pdq"], coffee.to_string(), "stored in the reference's lowercase form");
    let m = post_image(&s.url("/api/v1/match?profile=partner"), &copy).await.json();
    assert_eq!(m["signal"], "pdq", "after a restart: {m}");
    s.stop().await;
}

#[tokio::test]
async fn bad_pdq_references_are_refused_with_the_reason() {
    let s = Server::start(&[]).await;
    let good = "f".repeat(64);
    let cases: &[(&str, serde_json::Value, StatusCode, &str)] = &[
        (
            "short",
            serde_json::json!([{"id": "a", "pdq": "abc"}]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "64 hex digits, got 3 characters",
        ),
        (
            "long",
            serde_json::json!([{"id": "a", "pdq": format!("{good}0")}]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "got 65 characters",
        ),
        (
            "not hex",
            serde_json::json!([{"id": "a", "pdq": format!("{}x", &good[1..])}]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "found 'x' at position 63",
        ),
        ("a number", serde_json::json!([{"id": "a", "pdq": 7}]), StatusCode::UNPROCESSABLE_ENTITY, "expected a string"),
        (
            "two signals",
            serde_json::json!([{"id": "a", "pdq": good, "embedding": [1.0]}]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "exactly one of",
        ),
        (
            "quality over 100",
            serde_json::json!([{"id": "a", "pdq": good, "quality": 101}]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "quality 101 must be within 0..=100",
        ),
        (
            "quality alone",
            serde_json::json!([{"id": "a", "embedding": [1.0], "quality": 90}]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "give it with pdq",
        ),
        (
            "repeated id",
            serde_json::json!([{"id": "a", "pdq": good}, {"id": "a", "pdq": good}]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "repeats",
        ),
    ];
    for (name, refs, status, fragment) in cases {
        let r = put_json(&s.url("/api/v1/profiles/list"), &serde_json::json!({"references": refs})).await;
        assert_eq!(r.status, *status, "{name}: {}", r.text());
        assert!(r.text().contains(fragment), "{name}: {} should say {fragment:?}", r.text());
    }
    let far = serde_json::json!({"pdq_distance": 257, "references": [{"id": "a", "pdq": good}]});
    let r = put_json(&s.url("/api/v1/profiles/list"), &far).await;
    assert!(r.status == StatusCode::UNPROCESSABLE_ENTITY && r.text().contains("pdq_distance 257"), "{}", r.text());
    assert_eq!(get(&s.url("/api/v1/profiles/list")).await.status, StatusCode::NOT_FOUND, "nothing was stored");
    s.stop().await;
}
