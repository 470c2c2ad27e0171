//! The `inferpool-sidecar` binary as a pod runs it, with its JSON log lines: for tests of exit
//! codes, signals and faults that need a process of its own.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::card;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_inferpool-sidecar");

/// A sidecar process with its JSON log lines.
pub struct Proc {
    pub child: Child,
    logs: mpsc::UnboundedReceiver<Value>,
    /// The data directory it gets unless the test names one: state never leaks between runs.
    _data: tempfile::TempDir,
}

impl Proc {
    /// Starts the binary configured only through the environment.
    pub fn spawn(env: &[(&str, &str)]) -> Proc {
        Self::run(Command::new(BIN), env)
    }

    /// Starts the binary as the last argument of `wrapper` (absolute paths: the environment is
    /// cleared), e.g. a shell that prepares a mount first and then `exec`s it.
    pub fn spawn_under(wrapper: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(wrapper[0]);
        cmd.args(&wrapper[1..]).arg(BIN);
        Self::run(cmd, env)
    }

    fn run(mut cmd: Command, env: &[(&str, &str)]) -> Proc {
        let data = tempfile::tempdir().unwrap();
        cmd.env_clear()
            .env("INFERPOOL_MODEL", card())
            .env("INFERPOOL_DATA_DIR", data.path())
            .env("INFERPOOL_LISTEN", "127.0.0.1:0")
            .env("INFERPOOL_ADMIN_LISTEN", "127.0.0.1:0")
            .env("INFERPOOL_LOG_FORMAT", "json")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (tx, logs) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        Proc { child, logs, _data: data }
    }

    /// The log lines received so far and not yet consumed, rendered as JSON text.
    pub fn logged(&mut self) -> String {
        let mut out = String::new();
        while let Ok(v) = self.logs.try_recv() {
            out.push_str(&v.to_string());
        }
        out
    }

    /// Waits for the log line whose message starts with `prefix`.
    pub async fn wait_log(&mut self, prefix: &str) -> Value {
        let wait = async {
            loop {
                let v = self.logs.recv().await.expect("the sidecar exited");
                if v["fields"]["message"].as_str().is_some_and(|m| m.starts_with(prefix)) {
                    return v;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), wait).await.unwrap()
    }

    /// Waits until ready; returns the API base URL.
    pub async fn ready(&mut self) -> String {
        let listening = self.wait_log("listening").await;
        let api = listening["fields"]["api"].as_str().unwrap().to_owned();
        self.wait_log("ready").await;
        format!("http://{api}")
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        assert!(std::process::Command::new("kill").args([sig, &pid]).status().unwrap().success());
    }
}
