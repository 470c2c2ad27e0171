//! A listener whose accept fails with EMFILE waits instead of spinning, and serves again once
//! descriptors are free.
//!
//! The server runs in a child process with a low descriptor limit: this test binary executed
//! again (`--exact` this test) through `sh -c 'ulimit -n ..; exec ..'`, told by an environment
//! variable to be the server. It prints its port and serves until killed. The parent opens
//! connections until one is not answered while the child holds all its descriptors (its accept now
//! fails), holds them, reads the child's CPU time from /proc, then closes them and expects a new
//! connection to be answered.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use inferpool_serve::{Options, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Set in the child: serve instead of testing.
const ROLE: &str = "INFERPOOL_SERVE_TEST_CHILD";
/// The child's descriptor limit: low enough to reach in a few dozen connections.
const NOFILE: u32 = 64;
/// How long the parent keeps the child out of descriptors.
const HOLD: Duration = Duration::from_millis(1500);
/// CPU the child may use over [`HOLD`]; an accept loop spinning on EMFILE uses about all of it.
const CPU_ALLOWED: Duration = Duration::from_millis(300);

#[test]
fn accept_failing_with_emfile_backs_off_and_recovers() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    if std::env::var_os(ROLE).is_some() {
        runtime.block_on(child_server());
        return;
    }
    let mut child = spawn_child("accept_failing_with_emfile_backs_off_and_recovers");
    let port = read_port(&mut child);
    let outcome = runtime.block_on(exhaust_hold_and_recover(port, child.id()));
    let _ = child.kill();
    let _ = child.wait();
    outcome.unwrap();
}

async fn child_server() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("PORT {}", listener.local_addr().unwrap().port());
    let service = |_| {
        hyper::service::service_fn(|_request| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        })
    };
    serve(listener, service, std::future::pending(), &Options::default()).await;
}

fn spawn_child(test: &str) -> Child {
    let exe = std::env::current_exe().unwrap();
    Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {NOFILE} && exec \"$0\" \"$@\""))
        .arg(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(ROLE, "1")
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn read_port(child: &mut Child) -> u16 {
    let stdout = child.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines() {
        // The test harness may have written `test <name> ... ` on the same line first.
        if let Some((_, port)) = line.unwrap().split_once("PORT ") {
            return port.trim().parse().unwrap();
        }
    }
    panic!("the child server exited without printing its port");
}

/// One GET on a fresh connection; the connection stays open for the caller. `None` when no
/// answer came within `wait`.
async fn answered(port: u16, wait: Duration) -> (TcpStream, Option<String>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n").await.unwrap();
    let mut buffer = [0u8; 256];
    let read = tokio::time::timeout(wait, stream.read(&mut buffer)).await;
    let answer = match read {
        Ok(Ok(n)) if n > 0 => Some(String::from_utf8_lossy(&buffer[..n]).into_owned()),
        _ => None,
    };
    (stream, answer)
}

/// How many descriptors the child holds.
fn open_descriptors(pid: u32) -> usize {
    procfs::process::Process::new(i32::try_from(pid).unwrap()).unwrap().fd_count().unwrap()
}

/// The child's user plus system CPU time so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = procfs::process::Process::new(i32::try_from(pid).unwrap()).unwrap().stat().unwrap();
    let ticks = stat.utime + stat.stime;
    Duration::from_secs_f64(ticks as f64 / procfs::ticks_per_second() as f64)
}

async fn exhaust_hold_and_recover(port: u16, pid: u32) -> Result<(), String> {
    let mut held = Vec::new();
    loop {
        let (stream, answer) = answered(port, Duration::from_millis(500)).await;
        held.push(stream);
        match answer {
            Some(answer) if answer.starts_with("HTTP/1.1 200") => {}
            Some(other) => return Err(format!("unexpected answer: {other:?}")),
            // Unanswered because the child is out of descriptors, not merely slow.
            None if open_descriptors(pid) >= NOFILE as usize => break,
            None => {}
        }
        if held.len() > 4 * NOFILE as usize {
            return Err(format!("{} connections were all answered under a limit of {NOFILE}", held.len()));
        }
    }
    let before = cpu_time(pid);
    tokio::time::sleep(HOLD).await;
    let used = cpu_time(pid) - before;
    if used > CPU_ALLOWED {
        return Err(format!("the child used {used:?} of CPU in {HOLD:?} while out of descriptors"));
    }
    drop(held);
    let (_stream, answer) = answered(port, Duration::from_secs(5)).await;
    match answer {
        Some(answer) if answer.starts_with("HTTP/1.1 200") => Ok(()),
        other => Err(format!("no answer after the descriptors were freed: {other:?}")),
    }
}
