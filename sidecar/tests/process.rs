//! The `inferpool-sidecar` binary as a pod runs it: configuration from flags and `INFERPOOL_`
//! environment variables, exit codes, and graceful shutdown on SIGTERM.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::proc::{BIN, Proc};
use common::*;
use http::{Method, StatusCode};
use serde_json::Value;

#[test]
fn help_lists_every_flag_with_its_environment_twin() {
    let out = std::process::Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "listen",
        "admin-listen",
        "model",
        "optimization",
        "data-dir",
        "max-batch",
        "max-delay-ms",
        "sessions",
        "threads",
        "queue-capacity",
        "default-deadline-ms",
        "max-body-bytes",
        "max-pixels",
        "admin-token",
        "admin-token-file",
    ] {
        assert!(help.contains(&format!("--{flag} ")), "--{flag} missing from --help");
        let env = format!("INFERPOOL_{}", flag.to_uppercase().replace('-', "_"));
        assert!(help.contains(&env), "{env} missing from --help");
    }
}

#[test]
fn bad_configuration_exits_64_naming_every_problem() {
    let out = std::process::Command::new(BIN)
        .env("INFERPOOL_MAX_BATCH", "0")
        .env("INFERPOOL_OPTIMIZATION", "Turbo")
        .args(["--listen", "localhost", "--threads=-3", "--model", "/nonexistent/card.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8(out.stderr).unwrap();
    for needle in ["--max-batch 0", "Turbo", "--listen \"localhost\"", "--threads \"-3\"", "/nonexistent/card.json"] {
        assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
    }
}

#[test]
fn an_unparseable_flag_also_exits_64() {
    let out = std::process::Command::new(BIN).arg("--no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[tokio::test]
async fn a_request_logs_its_id_route_and_method_in_its_span() {
    // The per-request line is at debug, for the HTTP layer only; the rest of the log stays at info.
    let mut p = Proc::spawn(&[("INFERPOOL_LOG", "info,inferpool_sidecar::http=debug")]);
    let api = p.ready().await;
    let reply = send(Method::GET, &format!("{api}/healthz"), &[("x-request-id", "trace-me-42")], "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["x-request-id"], "trace-me-42");
    let line = p.wait_log("served").await;
    assert_eq!(line["span"]["request_id"], "trace-me-42", "{line}");
    assert_eq!(line["span"]["route"], "probes", "{line}");
    assert_eq!(line["span"]["method"], "GET", "{line}");
    assert_eq!(line["fields"]["status"], 200, "{line}");
    assert!(line["fields"]["duration_ms"].as_f64().is_some(), "{line}");
}

#[tokio::test]
async fn sigterm_finishes_queued_work_then_exits_0_and_profiles_survive() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap();
    // A long batching delay keeps the request queued while the signal arrives.
    let mut p = Proc::spawn(&[
        ("INFERPOOL_DATA_DIR", data_dir),
        ("INFERPOOL_MAX_DELAY_MS", "1500"),
        ("INFERPOOL_MAX_BATCH", "64"),
    ]);
    let base = p.ready().await;
    let chelsea = photo("chelsea.png");
    let r = put_json(&format!("{base}/api/v1/profiles/cats"), &profile_body(&[("chelsea", &chelsea)])).await;
    assert_eq!(r.status, StatusCode::CREATED);

    let url = format!("{base}/api/v1/match?profile=cats");
    let in_flight = tokio::spawn({
        let image = jpeg(&decode(&chelsea), 40);
        async move { send(Method::POST, &url, &[("content-type", "image/jpeg"), ("x-deadline-ms", "10000")], image).await }
    });
    // SIGTERM once the request is queued (the SLA report shows it waiting).
    let queued = async {
        let mut ticker = tokio::time::interval(Duration::from_millis(10));
        loop {
            ticker.tick().await;
            if get(&format!("{base}/api/v1/metrics/sla")).await.json()["queueDepth"] == 1 {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), queued).await.unwrap();
    p.signal("-TERM");
    p.wait_log("shutting down").await;
    let reply = in_flight.await.unwrap();
    assert_eq!((reply.status, reply.json()["matched"].as_bool()), (StatusCode::OK, Some(true)), "{}", reply.text());
    let status = tokio::time::timeout(Duration::from_secs(30), p.child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));

    let mut again = Proc::spawn(&[("INFERPOOL_DATA_DIR", data_dir)]);
    let base = again.ready().await;
    let profile = get(&format!("{base}/api/v1/profiles/cats")).await;
    assert_eq!((profile.status, profile.json()["version"].as_u64()), (StatusCode::OK, Some(1)));
    again.signal("-INT");
    let status = tokio::time::timeout(Duration::from_secs(30), again.child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn sigterm_with_full_batches_and_a_queue_behind_them_answers_every_accepted_request() {
    // Batches of 4 that wait up to 1.5 s to fill, one session: 24 distinct images are a full batch
    // in inference and more queued behind it when the signal comes.
    let mut p =
        Proc::spawn(&[("INFERPOOL_MAX_DELAY_MS", "1500"), ("INFERPOOL_MAX_BATCH", "4"), ("INFERPOOL_SESSIONS", "1")]);
    let base = p.ready().await;
    let photo = decode(&photo("chelsea.png"));
    let mut requests = Vec::new();
    for i in 0..24u8 {
        let mut copy = photo.to_rgb8();
        copy.put_pixel(0, 0, image::Rgb([i, 0, 0]));
        let body = png(&image::DynamicImage::ImageRgb8(copy));
        let url = format!("{base}/api/v1/embed");
        requests.push(tokio::spawn(async move {
            send(Method::POST, &url, &[("content-type", "image/png"), ("x-deadline-ms", "30000")], body).await.status
        }));
    }
    let queued = async {
        let mut ticker = tokio::time::interval(Duration::from_millis(10));
        loop {
            ticker.tick().await;
            if get(&format!("{base}/api/v1/metrics/sla")).await.json()["queueDepth"].as_u64().unwrap_or(0) >= 8 {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), queued).await.expect("the queue never filled");
    p.signal("-TERM");
    let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
    for r in requests {
        *statuses.entry(r.await.unwrap().as_u16()).or_default() += 1;
    }
    eprintln!("SIGTERM with a full queue: answers by status {statuses:?}");
    assert_eq!(statuses.get(&200).copied(), Some(24), "every accepted request is answered: {statuses:?}");
    let status = tokio::time::timeout(Duration::from_secs(30), p.child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn after_sigterm_it_serves_not_ready_through_the_drain_delay_then_closes_its_listeners() {
    let mut p = Proc::spawn(&[("INFERPOOL_DRAIN_DELAY_SECONDS", "2")]);
    let base = p.ready().await;
    let chelsea = photo("chelsea.png");
    p.signal("-TERM");
    p.wait_log("shutting down: not ready, still serving").await;
    // Endpoints have not caught up yet: new connections still get answers, marked not to be reused.
    assert_eq!(get(&format!("{base}/readyz")).await.status, StatusCode::SERVICE_UNAVAILABLE);
    let served = post_image(&format!("{base}/api/v1/embed"), &chelsea).await;
    assert_eq!(served.status, StatusCode::OK, "{}", served.text());
    assert_eq!(served.headers["connection"], "close");
    // Then the listeners close and the process exits cleanly.
    p.wait_log("shutting down: closing the listeners").await;
    let status = tokio::time::timeout(Duration::from_secs(30), p.child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
    let addr = base.trim_start_matches("http://");
    assert!(std::net::TcpStream::connect(addr).is_err(), "still accepting on {addr}");
}

#[tokio::test]
async fn a_model_that_fails_its_checksum_stops_the_sidecar_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut card: Value = serde_json::from_slice(&std::fs::read(card()).unwrap()).unwrap();
    let model_dir = root().join("models/effnet_lite0");
    for v in ["fp32", "fp16", "int8"] {
        let file = card["variants"][v]["file"].as_str().unwrap().to_owned();
        card["variants"][v]["file"] = Value::String(model_dir.join(file).to_str().unwrap().to_owned());
        card["variants"][v]["sha256"] = Value::String("0".repeat(64));
    }
    let path = dir.path().join("card.json");
    std::fs::write(&path, serde_json::to_vec(&card).unwrap()).unwrap();
    let mut p = Proc::spawn(&[
        ("INFERPOOL_MODEL", path.to_str().unwrap()),
        ("INFERPOOL_DATA_DIR", dir.path().to_str().unwrap()),
    ]);
    let status = tokio::time::timeout(Duration::from_secs(30), p.child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(1));
    let messages = p.logged();
    assert!(messages.contains("sha256") && messages.contains("make setup"), "{messages}");
}
