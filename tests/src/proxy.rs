//! A Service proxy: one local port forwards each TCP connection to the next ready endpoint of a
//! Service (round robin over its EndpointSlice), so a user of `inferpool-local` can call a pool as
//! a client inside the cluster would. Connections are forwarded byte for byte.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

use crate::apiserver::resources;
use crate::apiserver::store::{Key, Store};

/// Ready endpoints (ip, port) of `namespace/service` now, from its EndpointSlice.
pub fn endpoints(store: &Store, namespace: &str, service: &str) -> Vec<(String, u16)> {
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

/// Forwards connections accepted on `listener` to `namespace/service` until the task is dropped.
pub async fn serve(listener: TcpListener, store: Arc<Store>, namespace: String, service: String) {
    let next = AtomicUsize::new(0);
    loop {
        let Ok((mut client, _)) = listener.accept().await else { continue };
        let ready = endpoints(&store, &namespace, &service);
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
