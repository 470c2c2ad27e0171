//! Watches: a streamed body of newline-terminated `{"type", "object"}` events. A watch replays
//! from a resourceVersion (or lists every object as `ADDED`, or streams the initial list when
//! `sendInitialEvents=true`, closed by an `initial-events-end` bookmark), then follows live
//! changes until `timeoutSeconds`. With `allowWatchBookmarks=true` it sends a `BOOKMARK` carrying
//! only the resourceVersion it has reached, periodically and right before the server ends it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::error::Status;
use super::resources::Resource;
use super::selector::Selector;
use super::store::{Key, Store};
use super::{Body, field_match, query};

/// Watch length when the client does not say.
const DEFAULT_WATCH: Duration = Duration::from_secs(1800);
/// How often an idle watch that allows bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(30);

type Line = Result<Frame<Bytes>, Infallible>;

fn line(kind: &str, object: &Value) -> Line {
    Ok(Frame::data(Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))))
}

/// A bookmark of `resource` at `rv`; `end` marks the end of a streamed initial list.
fn bookmark(resource: &Resource, rv: u64, end: bool) -> Line {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line("BOOKMARK", &json!({"apiVersion": resource.api_version(), "kind": resource.kind, "metadata": metadata}))
}

fn flag(q: &str, name: &str) -> bool {
    query(q, name).is_some_and(|v| v == "true" || v == "1")
}

/// Serves a watch of `resource` (in `namespace`, or all) with the query `q`.
pub(super) fn watch(
    store: &Arc<Store>,
    resource: &'static Resource,
    namespace: Option<String>,
    q: &str,
) -> Result<Response<Body>, Status> {
    let timeout = query(q, "timeoutSeconds").and_then(|s| s.parse().ok()).map_or(DEFAULT_WATCH, Duration::from_secs);
    let labels = Selector::parse(&query(q, "labelSelector").unwrap_or_default()).map_err(Status::bad_request)?;
    let fields = query(q, "fieldSelector").unwrap_or_default();
    let from: u64 = query(q, "resourceVersion").and_then(|s| s.parse().ok()).unwrap_or(0);
    let bookmarks = flag(q, "allowWatchBookmarks");
    let initial = flag(q, "sendInitialEvents");
    let mut live = store.subscribe();
    let (tx, rx) = mpsc::channel::<Line>(256);
    let ns = namespace.clone();
    let keep = move |key: &Key, object: &Value| {
        *key.resource == *resource
            && ns.as_deref().is_none_or(|n| key.namespace == n)
            && labels.matches(object)
            && field_match(&fields, object)
    };
    let key_of = |o: &Value| Key {
        resource,
        namespace: o.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("").to_owned(),
        name: o.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_owned(),
    };
    // Replay first: the initial list (streamed or as ADDED events), or history from `from`.
    let (replay, mut last) = if initial || from == 0 {
        let (items, rv) = store.list(resource, namespace.as_deref(), |_| true);
        let mut events: Vec<Line> =
            items.into_iter().filter(|o| keep(&key_of(o), o)).map(|o| line("ADDED", &o)).collect();
        if initial {
            events.push(bookmark(resource, rv, true));
        }
        (events, rv)
    } else {
        match store.since(from) {
            Ok(events) => {
                let last = events.last().map_or(from, |e| e.rv);
                let lines = events
                    .iter()
                    .filter(|e| keep(&e.key, &e.object))
                    .map(|e| line(e.change.as_str(), &e.object))
                    .collect();
                (lines, last)
            }
            Err(gone) => (vec![line("ERROR", &gone.to_json())], u64::MAX),
        }
    };
    tokio::spawn(async move {
        for frame in replay {
            if tx.send(frame).await.is_err() {
                return;
            }
        }
        if last == u64::MAX {
            return;
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + BOOKMARK_EVERY, BOOKMARK_EVERY);
        loop {
            tokio::select! {
                _ = &mut deadline => {
                    if bookmarks {
                        let _ = tx.send(bookmark(resource, last, false)).await;
                    }
                    return;
                }
                _ = tx.closed() => return,
                _ = ticks.tick(), if bookmarks => {
                    if tx.send(bookmark(resource, last, false)).await.is_err() {
                        return;
                    }
                }
                event = live.recv() => match event {
                    Ok(e) if e.rv > last => {
                        last = e.rv;
                        if keep(&e.key, &e.object) && tx.send(line(e.change.as_str(), &e.object)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Fell behind the broadcast: end the watch; the client resumes from `last`.
                    Err(_) => return,
                },
            }
        }
    });
    let mut resp = Response::new(StreamBody::new(Frames(rx)).boxed());
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    Ok(resp)
}

/// A watch's frames, as the stream a streaming body reads.
struct Frames(mpsc::Receiver<Line>);

impl futures_core::Stream for Frames {
    type Item = Line;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}
