//! `inferpool-local apply -f` and `delete -f`: what `kubectl apply --server-side` and
//! `kubectl delete -f` do, for machines without kubectl.
//!
//! Manifests are multi-document YAML; each object is sent to the server named by the kubeconfig's
//! current context (plain http only, as `inferpool-local up` serves) as a server-side apply
//! (`PATCH`, `application/apply-patch+yaml`, `fieldManager`, `force=true`) or a `DELETE`. Kinds
//! are mapped to resources through the server's discovery documents, so custom resources work.

use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// What can go wrong applying or deleting manifests.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not valid YAML.
    #[error("{path}: {message}")]
    Yaml {
        /// The file.
        path: String,
        /// The parser's message, with its location.
        message: String,
    },
    /// The kubeconfig does not name a usable server.
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig {
        /// The file.
        path: String,
        /// What is missing or wrong.
        message: String,
    },
    /// An object is not one the client can send.
    #[error("{0}")]
    Invalid(String),
    /// The server could not be reached or answered garbage.
    #[error("{0}")]
    Http(String),
    /// The server refused, with the reason and message of its Status.
    #[error("{reason} ({code}): {message}")]
    Api {
        /// HTTP status code.
        code: u16,
        /// The Status `reason`.
        reason: String,
        /// The Status `message`.
        message: String,
    },
}

/// The server and default namespace of a kubeconfig's current context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The cluster's server URL, e.g. `http://127.0.0.1:6443`.
    pub server: String,
    /// The context's namespace, or `default`.
    pub namespace: String,
}

fn named<'a>(list: &'a Value, field: &str, name: &str) -> Option<&'a Value> {
    list.get(field)?.as_array()?.iter().find(|e| e.get("name").and_then(Value::as_str) == Some(name))
}

/// Reads the current context's cluster server and namespace from a kubeconfig.
pub fn read_kubeconfig(path: &Path) -> Result<Target, Error> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: shown.clone(), source })?;
    let config: Value =
        serde_saphyr::from_str(&text).map_err(|e| Error::Kubeconfig { path: shown.clone(), message: e.to_string() })?;
    let fail = |message: String| Error::Kubeconfig { path: shown.clone(), message };
    let current =
        config.get("current-context").and_then(Value::as_str).ok_or_else(|| fail("no current-context".into()))?;
    let context = named(&config, "contexts", current)
        .and_then(|c| c.get("context"))
        .ok_or_else(|| fail(format!("no context {current:?}")))?;
    let cluster_name = context.get("cluster").and_then(Value::as_str).unwrap_or("");
    let server = named(&config, "clusters", cluster_name)
        .and_then(|c| c.pointer("/cluster/server"))
        .and_then(Value::as_str)
        .ok_or_else(|| fail(format!("no server for cluster {cluster_name:?}")))?;
    if !server.starts_with("http://") {
        return Err(fail(format!("server {server}: only plain http:// servers are supported")));
    }
    let namespace = context.get("namespace").and_then(Value::as_str).filter(|n| !n.is_empty()).unwrap_or("default");
    Ok(Target { server: server.trim_end_matches('/').to_owned(), namespace: namespace.to_owned() })
}

/// The objects in a multi-document YAML file (empty documents skipped).
pub fn read_manifests(path: &Path) -> Result<Vec<Value>, Error> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: shown.clone(), source })?;
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&text).map_err(|e| Error::Yaml { path: shown, message: e.to_string() })?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Where one object lives on the server.
struct Located {
    /// Its URL path.
    path: String,
    /// How kubectl names it: `deployment.apps/model`, `configmap/tuning`.
    display: String,
}

/// What `apply` did to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// It did not exist.
    Created,
    /// It changed.
    Configured,
    /// It already was as applied.
    Unchanged,
}

impl Applied {
    /// The word kubectl prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Applied::Created => "created",
            Applied::Configured => "configured",
            Applied::Unchanged => "unchanged",
        }
    }
}

/// An object without the bookkeeping an apply may touch even when it changes nothing
/// (`resourceVersion`, `managedFields` times), to tell "configured" from "unchanged".
fn content(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        meta.remove("managedFields");
    }
    o
}

/// A small client for the API server: discovery, apply, delete.
pub struct Client {
    http: HttpClient<HttpConnector, Full<Bytes>>,
    target: Target,
    /// Resources by apiVersion: (kind, plural, namespaced).
    discovery: HashMap<String, Vec<(String, String, bool)>>,
}

impl Client {
    /// A client for `target`.
    pub fn new(target: Target) -> Client {
        Client { http: HttpClient::builder(TokioExecutor::new()).build_http(), target, discovery: HashMap::new() }
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Value), Error> {
        let uri = format!("{}{path}", self.target.server);
        let req = Request::builder()
            .method(method)
            .uri(&uri)
            .header("content-type", content_type)
            .header("accept", "application/json")
            .body(Full::new(body))
            .map_err(|e| Error::Http(format!("{uri}: {e}")))?;
        let resp = self.http.request(req).await.map_err(|e| Error::Http(format!("{uri}: {e}")))?;
        let code = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| Error::Http(format!("{uri}: {e}")))?.to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if code.is_success() {
            return Ok((code, body));
        }
        let field = |f: &str| body.get(f).and_then(Value::as_str).unwrap_or("").to_owned();
        Err(Error::Api { code: code.as_u16(), reason: field("reason"), message: field("message") })
    }

    async fn locate(&mut self, object: &Value) -> Result<Located, Error> {
        let field = |p: &str| object.pointer(p).and_then(Value::as_str).filter(|s| !s.is_empty());
        let api_version = field("/apiVersion").ok_or_else(|| Error::Invalid("apiVersion is missing".into()))?;
        let kind = field("/kind").ok_or_else(|| Error::Invalid("kind is missing".into()))?;
        let name =
            field("/metadata/name").ok_or_else(|| Error::Invalid(format!("{kind}: metadata.name is missing")))?;
        let base =
            if api_version.contains('/') { format!("/apis/{api_version}") } else { format!("/api/{api_version}") };
        if !self.discovery.contains_key(api_version) {
            let (_, list) = self
                .request(Method::GET, &base, "application/json", Bytes::new())
                .await
                .map_err(|e| Error::Invalid(format!("apiVersion {api_version} is not served: {e}")))?;
            let resources = list
                .get("resources")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|r| {
                    let plural = r.get("name")?.as_str()?;
                    (!plural.contains('/')).then(|| {
                        (
                            r.get("kind").and_then(Value::as_str).unwrap_or("").to_owned(),
                            plural.to_owned(),
                            r.get("namespaced").and_then(Value::as_bool).unwrap_or(true),
                        )
                    })
                })
                .collect();
            self.discovery.insert(api_version.to_owned(), resources);
        }
        let (_, plural, namespaced) = self
            .discovery
            .get(api_version)
            .and_then(|rs| rs.iter().find(|(k, _, _)| k == kind))
            .ok_or_else(|| Error::Invalid(format!("no kind {kind:?} is served in {api_version}")))?;
        let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
        let display = if group.is_empty() {
            format!("{}/{name}", kind.to_lowercase())
        } else {
            format!("{}.{group}/{name}", kind.to_lowercase())
        };
        let path = if *namespaced {
            let ns = field("/metadata/namespace").unwrap_or(&self.target.namespace);
            format!("{base}/namespaces/{ns}/{plural}/{name}")
        } else {
            format!("{base}/{plural}/{name}")
        };
        Ok(Located { path, display })
    }

    /// Server-side applies `object` as `manager`; returns kubectl's name for it and what happened.
    pub async fn apply(&mut self, object: &Value, manager: &str) -> Result<(String, Applied), Error> {
        let at = self.locate(object).await?;
        let before = match self.request(Method::GET, &at.path, "application/json", Bytes::new()).await {
            Ok((_, current)) => Some(current),
            Err(Error::Api { code: 404, .. }) => None,
            Err(e) => return Err(e),
        };
        let manager: String = manager
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') { c } else { '_' })
            .collect();
        let query = format!("?fieldManager={manager}&force=true");
        let body = Bytes::from(object.to_string());
        let (code, after) =
            self.request(Method::PATCH, &format!("{}{query}", at.path), "application/apply-patch+yaml", body).await?;
        let outcome = match before {
            _ if code == StatusCode::CREATED => Applied::Created,
            None => Applied::Created,
            Some(before) if content(&before) == content(&after) => Applied::Unchanged,
            Some(_) => Applied::Configured,
        };
        Ok((at.display, outcome))
    }

    /// Deletes `object`; returns kubectl's name for it.
    pub async fn delete(&mut self, object: &Value) -> Result<String, Error> {
        let at = self.locate(object).await?;
        self.request(Method::DELETE, &at.path, "application/json", Bytes::new()).await?;
        Ok(at.display)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn kubeconfig_current_context_server_and_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: b\nclusters:\n- name: one\n  cluster: {server: 'http://127.0.0.1:1'}\n\
             - name: two\n  cluster:\n    server: http://127.0.0.1:2/\ncontexts:\n- name: a\n  context: {cluster: one}\n\
             - name: b\n  context: {cluster: two, namespace: pool}\n",
        )
        .unwrap();
        let t = read_kubeconfig(&path).unwrap();
        assert_eq!(t, Target { server: "http://127.0.0.1:2".into(), namespace: "pool".into() });
        std::fs::write(&path, "current-context: a\ncontexts:\n- name: a\n  context: {cluster: x}\nclusters: []\n")
            .unwrap();
        assert!(read_kubeconfig(&path).unwrap_err().to_string().contains("no server for cluster \"x\""));
    }

    #[test]
    fn manifests_skip_empty_documents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.yaml");
        std::fs::write(
            &path,
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {n: '1'}\n---\n---\nkind: X\n",
        )
        .unwrap();
        let docs = read_manifests(&path).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0]["data"]["n"], "1");
        std::fs::write(&path, "a: [1\n").unwrap();
        assert!(read_manifests(&path).unwrap_err().to_string().starts_with(&path.display().to_string()));
    }
}
