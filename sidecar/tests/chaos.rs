//! Chaos under load with cache misses. Clients send many distinct images, so the model and the
//! shared tier are on the request path, while Redis is killed and restarted, Redis is made slow
//! (`DEBUG SLEEP`), and the disk cache turns read-only (immutable files) or fills up (a tiny
//! tmpfs in a mount namespace of the sidecar's own). Each scenario prints its counts and asserts
//! that every request was answered 200: a cache tier that fails costs time, never an answer.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::proc::Proc;
use common::redis::{RedisServer, redis_cli};
use common::*;
use http::Method;
use inferpool_sidecar::labels::{ErrorKind, Tier};
use parking_lot::Mutex;

/// `n` distinct small PNGs of one real photo (pixel (0,0) differs), numbered from `first`, so
/// each has its own cache key.
fn distinct_images(first: u32, n: u32) -> Arc<Vec<Bytes>> {
    let photo = decode(&photo("chelsea.png")).resize(128, 128, image::imageops::FilterType::Triangle).to_rgb8();
    let images = (first..first + n)
        .map(|i| {
            let mut copy = photo.clone();
            copy.put_pixel(0, 0, image::Rgb([(i % 256) as u8, (i / 256 % 256) as u8, 7]));
            Bytes::from(png(&image::DynamicImage::ImageRgb8(copy)))
        })
        .collect();
    Arc::new(images)
}

/// What a load answered: statuses, the tier named by each 200 (`cache` in the body), and
/// connections that failed.
#[derive(Default, Debug, Clone)]
struct Tally {
    statuses: BTreeMap<u16, u64>,
    answered_by: BTreeMap<String, u64>,
    transport_errors: u64,
    first_failures: Vec<String>,
}

impl Tally {
    fn answered(&self) -> u64 {
        self.statuses.values().sum()
    }

    fn by(&self, tier: &str) -> u64 {
        self.answered_by.get(tier).copied().unwrap_or(0)
    }

    /// Requests not answered 200.
    fn failed(&self) -> u64 {
        self.answered() - self.statuses.get(&200).copied().unwrap_or(0) + self.transport_errors
    }
}

/// `clients` concurrent clients, each POSTing the next image of the set (cycling) to
/// `/api/v1/embed` until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(base: &str, images: Arc<Vec<Bytes>>, clients: usize) -> Load {
        let (stop, tally, next) =
            (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Tally::default())), Arc::new(AtomicUsize::new(0)));
        let url = format!("{base}/api/v1/embed");
        let tasks = (0..clients)
            .map(|_| {
                let (stop, tally, next, images, url) =
                    (Arc::clone(&stop), Arc::clone(&tally), Arc::clone(&next), Arc::clone(&images), url.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let body = images[next.fetch_add(1, Ordering::Relaxed) % images.len()].clone();
                        let headers = [("content-type", "image/png"), ("x-deadline-ms", "20000")];
                        let reply = try_send(Method::POST, &url, &headers, body).await;
                        let mut t = tally.lock();
                        match reply {
                            Ok(r) => {
                                *t.statuses.entry(r.status.as_u16()).or_default() += 1;
                                if r.status == 200 {
                                    *t.answered_by
                                        .entry(r.json()["cache"].as_str().unwrap_or("?").to_owned())
                                        .or_default() += 1;
                                } else if t.first_failures.len() < 5 {
                                    t.first_failures.push(format!("{}: {}", r.status, r.text()));
                                }
                            }
                            Err(e) => {
                                t.transport_errors += 1;
                                if t.first_failures.len() < 5 {
                                    t.first_failures.push(e);
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Load { stop, tally, tasks }
    }

    fn now(&self) -> Tally {
        self.tally.lock().clone()
    }

    async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        self.tally.lock().clone()
    }
}

/// Polls `done` every 20 ms (counters have no event to await) until it holds, at most 60 s.
async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let wait = async {
        while !done().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), wait).await.unwrap_or_else(|_| panic!("timed out waiting: {what}"));
}

fn dbsize(port: u16) -> u64 {
    redis_cli(port, &["DBSIZE"]).trim().parse().unwrap_or(0)
}

fn assert_all_answered(scenario: &str, t: &Tally) {
    eprintln!(
        "{scenario}: {} requests, by status {:?}, 200s answered by {:?}, {} connection errors",
        t.answered() + t.transport_errors,
        t.statuses,
        t.answered_by,
        t.transport_errors
    );
    assert_eq!(t.failed(), 0, "{scenario}: every request is answered 200; first failures: {:?}", t.first_failures);
}

/// Redis, a sidecar on it whose memory tier holds 8 entries and that has no disk tier, and four
/// clients cycling through 48 images, once Redis answers lookups.
async fn loaded_through_redis() -> (RedisServer, Server, Load) {
    let redis = RedisServer::start();
    let s = Server::start(&["--redis-url", &redis.url(), "--memory-entries", "8", "--disk-mb", "0"]).await;
    let load = Load::start(&s.url(""), distinct_images(0, 48), 4);
    until("Redis answers lookups", async || load.now().by("redis") >= 20).await;
    (redis, s, load)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_killed_and_restarted_mid_load_costs_no_request() {
    let (mut redis, s, load) = loaded_through_redis().await;

    redis.kill();
    let at_kill = load.now();
    let errors = || {
        s.app.metrics.cache_errors(Tier::Redis, ErrorKind::Connection)
            + s.app.metrics.cache_errors(Tier::Redis, ErrorKind::Timeout)
    };
    until("answers while Redis is down", async || load.now().answered() >= at_kill.answered() + 40 && errors() > 0)
        .await;
    let during = load.now();

    redis.restart();
    until("writes reach the restarted Redis", async || dbsize(redis.port()) >= 8).await;
    until("hits from the restarted Redis", async || load.now().by("redis") > during.by("redis")).await;
    let t = load.stop().await;
    eprintln!(
        "Redis down: {} answered while it was gone ({} Redis errors counted)",
        during.answered() - at_kill.answered(),
        errors()
    );
    assert_all_answered("Redis killed and restarted under 48 distinct images", &t);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_costs_lookups_their_budget_and_no_request() {
    let (redis, s, load) = loaded_through_redis().await;

    // Back-to-back DEBUG SLEEP 0.2 for 3 s: every command waits up to 200 ms, ten times the
    // lookup budget (--redis-timeout-ms 20).
    let timeouts = || s.app.metrics.cache_errors(Tier::Redis, ErrorKind::Timeout);
    let (before, port) = (load.now(), redis.port());
    let slow = tokio::task::spawn_blocking(move || {
        let end = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < end {
            assert_eq!(redis_cli(port, &["DEBUG", "SLEEP", "0.2"]), "OK");
        }
    });
    slow.await.unwrap();
    let after_slow = load.now();
    assert!(timeouts() > 0, "lookups against the slow Redis time out and are counted");
    until("hits once Redis is fast again", async || load.now().by("redis") > after_slow.by("redis")).await;
    let t = load.stop().await;
    eprintln!(
        "Redis slow for 3 s: {} answered meanwhile, {} lookups timed out",
        after_slow.answered() - before.answered(),
        timeouts()
    );
    assert_all_answered("slow Redis under 48 distinct images", &t);
    s.stop().await;
}

/// Makes a directory tree immutable (`chattr +i`: even root can neither create, rename nor
/// delete in it) until dropped.
struct Immutable(PathBuf);

impl Immutable {
    fn set(dir: &Path) -> Immutable {
        chattr("+i", dir);
        Immutable(dir.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        chattr("-i", &self.0);
    }
}

fn chattr(flag: &str, dir: &Path) {
    let status = std::process::Command::new("chattr").args(["-R", flag]).arg(dir).status().expect("cannot run chattr");
    assert!(status.success(), "chattr -R {flag} {}: {status}", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_disk_cache_still_answers_from_what_it_holds_and_costs_no_request() {
    let data = tempfile::tempdir().unwrap();
    let s = Server::start_in(data.path(), &["--memory-entries", "8"]).await;
    let known = Load::start(&s.url(""), distinct_images(0, 48), 2);
    until("the disk tier answers", async || known.now().by("disk") >= 20).await;

    let read_only = Immutable::set(&data.path().join("cache"));
    let (hits_before, io_before) = (known.now().by("disk"), s.app.metrics.cache_errors(Tier::Disk, ErrorKind::Io));
    let fresh = Load::start(&s.url(""), distinct_images(1000, 48), 2);
    let io_errors = || s.app.metrics.cache_errors(Tier::Disk, ErrorKind::Io) - io_before;
    until("new entries fail to be written", async || io_errors() >= 10).await;
    until("old entries are still read", async || known.now().by("disk") >= hits_before + 20).await;
    let health = get(&s.url("/api/v1/health")).await.json();
    assert_eq!(health["components"]["diskCache"]["status"], "degraded", "{health}");
    assert_eq!(health["status"], "degraded", "a cache that cannot write degrades, never fails, the replica");
    let (known, fresh) = (known.stop().await, fresh.stop().await);
    drop(read_only);
    eprintln!("read-only disk cache: {} writes failed and were counted", io_errors());
    assert_all_answered("read-only disk cache, images it holds", &known);
    assert_all_answered("read-only disk cache, images it cannot store", &fresh);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_cache_costs_no_request() {
    // The sidecar runs in a mount namespace of its own with a 256 KiB tmpfs as its disk cache:
    // about 30 entries fill it, and every later write fails with ENOSPC.
    let data = tempfile::tempdir().unwrap();
    let cache = data.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let mount = r#"/bin/mount -t tmpfs -o size=256k inferpool-test-cache "$INFERPOOL_CACHE_DIR" && exec "$0""#;
    let mut p = Proc::spawn_under(
        &["/usr/bin/unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", mount],
        &[
            ("INFERPOOL_DATA_DIR", data.path().to_str().unwrap()),
            ("INFERPOOL_CACHE_DIR", cache.to_str().unwrap()),
            ("INFERPOOL_MEMORY_ENTRIES", "8"),
        ],
    );
    let base = p.ready().await;
    let load = Load::start(&base, distinct_images(0, 64), 4);
    let io_errors = || async {
        let metrics = get(&format!("{base}/metrics")).await.text();
        metric_with(&metrics, "inferpool_cache_errors_total", &[("tier", "disk"), ("kind", "io")])
    };
    until("the tmpfs fills and writes fail", async || io_errors().await >= 10.0 && load.now().by("disk") >= 10).await;
    let health = get(&format!("{base}/api/v1/health")).await.json();
    assert_eq!(health["components"]["diskCache"]["writesFailing"], true, "{health}");
    let t = load.stop().await;
    eprintln!("full disk cache: {} writes failed with the disk full", io_errors().await);
    assert_all_answered("full disk cache under 64 distinct images", &t);
    p.signal("-TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), p.child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0), "it still shuts down cleanly");
}
