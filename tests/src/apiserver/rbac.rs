//! Role-based access control for one client, as a real API server enforces a ServiceAccount's
//! (Cluster)Roles: every request from that client (told apart by its User-Agent) needs a rule
//! granting its verb on its group, resource (with subresource) and, for a Role, its namespace;
//! anything else is answered `403 Forbidden` with Kubernetes' wording. Other clients (the tests
//! themselves, kubectl) act as a cluster admin.
//!
//! Verbs follow Kubernetes: `get`/`list`/`watch` for reads, `create`, `update`, `patch`,
//! `delete`/`deletecollection`; a server-side apply that creates its object needs `create` as well
//! as `patch`. Every permission a request used is remembered, so a test can compare what the
//! client needed with what it was granted.

use std::collections::BTreeSet;

use http::Method;
use parking_lot::Mutex;

use super::error::Status;
use super::{Target, query};

/// One verb on one resource, in one namespace or (None) everywhere.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Permission {
    /// API group; "" for the core group.
    pub group: String,
    /// Plural resource, with `/status` or `/scale` for a subresource.
    pub resource: String,
    /// The verb.
    pub verb: String,
}

/// A rule of a Role (namespaced) or ClusterRole (`namespace: None`), as its YAML has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The namespace a Role's rule holds in; None for a ClusterRole's.
    pub namespace: Option<String>,
    /// API groups, resources and verbs, as in the Role.
    pub groups: Vec<String>,
    /// Resources, as in the Role.
    pub resources: Vec<String>,
    /// Verbs, as in the Role.
    pub verbs: Vec<String>,
    /// `resourceNames`: the only objects the rule covers; empty for all.
    pub names: Vec<String>,
}

impl Rule {
    fn grants(&self, permission: &Permission, namespace: Option<&str>, name: Option<&str>) -> bool {
        let any = |list: &[String], value: &str| list.iter().any(|v| v == "*" || v == value);
        self.namespace.as_deref().is_none_or(|own| namespace == Some(own))
            && (self.names.is_empty() || name.is_some_and(|name| self.names.iter().any(|n| n == name)))
            && any(&self.groups, &permission.group)
            && any(&self.resources, &permission.resource)
            && any(&self.verbs, &permission.verb)
    }
}

/// The rules one client holds, and what it used of them.
#[derive(Debug)]
pub struct Rbac {
    /// The client's User-Agent, exactly.
    pub agent: String,
    /// Who the client is in `Forbidden` messages, e.g. `system:serviceaccount:ns:name`.
    pub user: String,
    rules: Vec<Rule>,
    used: Mutex<BTreeSet<Permission>>,
}

impl Rbac {
    /// Enforces `rules` on requests whose User-Agent is `agent`.
    pub fn new(agent: impl Into<String>, user: impl Into<String>, rules: Vec<Rule>) -> Rbac {
        Rbac { agent: agent.into(), user: user.into(), rules, used: Mutex::default() }
    }

    /// Every permission an allowed request of the client needed so far.
    pub fn used(&self) -> BTreeSet<Permission> {
        self.used.lock().clone()
    }

    /// Allows or refuses one request; `creates` says it is a server-side apply of an object that
    /// is not there yet.
    pub(super) fn check(&self, agent: &str, method: &Method, q: &str, t: &Target, creates: bool) -> Result<(), Status> {
        if agent != self.agent {
            return Ok(());
        }
        let namespace = t.namespace.as_deref();
        let needed: Vec<Permission> = verbs(method, q, t, creates)
            .into_iter()
            .map(|verb| Permission {
                group: t.resource.group.to_owned(),
                resource: resource_name(t),
                verb: verb.to_owned(),
            })
            .collect();
        for permission in &needed {
            if !self.rules.iter().any(|r| r.grants(permission, namespace, t.name.as_deref())) {
                let group = &permission.group;
                let scope = namespace
                    .map_or_else(|| "at the cluster scope".to_owned(), |ns| format!("in the namespace \"{ns}\""));
                return Err(Status::refused(
                    403,
                    "Forbidden",
                    format!(
                        "{}{} is forbidden: User \"{}\" cannot {} resource \"{}\" in API group \"{group}\" {scope}",
                        permission.resource,
                        t.name.as_deref().map(|n| format!(" \"{n}\"")).unwrap_or_default(),
                        self.user,
                        permission.verb,
                        permission.resource,
                    ),
                ));
            }
        }
        self.used.lock().extend(needed);
        Ok(())
    }
}

fn resource_name(t: &Target) -> String {
    let sub = if t.scale {
        "/scale"
    } else if t.part == super::store::Part::Status {
        "/status"
    } else {
        ""
    };
    format!("{}{sub}", t.resource.plural)
}

/// The verbs a request needs, as the API server's request-info resolver names them.
fn verbs(method: &Method, q: &str, t: &Target, creates: bool) -> Vec<&'static str> {
    match (method, t.name.is_some()) {
        (&Method::GET, false) if query(q, "watch").is_some_and(|w| w == "true" || w == "1") => vec!["watch"],
        (&Method::GET, false) => vec!["list"],
        (&Method::GET, true) => vec!["get"],
        (&Method::POST, _) => vec!["create"],
        (&Method::PUT, _) => vec!["update"],
        (&Method::PATCH, _) if creates => vec!["patch", "create"],
        (&Method::PATCH, _) => vec!["patch"],
        (&Method::DELETE, true) => vec!["delete"],
        (&Method::DELETE, false) => vec!["deletecollection"],
        _ => vec!["unknown"],
    }
}
