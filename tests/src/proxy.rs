//! A Service proxy: one local port forwards each TCP connection to the next ready endpoint of a
//! Service (round robin over its EndpointSlice), so a user of `inferpool-local` can call a pool as
//! a client inside the cluster would. Connections are forwarded byte for byte.
//!
//! Like kube-proxy it acts on EndpointSlice changes after a delay ([`PROPAGATION`]): the watch,
//! the sync period and the rule update take about a second in a cluster, and during that time new
//! connections still reach a pod that was just deleted. A pod that stops accepting at once would
//! refuse them, which is what the sidecar's drain delay is for; with the delay modelled, a rollout
//! test here can fail for the same reason one in a cluster would.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::apiserver::resources;
use crate::apiserver::store::{Key, Store};

/// How long after an EndpointSlice change the proxy routes by it.
pub const PROPAGATION: Duration = Duration::from_secs(1);

/// An endpoint: pod IP and port.
type Endpoint = (String, u16);

/// Ready endpoints (ip, port) of `namespace/service` now, from its EndpointSlice.
pub fn endpoints(store: &Store, namespace: &str, service: &str) -> Vec<Endpoint> {
    let Some(slices) = resources::find("discovery.k8s.io", "v1", "endpointslices") else { return Vec::new() };
    let Ok(slice) = store.get(&Key { resource: slices, namespace: namespace.to_owned(), name: service.to_owned() })
    else {
        return Vec::new();
    };
    let port = slice.pointer("/ports/0/port").and_then(Value::as_u64).and_then(|p| u16::try_from(p).ok()).unwrap_or(80);
    slice
        .get("endpoints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|e| e.pointer("/conditions/ready").and_then(Value::as_bool) == Some(true))
        .filter_map(|e| Some((e.pointer("/addresses/0")?.as_str()?.to_owned(), port)))
        .collect()
}

/// Forwards connections accepted on `listener` to `namespace/service`, acting on endpoint changes
/// after [`PROPAGATION`], until the task is dropped.
pub async fn serve(listener: TcpListener, store: Arc<Store>, namespace: String, service: String) {
    serve_with(listener, store, namespace, service, PROPAGATION).await;
}

/// [`serve`] with another propagation delay (zero: every connection sees the current endpoints).
pub async fn serve_with(listener: TcpListener, store: Arc<Store>, namespace: String, service: String, delay: Duration) {
    let view = Arc::new(Mutex::new(endpoints(&store, &namespace, &service)));
    // Dropped with this future, which stops the tasks that keep the view.
    let mut tasks = JoinSet::new();
    let (changes, mut pending) = mpsc::unbounded_channel::<(Instant, Vec<Endpoint>)>();
    let applied = Arc::clone(&view);
    tasks.spawn(async move {
        while let Some((at, endpoints)) = pending.recv().await {
            tokio::time::sleep_until(at + delay).await;
            *applied.lock() = endpoints;
        }
    });
    let (watched, name) = (Arc::clone(&store), (namespace.clone(), service.clone()));
    tasks.spawn(async move {
        let mut events = watched.subscribe();
        loop {
            match events.recv().await {
                Ok(e)
                    if e.key.resource.kind == "EndpointSlice"
                        && (&e.key.namespace, &e.key.name) == (&name.0, &name.1) => {}
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
            let _ = changes.send((Instant::now(), endpoints(&watched, &name.0, &name.1)));
        }
    });
    let next = AtomicUsize::new(0);
    loop {
        let Ok((mut client, _)) = listener.accept().await else { continue };
        let ready = view.lock().clone();
        if ready.is_empty() {
            tracing::warn!(service = %format!("{namespace}/{service}"), "no ready endpoint; connection closed");
            continue;
        }
        let (ip, port) = ready[next.fetch_add(1, Ordering::Relaxed) % ready.len()].clone();
        tokio::spawn(async move {
            if let Ok(mut upstream) = TcpStream::connect((ip.as_str(), port)).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
        });
    }
}
