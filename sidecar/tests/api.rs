//! The public API over real TCP against a real model: happy paths, correctness against Python
//! onnxruntime, and matching of transformed copies of real photos.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use http::{Method, StatusCode};
use inferpool_crds::SlaReport;
use serde_json::{Value, json};

#[tokio::test]
async fn every_route_answers_its_happy_path() {
    let s = Server::start(&[]).await;
    let chelsea = photo("chelsea.png");

    assert_eq!(get(&s.url("/healthz")).await.status, StatusCode::OK);
    assert_eq!(get(&s.url("/readyz")).await.status, StatusCode::OK);

    let r = post_image(&s.url("/api/v1/embed"), &chelsea).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let e = r.json();
    assert_eq!(e["dim"], 1280);
    assert_eq!(e["embedding"].as_array().unwrap().len(), 1280);
    assert_eq!(e["model"], "efficientnet-lite0");
    assert_eq!(e["cache"], "miss");
    for k in ["queue", "inference", "total"] {
        assert!(e["timing_ms"][k].as_f64().unwrap() >= 0.0, "timing_ms.{k}");
    }

    let url = s.url("/api/v1/profiles/cats");
    let r = put_json(&url, &profile_body(&[("chelsea", &chelsea)])).await;
    assert_eq!((r.status, r.json()["version"].as_u64()), (StatusCode::CREATED, Some(1)), "{}", r.text());
    let r = put_json(&url, &profile_body(&[("chelsea", &chelsea), ("coffee", &photo("coffee.png"))])).await;
    assert_eq!((r.status, r.json()["version"].as_u64()), (StatusCode::OK, Some(2)));
    assert_eq!(r.json()["references"], 2);
    let p = get(&url).await.json();
    let ids: Vec<&Value> = p["references"].as_array().unwrap().iter().map(|r| &r["id"]).collect();
    assert_eq!(ids, [&json!("chelsea"), &json!("coffee")]);
    assert!(p["references"].as_array().unwrap().iter().all(|r| r["keypoints"].as_u64() > Some(100)), "{p}");
    assert_eq!(p["without_keypoints"], 0);
    assert_eq!(p["stale"], false);
    let with = get(&format!("{url}?include=embeddings")).await.json();
    assert_eq!(with["references"][0]["embedding"].as_array().unwrap().len(), 1280);

    let m = post_image(&s.url("/api/v1/match?profile=cats"), &chelsea).await.json();
    assert_eq!(
        (m["profile"].as_str(), m["matched"].as_bool(), m["reference"].as_str()),
        (Some("cats"), Some(true), Some("chelsea"))
    );
    assert!(m["score"].as_f64().unwrap() > 0.999, "{m}");
    assert_eq!(m["threshold"], 0.6);
    assert_eq!(m["cache"], "memory", "chelsea was embedded before");

    let sc = post_image(&s.url("/api/v1/scan?top_k=3"), &photo("coffee.png")).await.json();
    assert_eq!(sc["matches"][0]["profile"], "cats");
    assert_eq!(sc["matches"][0]["reference"], "coffee");
    assert_eq!(sc["profiles_checked"], 1);

    let metrics = get(&s.url("/metrics")).await.text();
    for name in [
        "inferpool_requests_total{code=\"200\",route=\"embed\"}",
        "inferpool_request_duration_seconds_bucket",
        "inferpool_queue_wait_seconds_count",
        "inferpool_inference_duration_seconds_count",
        "inferpool_batch_size_count",
        "inferpool_queue_depth",
        "inferpool_model_info{model=\"efficientnet-lite0\",provider=\"cpu\",variant=\"fp32\"} 1",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    // Memory for the dashboard and the alerts: the process's RSS, refreshed at each render.
    assert!(metric(&metrics, "inferpool_resident_memory_bytes") > 0.0, "{metrics}");
    assert!(metrics.contains("\ninferpool_memory_limit_bytes "), "{metrics}");
    // The process collector's series (a CPU alert reads process_cpu_seconds_total).
    assert!(metric(&metrics, "process_resident_memory_bytes") > 0.0, "{metrics}");
    assert!(metrics.contains("\nprocess_cpu_seconds_total "), "{metrics}");
    let sla: SlaReport = serde_json::from_slice(&get(&s.url("/api/v1/metrics/sla")).await.body).unwrap();
    assert_eq!((sla.provider.as_str(), sla.variant.as_str(), sla.ready), ("cpu", "fp32", true));
    assert_eq!(sla.windows.iter().map(|w| w.seconds).collect::<Vec<_>>(), [2, 10, 60]);
    // API traffic counts (embed, 2 profile uploads, 2 profile reads, match, scan); probes,
    // metrics and reports do not.
    assert_eq!(sla.windows[2].requests, 7);
    assert!(sla.windows[2].latency_ms.p95 > 0.0 && sla.rss_bytes > 0);
    let perf = get(&s.url("/api/v1/metrics/performance")).await.json();
    assert_eq!(perf["windows"][2]["requests"], 7);
    let ai = get(&s.url("/api/v1/metrics/ai-inference")).await.json();
    assert_eq!((ai["provider"].as_str(), ai["embeddingDim"].as_u64()), (Some("cpu"), Some(1280)));
    // Two distinct images (chelsea, coffee): every repeat was answered by the cache.
    assert_eq!(ai["imagesEmbeddedTotal"], 2);

    let r = send(Method::DELETE, &url, &[], vec![]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(get(&url).await.status, StatusCode::NOT_FOUND);
    s.stop().await;
}

/// The sidecar's embedding equals Python onnxruntime's on the same model and input tensor.
#[tokio::test]
async fn embedding_equals_python_onnxruntime() {
    let s = Server::start(&["--optimization", "Accuracy"]).await;
    let bytes = photo("astronaut.png");
    let served: Vec<f32> =
        serde_json::from_value(post_image(&s.url("/api/v1/embed"), &bytes).await.json()["embedding"].clone()).unwrap();

    let tensor = s.app.preprocessor.prepare(&bytes).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("input.f32");
    std::fs::write(&path, tensor.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let model = root().join("models/effnet_lite0/effnet_lite0_fp32.onnx");
    let out = std::process::Command::new(python())
        .arg(root().join("scripts/ort_reference.py"))
        .args([model.as_os_str(), path.as_os_str()])
        .arg("1,3,224,224")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reference: Vec<Vec<f32>> = serde_json::from_slice(&out.stdout).unwrap();
    let reference = &reference[0];

    assert_eq!(served.len(), reference.len());
    let max_diff = served.iter().zip(reference).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(max_diff <= 1e-3, "max abs difference {max_diff}");
    let (mut a, mut b) = (served.clone(), reference.clone());
    inferpool_sidecar::matcher::normalize(&mut a);
    inferpool_sidecar::matcher::normalize(&mut b);
    let cos = inferpool_sidecar::matcher::cosine(&a, &b);
    assert!(cos >= 0.9999, "cosine {cos}");
    s.stop().await;
}

/// Downscaled, recompressed and cropped copies of a photo match its profile; other photos do not.
#[tokio::test]
async fn transformed_copies_match_and_other_photos_do_not() {
    let s = Server::start(&[]).await;
    let names = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png"];
    for name in names {
        let id = name.split('.').next().unwrap();
        let r = put_json(&s.url(&format!("/api/v1/profiles/{id}")), &profile_body(&[(id, &photo(name))])).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    }
    for name in names {
        let id = name.split('.').next().unwrap();
        let img = decode(&photo(name));
        let (w, h) = (img.width(), img.height());
        let copies = [
            ("50% downscale", png(&img.resize_exact(w / 2, h / 2, image::imageops::FilterType::Triangle))),
            ("JPEG q40", jpeg(&img, 40)),
            ("10% crop", png(&img.crop_imm(w / 20, h / 20, w - w / 10, h - h / 10))),
        ];
        for (what, bytes) in &copies {
            let m = post_image(&s.url(&format!("/api/v1/match?profile={id}")), bytes).await.json();
            assert_eq!(m["matched"], true, "{what} of {name}: {m}");
            let scan = post_image(&s.url("/api/v1/scan"), bytes).await.json();
            assert_eq!(scan["matches"][0]["profile"], id, "{what} of {name}: {scan}");
        }
        for other in names.iter().filter(|n| **n != name) {
            let m = post_image(&s.url(&format!("/api/v1/match?profile={id}")), &photo(other)).await.json();
            assert_eq!(m["matched"], false, "{other} against {name}: {m}");
        }
    }
    s.stop().await;
}

/// Profiles survive a restart of the sidecar on the same data directory.
#[tokio::test]
async fn restart_keeps_profiles() {
    let data = tempfile::tempdir().unwrap();
    let first = Server::start_in(data.path(), &[]).await;
    let r = put_json(&first.url("/api/v1/profiles/cats"), &profile_body(&[("chelsea", &photo("chelsea.png"))])).await;
    assert_eq!(r.status, StatusCode::CREATED);
    first.stop().await;

    let second = Server::start_in(data.path(), &[]).await;
    let p = get(&second.url("/api/v1/profiles/cats")).await;
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(p.json()["version"], 1);
    let m =
        post_image(&second.url("/api/v1/match?profile=cats"), &jpeg(&decode(&photo("chelsea.png")), 40)).await.json();
    assert_eq!(m["matched"], true, "{m}");
    second.stop().await;
}
