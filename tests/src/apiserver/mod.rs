//! A test double of the Kubernetes API server: typed REST over HTTP/1.1 on loopback for the
//! resources in [`resources::all`], kept in an in-memory [`store::Store`].
//!
//! It implements what kube-rs's client and runtime rely on: get, list (label selectors, equality
//! and set-based, and `metadata.name` field selectors), watch ([`watch`]: from a resourceVersion,
//! 410 Gone inside the stream when too old, bookmarks, streaming initial lists, `timeoutSeconds`),
//! create (409 AlreadyExists), replace with optimistic concurrency (409 Conflict), merge and JSON
//! patches, server-side apply with field ownership ([`fields`]), delete with finalizers and
//! background, foreground or orphan propagation, the status and scale subresources, and schema
//! validation of custom resources ([`schema`]). Every error is a Kubernetes `Status`.
//!
//! This module is the HTTP layer: it parses paths and queries, computes what a write makes of an
//! object (patches, apply, field ownership) and hands the result to the store.

pub mod audit;
pub mod error;
mod events;
pub mod fields;
mod patch;
pub mod persist;
pub mod rbac;
pub mod resources;
pub mod schema;
pub mod selector;
pub mod store;
mod table;
pub mod watch;

pub use patch::merge;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use audit::{Audit, Entry};
use error::Status;
use fields::{Scope, Writer};
use rbac::Rbac;
use resources::Resource;
use selector::Selector;
use store::{Key, Part, Propagation, Store};

pub(super) type Body = BoxBody<Bytes, Infallible>;

/// Largest request body accepted.
const MAX_BODY: usize = 8 << 20;

/// A running API server double.
pub struct ApiServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its objects.
    pub store: Arc<Store>,
    /// Every request it was asked.
    pub audit: Arc<Audit>,
    /// The access control enforced on one client, if any.
    pub rbac: Option<Arc<Rbac>>,
    task: tokio::task::JoinHandle<()>,
}

impl ApiServer {
    /// Starts serving on `listener`; every client may do everything.
    pub fn start(listener: TcpListener) -> std::io::Result<ApiServer> {
        Self::start_with(listener, None)
    }

    /// Starts serving on `listener`, enforcing `rbac` on its client.
    pub fn start_with(listener: TcpListener, rbac: Option<Rbac>) -> std::io::Result<ApiServer> {
        let addr = listener.local_addr()?;
        let store = Arc::new(Store::default());
        let audit = Arc::new(Audit::default());
        let rbac = rbac.map(Arc::new);
        let task = tokio::spawn(accept(listener, Arc::clone(&store), Arc::clone(&audit), rbac.clone()));
        Ok(ApiServer { addr, store, audit, rbac, task })
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

/// Serves until the [`ApiServer`] is dropped, through the accept loop every inferpool listener uses.
async fn accept(listener: TcpListener, store: Arc<Store>, audit: Arc<Audit>, rbac: Option<Arc<Rbac>>) {
    let service = |_peer| {
        let (store, audit, rbac) = (Arc::clone(&store), Arc::clone(&audit), rbac.clone());
        hyper::service::service_fn(move |req| {
            let (store, audit, rbac) = (Arc::clone(&store), Arc::clone(&audit), rbac.clone());
            async move { Ok::<_, Infallible>(handle(&store, &audit, rbac.as_deref(), req).await) }
        })
    };
    inferpool_serve::serve(listener, service, std::future::pending(), &inferpool_serve::Options::default()).await;
}

pub(super) fn full(status: StatusCode, value: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    resp
}

fn failure(s: &Status) -> Response<Body> {
    full(StatusCode::from_u16(s.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &s.to_json())
}

/// What a path names.
pub(super) struct Target {
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
pub(crate) fn query(q: &str, name: &str) -> Option<String> {
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

/// Field selector terms `path=value`, `path==value` and `path!=value`, each path (`metadata.name`,
/// `involvedObject.uid` as `kubectl describe` selects Events) read from the object, an absent
/// field as the empty string, as the real API server reads it.
pub(super) fn field_match(selector: &str, object: &Value) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let Some((path, value)) = term.split_once('=') else { return true };
        let (path, equal) = match path.strip_suffix('!') {
            Some(path) => (path, false),
            None => (path, true),
        };
        let found = object.pointer(&format!("/{}", path.replace('.', "/"))).and_then(Value::as_str).unwrap_or("");
        (found == value.trim_start_matches('=')) == equal
    })
}

async fn handle(store: &Arc<Store>, audit: &Audit, rbac: Option<&Rbac>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let q = req.uri().query().unwrap_or("").to_owned();
    let agent = req.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let result = async {
        if method == Method::GET
            && let Some(doc) = discovery(&path)
        {
            return Ok(full(StatusCode::OK, &doc));
        }
        let target = parse_path(&path)?;
        let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let content_type = header(header::CONTENT_TYPE);
        let accept = header(header::ACCEPT);
        if let Some(rbac) = rbac {
            let creates = method == Method::PATCH
                && content_type.starts_with("application/apply-patch")
                && is_absent(store, &target);
            rbac.check(&agent, &method, &q, &target, creates)?;
        }
        let body = req.into_body().collect().await.map_err(|e| Status::bad_request(e.to_string()))?.to_bytes();
        if body.len() > MAX_BODY {
            return Err(Status::refused(413, "RequestEntityTooLarge", "request body too large"));
        }
        let request =
            Call { method: &method, q: &q, content_type: &content_type, accept: &accept, agent: &agent, body: &body };
        route(store, &target, &request)
    }
    .await;
    let resp = result.unwrap_or_else(|s| failure(&s));
    let code = resp.status().as_u16();
    tracing::info!(%method, path, query = q, code, "api");
    audit.record(Entry { method, path, query: q, code, agent });
    resp
}

/// Whether the object a path names is absent (so an apply to it creates it).
fn is_absent(store: &Store, t: &Target) -> bool {
    let Some(name) = &t.name else { return false };
    let key = Key { resource: t.resource, namespace: t.namespace.clone().unwrap_or_default(), name: name.clone() };
    store.get(&key).is_err()
}

/// The discovery documents: `/version`, `/api`, `/apis`, and each group version's resource list.
fn discovery(path: &str) -> Option<Value> {
    let path = path.trim_end_matches('/');
    let groups = || {
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for r in resources::all().iter().filter(|r| !r.group.is_empty()) {
            if !seen.contains(&(r.group, r.version)) {
                seen.push((r.group, r.version));
            }
        }
        seen
    };
    let resource_list = |group: &str, version: &str| {
        let mut list = Vec::new();
        for r in resources::all().iter().filter(|r| r.group == group && r.version == version) {
            let verbs = json!(["create", "delete", "get", "list", "patch", "update", "watch"]);
            let mut entry = json!({"name": r.plural, "singularName": r.kind.to_ascii_lowercase(), "namespaced": r.namespaced, "kind": r.kind, "verbs": verbs});
            if !r.short_names.is_empty() {
                entry["shortNames"] = json!(r.short_names);
            }
            if !r.categories.is_empty() {
                entry["categories"] = json!(r.categories);
            }
            list.push(entry);
            if r.status {
                list.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}));
            }
            if r.scale.is_some() {
                list.push(json!({"name": format!("{}/scale", r.plural), "singularName": "", "namespaced": r.namespaced, "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]}));
            }
        }
        let group_version = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": list})
    };
    match path.split('/').collect::<Vec<_>>().as_slice() {
        // What clients (kubectl version, kube-rs's apiserver_version) read first.
        ["", "version"] => Some(json!({
            "major": "1", "minor": "37", "gitVersion": "v1.37.0-inferpool-local",
            "gitCommit": "", "gitTreeState": "clean", "buildDate": "", "goVersion": "",
            "compiler": "", "platform": "linux/amd64",
        })),
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

pub(super) fn parse_json(body: &[u8]) -> Result<Value, Status> {
    serde_json::from_slice(body).map_err(|e| Status::bad_request(format!("invalid JSON body: {e}")))
}

/// One request, as the handlers need it.
pub(super) struct Call<'a> {
    method: &'a Method,
    /// The raw query string.
    q: &'a str,
    content_type: &'a str,
    /// The `Accept` header: a Table for kubectl, else JSON.
    accept: &'a str,
    /// The `User-Agent`, whose product name is the default field manager.
    agent: &'a str,
    body: &'a [u8],
}

impl Call<'_> {
    /// The field manager of a non-apply write: `fieldManager`, else the user agent's product.
    fn manager(&self) -> String {
        query(self.q, "fieldManager").filter(|m| !m.is_empty()).unwrap_or_else(|| {
            let product = self.agent.split('/').next().unwrap_or("").trim();
            if product.is_empty() { "unknown".into() } else { product.to_owned() }
        })
    }
}

pub(super) fn scope(t: &Target) -> Scope {
    match t.part {
        Part::Status => Scope::Status,
        Part::Main => Scope::Main { status_separate: t.resource.status },
    }
}

/// Records a non-apply write's field ownership in `new`.
pub(super) fn record_update(t: &Target, call: &Call, old: Option<&Value>, new: &mut Value) {
    let (manager, time) = (call.manager(), store::now());
    let api_version = t.resource.api_version();
    let writer = Writer { manager: &manager, api_version: &api_version, time: &time, scope: scope(t) };
    fields::update(old, new, &writer);
}

/// The `gracePeriodSeconds` of a DELETE: its DeleteOptions body, else the query parameter.
fn grace_period(call: &Call) -> Result<Option<u64>, Status> {
    let from_body = if call.body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        parse_json(call.body)?.get("gracePeriodSeconds").and_then(Value::as_u64)
    };
    Ok(from_body.or_else(|| query(call.q, "gracePeriodSeconds").and_then(|g| g.parse().ok())))
}

/// The propagation policy of a DELETE: its DeleteOptions body, else the query parameter.
fn propagation(call: &Call) -> Result<Propagation, Status> {
    let from_body = if call.body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let options = parse_json(call.body)?;
        options.get("propagationPolicy").and_then(Value::as_str).map(str::to_owned).or_else(|| {
            options
                .get("orphanDependents")
                .and_then(Value::as_bool)
                .map(|o| if o { "Orphan" } else { "Background" }.into())
        })
    };
    match from_body.or_else(|| query(call.q, "propagationPolicy")).as_deref() {
        None | Some("Background") => Ok(Propagation::Background),
        Some("Foreground") => Ok(Propagation::Foreground),
        Some("Orphan") => Ok(Propagation::Orphan),
        Some(other) => Err(Status::bad_request(format!(
            "propagationPolicy: Unsupported value: \"{other}\": supported values: \"Background\", \"Foreground\", \"Orphan\""
        ))),
    }
}

fn route(store: &Arc<Store>, t: &Target, call: &Call) -> Result<Response<Body>, Status> {
    let ns = t.namespace.clone().unwrap_or_default();
    let key = |name: &str| Key { resource: t.resource, namespace: ns.clone(), name: name.to_owned() };
    if let (true, Some(name), Some(paths)) = (t.scale, &t.name, t.resource.scale) {
        return patch::scale(store, &key(name), paths, call);
    }
    let q = call.q;
    match (call.method, &t.name) {
        (&Method::GET, None) if query(q, "watch").is_some_and(|w| w == "true" || w == "1") => {
            watch::watch(store, t.resource, t.namespace.clone(), q)
        }
        (&Method::GET, None) => {
            let labels =
                Selector::parse(&query(q, "labelSelector").unwrap_or_default()).map_err(Status::bad_request)?;
            let fields = query(q, "fieldSelector").unwrap_or_default();
            let keep = |o: &Value| labels.matches(o) && field_match(&fields, o);
            let (mut items, mut rv) = store.list(t.resource, t.namespace.as_deref(), keep);
            if events::is_core(t.resource)
                && let Some(new_api) = events::new_api()
            {
                let (recorded, at) = store.list(new_api, t.namespace.as_deref(), |_| true);
                items.extend(recorded.iter().map(events::to_core).filter(|e| keep(e)));
                rv = rv.max(at);
            }
            if table::wanted(call.accept) {
                return Ok(full(
                    StatusCode::OK,
                    &table::render(t.resource, &items, &rv.to_string(), query(q, "includeObject").as_deref()),
                ));
            }
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
        (&Method::GET, Some(name)) if table::wanted(call.accept) => {
            let object = store.get(&key(name))?;
            let rv = object.pointer("/metadata/resourceVersion").and_then(Value::as_str).unwrap_or("").to_owned();
            Ok(full(StatusCode::OK, &table::render(t.resource, &[object], &rv, query(q, "includeObject").as_deref())))
        }
        (&Method::GET, Some(name)) => Ok(full(StatusCode::OK, &store.get(&key(name))?)),
        (&Method::POST, None) => {
            let mut object = parse_json(call.body)?;
            record_update(t, call, None, &mut object);
            Ok(full(StatusCode::CREATED, &store.create(t.resource, &ns, object)?))
        }
        (&Method::PUT, Some(name)) => {
            let mut object = parse_json(call.body)?;
            let current = store.get(&key(name))?;
            record_update(t, call, Some(&current), &mut object);
            Ok(full(StatusCode::OK, &store.replace(&key(name), t.part, object, true)?))
        }
        (&Method::PATCH, Some(name)) => patch::patch(store, t, &key(name), call),
        (&Method::DELETE, Some(name)) if grace_period(call)? == Some(0) => {
            Ok(full(StatusCode::OK, &store.delete_now(&key(name))?))
        }
        (&Method::DELETE, Some(name)) => Ok(full(StatusCode::OK, &store.delete_with(&key(name), propagation(call)?)?)),
        (m, _) => Err(Status::refused(405, "MethodNotAllowed", format!("{m} is not supported here"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_selectors_compare_the_named_fields() {
        let event = json!({"metadata": {"name": "e1", "namespace": "default"},
                           "involvedObject": {"kind": "InferencePool", "name": "shop", "uid": "u1"}});
        let cases = [
            ("", true),
            ("metadata.name=e1", true),
            ("metadata.name==e1", true),
            ("metadata.name=e2", false),
            ("metadata.namespace=default,metadata.name=e1", true),
            ("involvedObject.name=shop,involvedObject.kind=InferencePool,involvedObject.uid=u1", true),
            ("involvedObject.uid=u2", false),
            ("involvedObject.name!=shop", false),
            ("involvedObject.name!=cart", true),
            ("involvedObject.namespace=", true),
            ("involvedObject.namespace=default", false),
        ];
        for (selector, want) in cases {
            assert_eq!(field_match(selector, &event), want, "{selector:?}");
        }
    }
}
