//! Part 1, operator cost at scale: many autoscaled pools on a fake-mode kubelet, the release
//! operator as a child process; time until every pool is Ready, then its CPU, API requests and
//! memory over a steady-state window.
//!
//! Fake pods are Ready at once but run nothing, so every SLA read of the collector is refused at
//! connect (the pod counts as silent): the loop's HTTP cost here is a refused connection per pod
//! per tick, cheaper than a real read.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use inferpool_tests::apiserver::resources;
use inferpool_tests::apiserver::{ApiServer, store::Store};
use inferpool_tests::kubelet::{Kubelet, Mode};
use kube::api::PostParams;
use kube::{Api, Client, Config};
use serde_json::{Value, json};

use crate::Args;
use crate::support::{self, ApiCounter, NS, OperatorProcess};

/// Pools whose Ready condition is True, of those named `scale-*`.
fn ready_pools(store: &Store) -> anyhow::Result<(usize, usize)> {
    let resource =
        resources::find("inferpool.dev", "v1alpha1", "inferencepools").context("no InferencePool resource")?;
    let (pools, _) = store.list(resource, Some(NS), |_| true);
    let ready = pools.iter().filter(|p| support::condition(p, "Ready").as_deref() == Some("True")).count();
    Ok((ready, pools.len()))
}

fn count(store: &Store, group: &str, version: &str, plural: &str) -> usize {
    resources::find(group, version, plural).map_or(0, |r| store.list(r, Some(NS), |_| true).0.len())
}

/// One counter reading: CPU ticks, API requests, reconciles.
struct Reading {
    at: Instant,
    ticks: u64,
    api: std::collections::BTreeMap<String, u64>,
    reconciles: Option<f64>,
}

async fn read(op: &mut OperatorProcess, counter: &ApiCounter, http: &support::Http) -> anyhow::Result<Reading> {
    op.check_alive()?;
    let reconciles = support::get(http, &op.metrics_url, Duration::from_secs(2))
        .await
        .map(|(_, body)| support::metric_sum(&String::from_utf8_lossy(&body), "inferpool_operator_reconcile_total"));
    Ok(Reading { at: Instant::now(), ticks: support::cpu_ticks(op.pid)?, api: counter.snapshot(), reconciles })
}

/// Runs part 1 and returns its raw results.
pub async fn run(args: &Args, out: &Path, counter: &ApiCounter) -> anyhow::Result<Value> {
    let tck = support::clk_tck()? as f64;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server = ApiServer::start(listener)?;
    let store: Arc<Store> = Arc::clone(&server.store);
    let _kubelet = Kubelet::start(Arc::clone(&store), Mode::Fake)?;
    let kubeconfig = out.join("kubeconfig-scale");
    support::write_kubeconfig(&kubeconfig, &server.url())?;
    let client = Client::try_from(Config::new(server.url().parse()?))?;
    let pools: Api<inferpool_crds::InferencePool> = Api::namespaced(client, NS);
    let http = support::http();

    eprintln!("scale: starting {}", args.operator.display());
    let mut op = OperatorProcess::start(&args.operator, &kubeconfig, &out.join("operator-scale.log")).await?;
    let idle = read(&mut op, counter, &http).await?;

    eprintln!("scale: creating {} pools (intervalSeconds {})", args.pools, args.interval_seconds);
    let spec = json!({
        "replicas": {"min": 1},
        "autoscaling": {"enabled": true, "intervalSeconds": args.interval_seconds},
    });
    let start = read(&mut op, counter, &http).await?;
    for i in 0..args.pools {
        let pool: inferpool_crds::InferencePool = serde_json::from_value(json!({
            "apiVersion": "inferpool.dev/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": format!("scale-{i:03}"), "namespace": NS}, "spec": spec,
        }))?;
        pools.create(&PostParams::default(), &pool).await.with_context(|| format!("creating pool {i}"))?;
    }
    let created_s = start.at.elapsed().as_secs_f64();
    let deadline = Duration::from_secs(args.ready_timeout_seconds);
    loop {
        let (ready, total) = ready_pools(&store)?;
        if ready == args.pools {
            break;
        }
        if start.at.elapsed() > deadline {
            bail!("only {ready} of {total} pools were Ready after {deadline:?}");
        }
        op.check_alive()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = read(&mut op, counter, &http).await?;
    let ready_s = ready.at.duration_since(start.at).as_secs_f64();
    eprintln!("scale: all {} pools Ready after {ready_s:.2} s", args.pools);

    tokio::time::sleep(Duration::from_secs(args.settle_seconds)).await;
    eprintln!("scale: measuring {} s of steady state", args.steady_seconds);
    let first = read(&mut op, counter, &http).await?;
    let mut samples = Vec::new();
    let mut last = read(&mut op, counter, &http).await?;
    let sample_every = Duration::from_secs(5);
    while last.at.duration_since(first.at) + Duration::from_millis(1) < Duration::from_secs(args.steady_seconds) {
        let left = Duration::from_secs(args.steady_seconds).saturating_sub(last.at.duration_since(first.at));
        tokio::time::sleep(left.min(sample_every)).await;
        let now = read(&mut op, counter, &http).await?;
        let (requests, _) = support::api_delta(&last.api, &now.api);
        let seconds = now.at.duration_since(last.at).as_secs_f64();
        samples.push(json!({
            "t_s": now.at.duration_since(first.at).as_secs_f64(),
            "cpu_s": (now.ticks - last.ticks) as f64 / tck,
            "seconds": seconds,
            "api_requests": requests,
        }));
        last = now;
    }
    let window_s = last.at.duration_since(first.at).as_secs_f64();
    let cpu_s = (last.ticks - first.ticks) as f64 / tck;
    let (api_requests, api_by) = support::api_delta(&first.api, &last.api);
    let (ramp_requests, ramp_by) = support::api_delta(&start.api, &ready.api);
    let (idle_requests, _) = support::api_delta(&idle.api, &start.api);
    let rss = support::status_bytes(op.pid, "VmRSS")?;
    let hwm = support::status_bytes(op.pid, "VmHWM")?;
    let pods = count(&store, "", "v1", "pods");
    let deployments = count(&store, "apps", "v1", "deployments");
    op.stop().await;

    let reconciles = match (first.reconciles, last.reconciles) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let ramp_reconciles = match (start.reconciles, ready.reconciles) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let result = json!({
        "pools": args.pools,
        "interval_seconds": args.interval_seconds,
        "settle_seconds": args.settle_seconds,
        "clk_tck": tck,
        "create_s": created_s,
        "all_ready_s": ready_s,
        "ramp": {
            "cpu_s": (ready.ticks - start.ticks) as f64 / tck,
            // The benchmark's own client made one POST per pool; the rest is the operator's.
            "api_requests_total": ramp_requests,
            "api_requests_operator": ramp_requests.saturating_sub(args.pools as u64),
            "api_by": ramp_by,
            "reconciles": ramp_reconciles,
        },
        "idle_before_pools_api_requests": idle_requests,
        "steady": {
            "window_s": window_s,
            "cpu_s": cpu_s,
            "api_requests": api_requests,
            "api_by": api_by,
            "reconciles": reconciles,
            "samples": samples,
        },
        "rss_bytes": rss,
        "hwm_bytes": hwm,
        "pods": pods,
        "deployments": deployments,
    });
    support::write_json(&out.join("scale.json"), &result)?;
    Ok(result)
}
