//! Robust matching over HTTP, on the real photos `make setup` installs: heavy copies that the
//! global embedding misses are found by keypoints, different photos are not, keypoints survive a
//! restart and reach another replica through Redis, and `mode=global` keeps the plain scores.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::redis::RedisServer;
use common::*;
use http::StatusCode;
use image::imageops::{self, FilterType};
use image::{DynamicImage, RgbImage};
use serde_json::Value;

/// The protected photos: grey and textured ones, whose heavy copies the embedding scores low.
const PROTECTED: &[&str] = &["camera", "gravel", "moon"];

fn rgb(name: &str) -> RgbImage {
    decode(&photo(&format!("{name}.png"))).to_rgb8()
}

fn profile() -> Value {
    let images: Vec<(&str, Vec<u8>)> =
        PROTECTED.iter().map(|n| (*n, jpeg(&DynamicImage::ImageRgb8(rgb(n)), 90))).collect();
    let refs: Vec<(&str, &[u8])> = images.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    profile_body(&refs)
}

/// The heavy copies: (what, the photo it copies, JPEG bytes).
fn copies() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let camera = imageops::rotate90(&rgb("camera"));
    let gravel = rgb("gravel");
    let (w, h) = (gravel.width(), gravel.height());
    let crop = imageops::crop_imm(&gravel, w / 5, h / 4, w * 11 / 20, h * 11 / 20).to_image();
    let mut background = imageops::resize(&rgb("coffee"), 800, 600, FilterType::Triangle);
    let moon = imageops::resize(&rgb("moon"), 400, 400, FilterType::Triangle);
    imageops::overlay(&mut background, &moon, 330, 120);
    let encode = |img: RgbImage| jpeg(&DynamicImage::ImageRgb8(img), 85);
    vec![
        ("turned by 90 degrees", "camera", encode(camera)),
        ("cropped to 30% of its area", "gravel", encode(crop)),
        ("pasted at half size into another photo", "moon", encode(background)),
    ]
}

async fn matched(server: &Server, image: &[u8], mode: &str) -> Value {
    let r = post_image(&server.url(&format!("/api/v1/match?profile=protected&mode={mode}")), image).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()
}

#[tokio::test]
async fn heavy_copies_the_embedding_misses_are_found_by_keypoints_and_other_photos_are_not() {
    let server = Server::start(&[]).await;
    let r = put_json(&server.url("/api/v1/profiles/protected"), &profile()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    for (what, original, image) in copies() {
        let global = matched(&server, &image, "global").await;
        let robust = matched(&server, &image, "robust").await;
        eprintln!("{what}: global {global}\n  robust {robust}");
        assert_eq!(global["matched"], false, "{what}: the embedding alone misses it: {global}");
        assert_eq!(global["inliers"], Value::Null, "{what}: global mode computes no keypoints");
        assert_eq!(robust["matched"], true, "{what}: {robust}");
        assert_eq!((robust["signal"].as_str(), robust["reference"].as_str()), (Some("keypoints"), Some(original)));
        assert!(robust["inliers"].as_u64().unwrap() >= 18, "{what}: {robust}");
        assert_eq!(robust["score"], global["score"], "{what}: the same embedding score either way");
    }
    for other in ["astronaut", "chelsea", "coffee", "coins", "rocket"] {
        let image = if other == "rocket" { photo("rocket.jpg") } else { photo(&format!("{other}.png")) };
        let robust = matched(&server, &image, "robust").await;
        eprintln!("{other}: {robust}");
        assert_eq!(robust["matched"], false, "{other} is not a protected photo: {robust}");
    }
    let scan = post_image(&server.url("/api/v1/scan?top_k=5"), &copies()[2].2).await.json();
    assert_eq!((scan["mode"].as_str(), scan["matches"][0]["signal"].as_str()), (Some("robust"), Some("keypoints")));
    assert!(
        post_image(&server.url("/api/v1/scan?mode=global"), &copies()[2].2).await.json()["matches"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn global_mode_keeps_the_plain_cosine_and_threshold() {
    let server = Server::start(&[]).await;
    put_json(&server.url("/api/v1/profiles/protected"), &profile()).await;
    let camera = jpeg(&DynamicImage::ImageRgb8(rgb("camera")), 40);
    let embed = |image: Vec<u8>| {
        let url = server.url("/api/v1/embed");
        async move {
            let e = post_image(&url, &image).await.json()["embedding"].clone();
            let v: Vec<f32> = serde_json::from_value(e).unwrap();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / norm).collect::<Vec<f32>>()
        }
    };
    let (query, reference) =
        (embed(camera.clone()).await, embed(jpeg(&DynamicImage::ImageRgb8(rgb("camera")), 90)).await);
    let cosine: f32 = query.iter().zip(&reference).map(|(a, b)| a * b).sum();
    let global = matched(&server, &camera, "global").await;
    let score = global["score"].as_f64().unwrap();
    assert!((score - f64::from(cosine)).abs() < 1e-4, "{score} vs the embeddings' cosine {cosine}");
    assert_eq!(global["matched"], cosine >= 0.6, "{global}");
    assert_eq!((global["signal"].as_str(), global["mode"].as_str()), (Some("embedding"), Some("global")));
}

#[tokio::test]
async fn keypoints_survive_a_restart_and_reach_another_replica_through_redis() {
    let redis = RedisServer::start();
    let data = tempfile::tempdir().unwrap();
    let flags = ["--redis-url", &redis.url()];
    let a = Server::start_in(data.path(), &flags).await;
    assert_eq!(put_json(&a.url("/api/v1/profiles/protected"), &profile()).await.status, StatusCode::CREATED);
    let listed = get(&a.url("/api/v1/profiles/protected")).await.json();
    assert_eq!(listed["without_keypoints"], 0, "{listed}");
    for reference in listed["references"].as_array().unwrap() {
        assert!(reference["keypoints"].as_u64().unwrap() > 100, "{reference}");
    }
    let copy = copies().remove(0).2;
    a.stop().await;

    let restarted = Server::start_in(data.path(), &flags).await;
    let other = Server::start(&flags).await;
    for (who, server) in [("after a restart", &restarted), ("on another replica", &other)] {
        let shown = get(&server.url("/api/v1/profiles/protected")).await.json();
        assert_eq!(shown["references"], listed["references"], "{who}");
        let robust = matched(server, &copy, "robust").await;
        assert_eq!(robust["signal"], "keypoints", "{who}: {robust}");
    }
}

#[tokio::test]
async fn a_mode_other_than_robust_or_global_is_refused() {
    let server = Server::start(&[]).await;
    put_json(&server.url("/api/v1/profiles/protected"), &profile()).await;
    let image = photo("coins.png");
    for (route, query) in [("match", "profile=protected&mode=regional"), ("scan", "mode=GLOBAL"), ("scan", "mode=")] {
        let r = post_image(&server.url(&format!("/api/v1/{route}?{query}")), &image).await;
        assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "invalid_query".to_owned()), "{route}?{query}");
        assert!(r.text().contains("mode must be robust or global"), "{}", r.text());
    }
    let r = post_image(&server.url("/api/v1/embed?mode=global"), &image).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "embed takes no mode: {}", r.text());
}
