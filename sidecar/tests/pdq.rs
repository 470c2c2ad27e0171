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
