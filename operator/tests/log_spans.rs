//! The operator's JSON log lines carry the reconcile span's fields.
//!
//! Its own test binary with a global subscriber: tracing caches per-callsite interest, so a
//! thread-local subscriber in a binary whose other tests log in parallel can miss events.

mod support;

use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{Value, json};
use support::reconcile;

/// Collects what a subscriber writes.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn every_line_a_reconcile_logs_names_the_pool_through_its_span() {
    let lines = Lines::default();
    let writer = lines.clone();
    // The JSON layout the operator's `--log-format json` writes (inferpool-serve's log set-up).
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(true)
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap_or_else(|e| panic!("subscriber: {e}"));
    let (result, _) = reconcile(json!({}), vec![]).await;
    assert!(result.is_ok(), "{result:?}");

    let text = String::from_utf8(lines.0.lock().clone()).unwrap_or_else(|e| panic!("log is not UTF-8: {e}"));
    let ours: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|l| l["target"].as_str().is_some_and(|t| t.starts_with("inferpool_operator")))
        .collect();
    assert!(ours.iter().any(|l| l["fields"]["message"] == "reconciling"), "{text}");
    assert!(ours.iter().any(|l| l["fields"]["message"] == "created"), "no apply logged: {text}");
    for line in &ours {
        let span = &line["span"];
        assert_eq!((span["name"].as_str(), span["namespace"].as_str()), (Some("reconcile"), Some("prod")), "{line}");
        assert_eq!(span["pool"], "shop", "{line}");
    }
}
