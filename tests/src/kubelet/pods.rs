//! One task per pod in process mode, doing what a kubelet's pod worker does for its container:
//! resolve the environment (waiting, with `CreateContainerConfigError`, for a missing ConfigMap
//! or Secret to appear), start the sidecar, run the startup, readiness and liveness probes,
//! restart the process when it exits or fails its liveness probe (with a doubling, capped
//! back-off, `CrashLoopBackOff` while waiting) and report all of it in the pod's status.
//!
//! The task stops when its [`PodHandle`] is stopped or dropped: it kills and reaps the process
//! and removes the pod's directory (its emptyDir volumes with it).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use inferpool_crds::wire;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use super::env::{self, Source};
use super::probes::{Probe, Tracker, named_port};
use super::volumes::{self, Mount};
use super::{Options, main_container, str_at};
use crate::apiserver::resources;
use crate::apiserver::store::{Event, Key, Part, Store};

/// What a pod's task needs.
pub(crate) struct PodCtx {
    pub store: Arc<Store>,
    pub key: Key,
    pub pod: Value,
    pub ip: String,
    /// The pod's directory: its working directory and its emptyDir volumes.
    pub dir: PathBuf,
    /// Where claim directories live.
    pub claims: PathBuf,
    pub sidecar: PathBuf,
    /// `setpriv`, when found: it makes the kernel kill the sidecar when the kubelet dies.
    pub setpriv: Option<PathBuf>,
    pub options: Options,
}

/// What the pod's task is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Keep the container running.
    Run,
    /// The pod is being deleted: SIGTERM, SIGKILL after the grace period, then delete the pod.
    Terminate(Duration),
    /// Kill the process now (the pod is gone, or the kubelet stops).
    Kill,
}

/// A running pod task; stopping or dropping it stops the pod.
pub(crate) struct PodHandle {
    stop: watch::Sender<Stop>,
    task: tokio::task::JoinHandle<()>,
}

impl PodHandle {
    /// Starts the pod's task.
    pub fn start(ctx: PodCtx) -> PodHandle {
        let (stop, stopped) = watch::channel(Stop::Run);
        PodHandle { stop, task: tokio::spawn(supervise(ctx, stopped)) }
    }

    /// Starts the pod's graceful termination (once; later calls change nothing).
    pub fn terminate(&self, grace: Duration) {
        self.stop.send_if_modified(|s| {
            let start = *s == Stop::Run;
            if start {
                *s = Stop::Terminate(grace);
            }
            start
        });
    }

    /// Stops the pod and waits until its process is reaped and its directory removed.
    pub async fn stop(self) {
        let _ = self.stop.send(Stop::Kill);
        let _ = self.task.await;
    }
}

/// Resolves with what was asked once the task is asked to stop (Kill when the handle is gone).
async fn stopped(rx: &mut watch::Receiver<Stop>) -> Stop {
    match rx.wait_for(|stop| *stop != Stop::Run).await {
        Ok(stop) => *stop,
        Err(_) => Stop::Kill,
    }
}

/// Ends the pod's task: a terminated pod is deleted for good, and its directory is removed.
fn finish(ctx: &PodCtx, how: Stop) {
    if matches!(how, Stop::Terminate(_)) {
        let _ = ctx.store.delete_now(&ctx.key);
    }
    cleanup(ctx);
}

/// Sends SIGTERM to `child`, then kills it if it is still running after `grace`.
async fn terminate(child: &mut tokio::process::Child, grace: Duration, stop: &mut watch::Receiver<Stop>) {
    use rustix::process::{Pid, Signal, kill_process};
    let pid = child.id().and_then(|id| Pid::from_raw(i32::try_from(id).ok()?));
    if let Some(pid) = pid {
        let _ = kill_process(pid, Signal::TERM);
    }
    let killed = async {
        let _ = stop.wait_for(|s| *s == Stop::Kill).await;
    };
    tokio::select! {
        _ = tokio::time::timeout(grace, child.wait()) => {}
        () = killed => {}
    }
    let _ = child.kill().await;
}

/// What the pod's status says about its container.
#[derive(Debug, Clone)]
struct Report {
    started_once: bool,
    started: bool,
    ready: bool,
    restarts: u32,
    state: Value,
    last_state: Value,
}

impl Report {
    fn waiting(&mut self, reason: &str, message: String) {
        self.started = false;
        self.ready = false;
        self.state = json!({"waiting": {"reason": reason, "message": message}});
    }
}

fn write(ctx: &PodCtx, name: &str, image: &str, r: &Report) {
    let phase = if r.started_once { "Running" } else { "Pending" };
    let status = pod_status(
        &ctx.ip,
        phase,
        r.ready,
        json!([{
            "name": name,
            "image": image,
            "imageID": "",
            "ready": r.ready,
            "started": r.started,
            "restartCount": r.restarts,
            "state": r.state,
            "lastState": r.last_state,
        }]),
    );
    let _ = ctx.store.replace(&ctx.key, Part::Status, json!({ "status": status }), false);
}

/// Records a core/v1 Event about pod `key`, as the kubelet and the scheduler do (what `kubectl
/// describe pod` and `kubectl get events` show).
pub(crate) fn event(store: &Store, key: &Key, type_: &str, reason: &str, message: &str) {
    let Some(events) = resources::find("", "v1", "events") else { return };
    let now = crate::apiserver::store::now();
    let event = json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": format!("{}.", key.name), "namespace": key.namespace},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": key.namespace, "name": key.name},
        "type": type_, "reason": reason, "message": message,
        "source": {"component": "kubelet", "host": "127.0.0.1"},
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    });
    let _ = store.create(events, &key.namespace, event);
}

/// A pod's status with these container statuses.
pub(crate) fn pod_status(ip: &str, phase: &str, ready: bool, containers: Value) -> Value {
    let flag = if ready { "True" } else { "False" };
    json!({
        "phase": phase,
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "hostIP": "127.0.0.1",
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": flag},
            {"type": "Ready", "status": flag},
        ],
        "containerStatuses": containers,
    })
}

/// The data of ConfigMap or Secret `name` in `namespace`, if it exists.
fn lookup(store: &Store, namespace: &str, source: Source, name: &str) -> Option<BTreeMap<String, String>> {
    let resource = match source {
        Source::ConfigMap => resources::find("", "v1", "configmaps"),
        Source::Secret => resources::find("", "v1", "secrets"),
    }?;
    let object = store.get(&Key { resource, namespace: namespace.to_owned(), name: name.to_owned() }).ok()?;
    Some(env::data(source, &object))
}

/// Resolves when a ConfigMap or Secret in `namespace` changes (or events were missed).
async fn config_changed(events: &mut broadcast::Receiver<Arc<Event>>, namespace: &str) {
    loop {
        match events.recv().await {
            Ok(e) if matches!(e.key.resource.kind, "ConfigMap" | "Secret") && e.key.namespace == namespace => return,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => return,
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}

/// How a run of the process ended.
enum Ended {
    Exited(std::process::ExitStatus),
    Unhealthy(Option<std::process::ExitStatus>),
}

async fn supervise(ctx: PodCtx, mut stop: watch::Receiver<Stop>) {
    let container = main_container(&ctx.pod);
    let (name, image) = (str_at(&container, "/name").to_owned(), str_at(&container, "/image").to_owned());
    let mounts = volumes::mounts(&ctx.pod, &container, &ctx.dir, &ctx.claims);
    let mut report = Report {
        started_once: false,
        started: false,
        ready: false,
        restarts: 0,
        state: json!({"waiting": {"reason": "ContainerCreating"}}),
        last_state: json!({}),
    };
    let mut backoff = ctx.options.crash_backoff;
    loop {
        // The environment, resolved again before every start as a kubelet does.
        let env = loop {
            let mut changes = ctx.store.subscribe();
            let resolved =
                env::resolve(&ctx.pod, &ctx.ip, &container, |s, n| lookup(&ctx.store, &ctx.key.namespace, s, n));
            match resolved {
                Ok(env) => break env,
                Err(e) => {
                    report.waiting("CreateContainerConfigError", e.to_string());
                    write(&ctx, &name, &image, &report);
                    tokio::select! {
                        how = stopped(&mut stop) => return finish(&ctx, how),
                        () = config_changed(&mut changes, &ctx.key.namespace) => {}
                    }
                }
            }
        };
        let began = Instant::now();
        let ended = match spawn(&ctx, &container, &env, &mounts) {
            Err(e) => {
                // As a kubelet reports a container whose entrypoint cannot run: the start error in
                // the last state and an Event, then the usual back-off.
                let message = format!("cannot start {}: {e}", ctx.sidecar.display());
                tracing::warn!(pod = ctx.key.name, "{message}");
                report.restarts += 1;
                report.last_state =
                    json!({"terminated": {"exitCode": 128, "reason": "StartError", "message": message}});
                event(&ctx.store, &ctx.key, "Warning", "Failed", &format!("Error: {message}"));
                None
            }
            Ok(mut child) => {
                report.started_once = true;
                report.state = json!({"running": {}});
                report.started = container.get("startupProbe").is_none();
                report.ready = false;
                write(&ctx, &name, &image, &report);
                let ended = tokio::select! {
                    how = stopped(&mut stop) => {
                        match how {
                            Stop::Terminate(grace) => {
                                // Not ready from now on, as a kubelet reports a terminating pod.
                                report.ready = false;
                                write(&ctx, &name, &image, &report);
                                terminate(&mut child, grace, &mut stop).await;
                            }
                            _ => {
                                let _ = child.kill().await;
                            }
                        }
                        return finish(&ctx, how);
                    }
                    status = child.wait() => status.map(Ended::Exited).ok(),
                    () = probe(&ctx, &container, &name, &image, &mut report) => Some(Ended::Unhealthy(None)),
                };
                match ended {
                    Some(Ended::Unhealthy(_)) => {
                        let _ = child.start_kill();
                        Some(Ended::Unhealthy(child.wait().await.ok()))
                    }
                    other => other,
                }
            }
        };
        if let Some(ended) = ended {
            let (status, reason) = match ended {
                Ended::Exited(s) if s.success() => (Some(s), "Completed"),
                Ended::Exited(s) => (Some(s), "Error"),
                Ended::Unhealthy(s) => (s, "Error"),
            };
            let code = status.and_then(|s| s.code()).or_else(|| {
                use std::os::unix::process::ExitStatusExt;
                status.and_then(|s| s.signal()).map(|sig| 128 + sig)
            });
            report.restarts += 1;
            report.last_state = json!({"terminated": {"exitCode": code.unwrap_or(137), "reason": reason}});
            tracing::info!(pod = ctx.key.name, exit = ?code, reason, restarts = report.restarts, "container died");
        }
        // A container that ran well for a while starts over with the shortest back-off.
        if began.elapsed() >= ctx.options.crash_backoff_cap * 2 {
            backoff = ctx.options.crash_backoff;
        }
        let pod = &ctx.key.name;
        report
            .waiting("CrashLoopBackOff", format!("back-off {backoff:?} restarting failed container={name} pod={pod}"));
        write(&ctx, &name, &image, &report);
        tokio::select! {
            how = stopped(&mut stop) => return finish(&ctx, how),
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(ctx.options.crash_backoff_cap);
    }
}

/// Runs the container's probes, writing readiness as it changes; returns when the startup probe
/// or the liveness probe fails (the container must be restarted).
async fn probe(ctx: &PodCtx, container: &Value, name: &str, image: &str, report: &mut Report) {
    if let Some(startup) = Probe::parse(container, "startupProbe") {
        tokio::time::sleep(startup.initial_delay).await;
        let mut failures = 0;
        let mut tick = tokio::time::interval(startup.period);
        loop {
            tick.tick().await;
            if startup.check(&ctx.ip).await {
                break;
            }
            failures += 1;
            if failures >= startup.failure_threshold {
                tracing::info!(pod = ctx.key.name, "startup probe failed");
                return;
            }
        }
        report.started = true;
        write(ctx, name, image, report);
    }
    let readiness = Probe::parse(container, "readinessProbe").unwrap_or_else(|| Probe::default_readiness(container));
    let liveness = Probe::parse(container, "livenessProbe");
    let ready = async {
        tokio::time::sleep(readiness.initial_delay).await;
        let mut tracker = Tracker::new(false);
        let mut tick = tokio::time::interval(readiness.period);
        loop {
            tick.tick().await;
            let now = tracker.record(&readiness, readiness.check(&ctx.ip).await);
            if now != report.ready {
                report.ready = now;
                write(ctx, name, image, report);
            }
        }
    };
    let alive = async {
        let Some(liveness) = liveness else { return std::future::pending().await };
        tokio::time::sleep(liveness.initial_delay).await;
        let mut tracker = Tracker::new(true);
        let mut tick = tokio::time::interval(liveness.period);
        loop {
            tick.tick().await;
            if !tracker.record(&liveness, liveness.check(&ctx.ip).await) {
                tracing::info!(pod = ctx.key.name, path = liveness.path, "liveness probe failed; restarting");
                return;
            }
        }
    };
    tokio::select! {
        () = ready => {}
        () = alive => {}
    }
}

/// Starts the sidecar for `container` with `env`, paths under mounts moved to their directories,
/// listening on the pod's IP at its `http` and `admin` ports.
fn spawn(
    ctx: &PodCtx,
    container: &Value,
    env: &BTreeMap<String, String>,
    mounts: &[Mount],
) -> std::io::Result<tokio::process::Child> {
    // Checked here, not left to exec: through setpriv a missing binary is only exit status 127.
    if !ctx.sidecar.is_absolute() || !ctx.sidecar.is_file() {
        let why = if ctx.sidecar.is_absolute() { "no such file" } else { "the path is relative" };
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{why} (the sidecar binary, --sidecar-bin)"),
        ));
    }
    std::fs::create_dir_all(&ctx.dir)?;
    for m in mounts {
        std::fs::create_dir_all(&m.host)?;
    }
    let (http, admin) = (
        named_port(container, "http").unwrap_or(wire::API_PORT),
        named_port(container, "admin").unwrap_or(wire::ADMIN_PORT),
    );
    let mut cmd = match &ctx.setpriv {
        Some(setpriv) => {
            let mut c = tokio::process::Command::new(setpriv);
            c.args(["--pdeathsig", "KILL", "--"]).arg(&ctx.sidecar);
            c
        }
        None => tokio::process::Command::new(&ctx.sidecar),
    };
    for arg in container.get("args").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
        cmd.arg(volumes::rewrite(&env::expand(arg, |n| env.get(n).cloned()), mounts));
    }
    for (k, v) in env {
        cmd.env(k, volumes::rewrite(v, mounts));
    }
    let dir = match container.get("workingDir").and_then(Value::as_str) {
        Some(w) if !w.is_empty() => PathBuf::from(volumes::rewrite(w, mounts)),
        _ => ctx.dir.clone(),
    };
    // The container's log, as a kubelet keeps it: stdout and stderr appended to one file in the
    // pod's directory (restarts append), so sidecars do not flood the caller's terminal.
    let log_path = ctx.dir.join("sidecar.log");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    tracing::debug!(pod = %ctx.dir.display(), log = %log_path.display(), "starting sidecar");
    cmd.env("INFERPOOL_LISTEN", format!("{}:{http}", ctx.ip))
        .env("INFERPOOL_ADMIN_LISTEN", format!("{}:{admin}", ctx.ip))
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a terminal's Ctrl-C reaches the kubelet, which stops the pods.
        .process_group(0)
        .kill_on_drop(true);
    cmd.spawn()
}

/// Removes the pod's directory (its emptyDir volumes; claims live elsewhere).
fn cleanup(ctx: &PodCtx) {
    let _ = std::fs::remove_dir_all(&ctx.dir);
}
