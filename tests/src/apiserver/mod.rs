//! A test double of the Kubernetes API server: typed REST over HTTP/1.1 on loopback for the
//! resources in [`resources::RESOURCES`], kept in an in-memory [`store::Store`].
//!
//! It implements what kube-rs's client and runtime rely on: get, list (label and `metadata.name`
//! field selectors), watch from a resourceVersion (replayed from history, 410 Gone inside the
//! stream when too old, server-side `timeoutSeconds`), create (409 AlreadyExists), replace with
//! optimistic concurrency (409 Conflict), merge patch and server-side apply (applied fields are
//! merged; field ownership is not tracked), delete with finalizers and background garbage
//! collection, and the status subresource. Every error is a Kubernetes `Status`.

pub mod error;
pub mod jsonpatch;
pub mod resources;
pub mod store;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use error::Status;
use resources::Resource;
use store::{Key, Part, Store};

type Body = BoxBody<Bytes, Infallible>;

/// Largest request body accepted.
const MAX_BODY: usize = 8 << 20;
/// Watch length when the client does not say.
const DEFAULT_WATCH: Duration = Duration::from_secs(1800);

/// A running API server double.
pub struct ApiServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its objects.
    pub store: Arc<Store>,
    task: tokio::task::JoinHandle<()>,
}

impl ApiServer {
    /// Starts serving on `listener`.
    pub fn start(listener: TcpListener) -> std::io::Result<ApiServer> {
        let addr = listener.local_addr()?;
        let store = Arc::new(Store::default());
        let task = tokio::spawn(accept(listener, Arc::clone(&store)));
        Ok(ApiServer { addr, store, task })
    }

    /// The base URL for a kubeconfig.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, store: Arc<Store>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let store = Arc::clone(&store);
                async move { Ok::<_, Infallible>(handle(&store, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn full(status: StatusCode, value: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    resp
}

fn failure(s: &Status) -> Response<Body> {
    full(StatusCode::from_u16(s.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &s.to_json())
}

/// What a path names.
struct Target {
    resource: &'static Resource,
    /// None: all namespaces (or a cluster-scoped resource).
    namespace: Option<String>,
    name: Option<String>,
    part: Part,
    /// The `/scale` subresource.
    scale: bool,
}

fn parse_path(path: &str) -> Result<Target, Status> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => {
            return Err(Status::refused(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            ));
        }
    };
    let unknown =
        || Status::refused(404, "NotFound", format!("the server could not find the requested resource ({path})"));
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..] if !matches!(*plural, "status" | "finalize") => (Some(ns.to_string()), {
            let mut v = vec![*plural];
            v.extend_from_slice(tail);
            v
        }),
        other => (None, other.to_vec()),
    };
    let (plural, name, sub) = match rest.as_slice() {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(*sub)),
        _ => return Err(unknown()),
    };
    let resource = resources::find(group, version, plural).ok_or_else(unknown)?;
    let (part, scale) = match sub {
        None => (Part::Main, false),
        Some("status") if resource.status => (Part::Status, false),
        Some("scale") if resource.scale.is_some() => (Part::Main, true),
        Some(_) => return Err(unknown()),
    };
    if resource.namespaced && name.is_some() && namespace.is_none() {
        return Err(unknown());
    }
    Ok(Target { resource, namespace, name, part, scale })
}

/// The percent-decoded value of query parameter `name`. Split first, decode after, so an encoded
/// `&` or `=` inside a value (a label selector) stays part of it.
fn query(q: &str, name: &str) -> Option<String> {
    q.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')).map(decode)
}

fn decode(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Equality-based label selector terms: `k=v`, `k==v`, `k!=v`, `k`, `!k`.
fn label_match(selector: &str, object: &Value) -> bool {
    let labels = object.pointer("/metadata/labels");
    let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    selector.split(',').map(str::trim).filter(|t| !t.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            label(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once('=') {
            label(k.trim()) == Some(v.trim_start_matches('=').trim())
        } else if let Some(k) = term.strip_prefix('!') {
            label(k.trim()).is_none()
        } else {
            label(term).is_some()
        }
    })
}

fn field_match(selector: &str, object: &Value) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| match term.split_once('=') {
        Some(("metadata.name", v)) => {
            object.pointer("/metadata/name").and_then(Value::as_str) == Some(v.trim_start_matches('='))
        }
        Some(("metadata.namespace", v)) => {
            object.pointer("/metadata/namespace").and_then(Value::as_str) == Some(v.trim_start_matches('='))
        }
        _ => true,
    })
}

async fn handle(store: &Arc<Store>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let q = req.uri().query().unwrap_or("").to_owned();
    let result = async {
        if method == Method::GET
            && let Some(doc) = discovery(&path)
        {
            return Ok(full(StatusCode::OK, &doc));
        }
        let target = parse_path(&path)?;
        let content_type =
            req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let body = req.into_body().collect().await.map_err(|e| Status::bad_request(e.to_string()))?.to_bytes();
        if body.len() > MAX_BODY {
            return Err(Status::refused(413, "RequestEntityTooLarge", "request body too large"));
        }
        route(store, &method, &target, &q, &content_type, &body)
    }
    .await;
    let resp = result.unwrap_or_else(|s| failure(&s));
    tracing::info!(%method, path, query = q, code = resp.status().as_u16(), "api");
    resp
}

/// The discovery documents: `/api`, `/apis`, and each group version's resource list.
fn discovery(path: &str) -> Option<Value> {
    let path = path.trim_end_matches('/');
    let groups = || {
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for r in resources::RESOURCES.iter().filter(|r| !r.group.is_empty()) {
            if !seen.contains(&(r.group, r.version)) {
                seen.push((r.group, r.version));
            }
        }
        seen
    };
    let resource_list = |group: &str, version: &str| {
        let mut list = Vec::new();
        for r in resources::RESOURCES.iter().filter(|r| r.group == group && r.version == version) {
            let verbs = json!(["create", "delete", "get", "list", "patch", "update", "watch"]);
            list.push(json!({"name": r.plural, "singularName": r.kind.to_ascii_lowercase(), "namespaced": r.namespaced, "kind": r.kind, "verbs": verbs}));
            if r.status {
                list.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}));
            }
        }
        let group_version = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": list})
    };
    match path.split('/').collect::<Vec<_>>().as_slice() {
        ["", "api"] => Some(json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})),
        ["", "api", "v1"] => Some(resource_list("", "v1")),
        ["", "apis"] => Some(json!({
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": groups().iter().map(|(g, v)| {
                let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
                json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
            }).collect::<Vec<_>>(),
        })),
        ["", "apis", g, v] if groups().contains(&(*g, *v)) => Some(resource_list(g, v)),
        _ => None,
    }
}

fn parse_json(body: &[u8]) -> Result<Value, Status> {
    serde_json::from_slice(body).map_err(|e| Status::bad_request(format!("invalid JSON body: {e}")))
}

fn route(
    store: &Arc<Store>,
    method: &Method,
    t: &Target,
    q: &str,
    content_type: &str,
    body: &[u8],
) -> Result<Response<Body>, Status> {
    let ns = t.namespace.clone().unwrap_or_default();
    let key = |name: &str| Key { resource: t.resource, namespace: ns.clone(), name: name.to_owned() };
    if let (true, Some(name), Some(paths)) = (t.scale, &t.name, t.resource.scale) {
        return scale(store, &key(name), paths, method, content_type, body);
    }
    match (method, &t.name) {
        (&Method::GET, None) if query(q, "watch").is_some_and(|w| w == "true" || w == "1") => watch(store, t, q),
        (&Method::GET, None) => {
            let (labels, fields) =
                (query(q, "labelSelector").unwrap_or_default(), query(q, "fieldSelector").unwrap_or_default());
            let (items, rv) =
                store.list(t.resource, t.namespace.as_deref(), |o| label_match(&labels, o) && field_match(&fields, o));
            Ok(full(
                StatusCode::OK,
                &json!({
                    "apiVersion": t.resource.api_version(),
                    "kind": format!("{}List", t.resource.kind),
                    "metadata": {"resourceVersion": rv.to_string()},
                    "items": items,
                }),
            ))
        }
        (&Method::GET, Some(name)) => Ok(full(StatusCode::OK, &store.get(&key(name))?)),
        (&Method::POST, None) => Ok(full(StatusCode::CREATED, &store.create(t.resource, &ns, parse_json(body)?)?)),
        (&Method::PUT, Some(name)) => {
            Ok(full(StatusCode::OK, &store.replace(&key(name), t.part, parse_json(body)?, true)?))
        }
        (&Method::PATCH, Some(name)) => patch(store, t, &key(name), q, content_type, body),
        (&Method::DELETE, Some(name)) => Ok(full(StatusCode::OK, &store.delete(&key(name))?)),
        (m, _) => Err(Status::refused(405, "MethodNotAllowed", format!("{m} is not supported here"))),
    }
}

/// The `/scale` subresource: an `autoscaling/v1` Scale read from, and written to, the object.
fn scale(
    store: &Arc<Store>,
    key: &Key,
    paths: resources::ScalePaths,
    method: &Method,
    content_type: &str,
    body: &[u8],
) -> Result<Response<Body>, Status> {
    let view = |object: &Value| {
        let selector = match object.pointer(paths.selector) {
            Some(Value::Object(labels)) => {
                labels.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect::<Vec<_>>().join(",")
            }
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        json!({
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                "name": object.pointer("/metadata/name"),
                "namespace": object.pointer("/metadata/namespace"),
                "uid": object.pointer("/metadata/uid"),
                "resourceVersion": object.pointer("/metadata/resourceVersion"),
                "creationTimestamp": object.pointer("/metadata/creationTimestamp"),
            },
            "spec": {"replicas": object.pointer(paths.spec_replicas).cloned().unwrap_or(json!(0))},
            "status": {"replicas": object.pointer(paths.status_replicas).cloned().unwrap_or(json!(0)), "selector": selector},
        })
    };
    let current = store.get(key)?;
    if *method == Method::GET {
        return Ok(full(StatusCode::OK, &view(&current)));
    }
    let mut requested = view(&current);
    match (method, content_type) {
        (&Method::PUT, _) => requested = parse_json(body)?,
        (&Method::PATCH, ct) if ct.starts_with("application/json-patch+json") => {
            requested = jsonpatch::apply(&requested, &parse_json(body)?)
                .map_err(|e| Status::refused(422, "Invalid", e.to_string()))?;
        }
        (&Method::PATCH, _) => merge(&mut requested, &parse_json(body)?),
        (m, _) => return Err(Status::refused(405, "MethodNotAllowed", format!("{m} is not supported on /scale"))),
    }
    let replicas = requested
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .filter(|r| *r >= 0)
        .ok_or_else(|| Status::invalid(key.resource, &key.name, "spec.replicas", "must be a whole number >= 0"))?;
    let mut object = current;
    if let Some(slot) = object.pointer_mut(paths.spec_replicas) {
        *slot = json!(replicas);
    } else {
        let mut patch = json!({});
        let mut cursor = &mut patch;
        for token in paths.spec_replicas.trim_start_matches('/').split('/') {
            cursor = &mut cursor[token];
        }
        *cursor = json!(replicas);
        merge(&mut object, &patch);
    }
    let updated = store.replace(key, Part::Main, object, false)?;
    Ok(full(StatusCode::OK, &view(&updated)))
}

/// RFC 7386 JSON merge patch.
pub fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn patch(
    store: &Arc<Store>,
    t: &Target,
    key: &Key,
    q: &str,
    content_type: &str,
    body: &[u8],
) -> Result<Response<Body>, Status> {
    let patch = parse_json(body)?;
    if content_type.starts_with("application/json-patch+json") {
        let current = store.get(key)?;
        let patched = jsonpatch::apply(&current, &patch).map_err(|e| Status::refused(422, "Invalid", e.to_string()))?;
        return Ok(full(StatusCode::OK, &store.replace(key, t.part, patched, false)?));
    }
    let apply = content_type.starts_with("application/apply-patch");
    if !apply
        && !content_type.starts_with("application/merge-patch+json")
        && !content_type.starts_with("application/strategic-merge-patch+json")
    {
        return Err(Status::refused(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format: {content_type}"),
        ));
    }
    if apply && query(q, "fieldManager").is_none_or(|m| m.is_empty()) {
        return Err(Status::invalid(
            t.resource,
            &key.name,
            "fieldManager",
            "Required value: is required for apply patch",
        ));
    }
    match store.get(key) {
        Ok(mut current) => {
            let rv = current.pointer("/metadata/resourceVersion").cloned();
            merge(&mut current, &patch);
            // A patch carries no resourceVersion unless it asks for a precondition.
            if patch.pointer("/metadata/resourceVersion").is_none() {
                current["metadata"]["resourceVersion"] = rv.unwrap_or(Value::Null);
            }
            Ok(full(StatusCode::OK, &store.replace(key, t.part, current, false)?))
        }
        Err(e) if apply && t.part == Part::Main && e.code == 404 => {
            Ok(full(StatusCode::CREATED, &store.create(t.resource, &key.namespace, patch)?))
        }
        Err(e) => Err(e),
    }
}

fn watch(store: &Arc<Store>, t: &Target, q: &str) -> Result<Response<Body>, Status> {
    let timeout = query(q, "timeoutSeconds").and_then(|s| s.parse().ok()).map_or(DEFAULT_WATCH, Duration::from_secs);
    let labels = query(q, "labelSelector").unwrap_or_default();
    let fields = query(q, "fieldSelector").unwrap_or_default();
    let from: u64 = query(q, "resourceVersion").and_then(|s| s.parse().ok()).unwrap_or(0);
    let resource = t.resource;
    let namespace = t.namespace.clone();
    let mut live = store.subscribe();
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(256);
    let keep = move |key: &Key, object: &Value| {
        *key.resource == *resource
            && namespace.as_deref().is_none_or(|ns| key.namespace == ns)
            && label_match(&labels, object)
            && field_match(&fields, object)
    };
    let line = |kind: &str, object: &Value| {
        Ok(Frame::data(Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))))
    };
    // Replay first: from history, or every object as ADDED when no version is given.
    let (replay, mut last) = if from == 0 {
        let (items, rv) = store.list(resource, t.namespace.as_deref(), |_| true);
        let events = items
            .into_iter()
            .filter_map(|o| {
                let key = Key {
                    resource,
                    namespace: o.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("").to_owned(),
                    name: o.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_owned(),
                };
                keep(&key, &o).then(|| line("ADDED", &o))
            })
            .collect::<Vec<_>>();
        (events, rv)
    } else {
        match store.since(from) {
            Ok(events) => {
                let last = events.last().map_or(from, |e| e.rv);
                (
                    events
                        .iter()
                        .filter(|e| keep(&e.key, &e.object))
                        .map(|e| line(e.change.as_str(), &e.object))
                        .collect(),
                    last,
                )
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
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
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
struct Frames(mpsc::Receiver<Result<Frame<Bytes>, Infallible>>);

impl futures_core::Stream for Frames {
    type Item = Result<Frame<Bytes>, Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}
