//! A real `redis-server` (the Debian package, on PATH) on a free loopback port, for tests of the
//! Redis cache tier, plus a raw RESP client to look inside it without `redis-cli`.
//!
//! The server runs without persistence (`--save "" --appendonly no`), so a restart starts empty,
//! and takes `DEBUG` commands from loopback clients (to make it slow on purpose).
//! Readiness is the server's own "Ready to accept connections" log line, read from its stdout;
//! afterwards a thread keeps draining stdout so the server never blocks on a full pipe.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running (or deliberately killed or paused) `redis-server`.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    password: Option<String>,
    tls: Option<Tls>,
}

/// Certificate and key for a TLS-only server.
#[derive(Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl RedisServer {
    /// Starts a server on a free port.
    pub fn start() -> RedisServer {
        Self::start_with(None, None)
    }

    /// Starts a server that requires `password`.
    pub fn start_with_password(password: &str) -> RedisServer {
        Self::start_with(Some(password.to_string()), None)
    }

    /// Starts a server that speaks only TLS, with the given certificate and key.
    pub fn start_tls(tls: Tls) -> RedisServer {
        Self::start_with(None, Some(tls))
    }

    /// Starts a server on `port` (e.g. one a client was already told to use).
    pub fn start_on(port: u16) -> RedisServer {
        let mut server = RedisServer { child: None, port, password: None, tls: None };
        server.spawn().unwrap_or_else(|log| panic!("redis-server on port {port} did not start:\n{log}"));
        server
    }

    fn start_with(password: Option<String>, tls: Option<Tls>) -> RedisServer {
        // Another process may take the free port between the probe and the bind: try a few.
        let mut last = String::new();
        for _ in 0..5 {
            let mut server =
                RedisServer { child: None, port: free_port(), password: password.clone(), tls: tls.clone() };
            match server.spawn() {
                Ok(()) => return server,
                Err(log) => last = log,
            }
        }
        panic!("redis-server did not start:\n{last}");
    }

    /// Starts the process and waits for its ready line; on failure returns what it logged.
    fn spawn(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        // DEBUG (e.g. `DEBUG SLEEP`, to make the server slow) only from loopback clients.
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--enable-debug-command", "local"])
            .arg("--dir")
            .arg(std::env::temp_dir());
        match &self.tls {
            None => cmd.args(["--port", &port]),
            Some(tls) => cmd
                .args(["--port", "0", "--tls-port", &port, "--tls-auth-clients", "no", "--tls-cert-file"])
                .arg(&tls.cert)
                .arg("--tls-key-file")
                .arg(&tls.key),
        };
        if let Some(password) = &self.password {
            cmd.args(["--requirepass", password]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot run redis-server: is the redis-server package installed?");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut log = String::new();
        let ready = loop {
            let mut line = String::new();
            match lines.read_line(&mut line) {
                Ok(0) | Err(_) => break false,
                Ok(_) if line.contains("Ready to accept connections") => break true,
                Ok(_) => log.push_str(&line),
            }
        };
        if !ready {
            let _ = child.kill();
            let _ = child.wait();
            return Err(log);
        }
        std::thread::spawn(move || std::io::copy(&mut lines, &mut std::io::sink()));
        self.child = Some(child);
        Ok(())
    }

    /// The port it listens on (TLS-only servers: the TLS port).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/0` (`rediss://localhost:PORT/0` for TLS), without the password.
    pub fn url(&self) -> String {
        match self.tls {
            None => format!("redis://127.0.0.1:{}/0", self.port),
            Some(_) => format!("rediss://localhost:{}/0", self.port),
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, and waits until the process is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server (if running) and starts a fresh, empty one on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port;
        self.spawn().unwrap_or_else(|log| panic!("redis-server did not restart on port {port}:\n{log}"));
    }

    /// SIGSTOP: the server keeps its sockets but answers nothing until [`RedisServer::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`RedisServer::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid().expect("redis-server is not running").to_string();
        let status = Command::new("kill").args([signal, &pid]).status().expect("cannot run kill");
        assert!(status.success(), "kill {signal} {pid}: {status}");
    }

    /// Sends one command (authenticating first when the server has a password) and renders the
    /// reply; see [`redis_cli`]. Plain-TCP servers only.
    pub fn cli(&self, args: &[&str]) -> String {
        assert!(self.tls.is_none(), "the raw client does not speak TLS");
        let mut conn = Resp::connect(self.port);
        if let Some(password) = &self.password {
            let ok = conn.command(&["AUTH", password]);
            assert_eq!(ok, "OK", "AUTH failed");
        }
        conn.command(args)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port that was free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("cannot bind a loopback port").port()
}

/// Sends one command to the server on `port` and renders its reply: simple strings, bulk strings
/// (lossy UTF-8) and integers as text, nil as `(nil)`, errors as `(error) ...`, arrays one element
/// per line.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    Resp::connect(port).command(args)
}

/// A minimal RESP2 client over a blocking socket.
struct Resp {
    reader: BufReader<TcpStream>,
}

impl Resp {
    fn connect(port: u16) -> Resp {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("cannot connect to redis-server");
        stream.set_read_timeout(Some(Duration::from_secs(5))).expect("set_read_timeout");
        Resp { reader: BufReader::new(stream) }
    }

    fn command(&mut self, args: &[&str]) -> String {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            out.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
        }
        self.reader.get_mut().write_all(&out).expect("write to redis-server");
        self.reply()
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read from redis-server");
        assert!(line.ends_with("\r\n"), "truncated reply: {line:?}");
        line.truncate(line.len() - 2);
        line
    }

    fn reply(&mut self) -> String {
        let line = self.line();
        let (kind, rest) = line.split_at(1);
        match kind {
            "+" | ":" => rest.to_string(),
            "-" => format!("(error) {rest}"),
            "$" if rest == "-1" => "(nil)".to_string(),
            "$" => {
                let len: usize = rest.parse().expect("bulk length");
                let mut buf = vec![0; len + 2];
                self.reader.read_exact(&mut buf).expect("read bulk string");
                buf.truncate(len);
                String::from_utf8_lossy(&buf).into_owned()
            }
            "*" if rest == "-1" => "(nil)".to_string(),
            "*" => {
                let len: usize = rest.parse().expect("array length");
                (0..len).map(|_| self.reply()).collect::<Vec<_>>().join("\n")
            }
            _ => panic!("unexpected RESP reply {line:?}"),
        }
    }
}

/// Writes a private CA and a `localhost` / 127.0.0.1 certificate signed by it into `dir` with
/// `openssl`; returns the server's certificate and key, and the CA's certificate (PEM) for clients
/// to trust. `None` when openssl is missing or fails.
pub fn make_tls_files(dir: &Path) -> Option<(Tls, PathBuf)> {
    let run = |args: &[&str]| {
        Command::new("openssl").args(args).current_dir(dir).stdout(Stdio::null()).stderr(Stdio::null()).status()
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let steps: [Vec<&str>; 3] =
        [
            [
                &[
                    "req",
                    "-x509",
                    "-days",
                    "1",
                    "-subj",
                    "/CN=inferpool test CA",
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                ][..],
                &ec,
            ]
            .concat(),
            [&["req", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr"][..], &ec].concat(),
            vec![
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                "ext.cnf",
                "-out",
                "server.pem",
            ],
        ];
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").ok()?;
    for step in &steps {
        if !run(step).ok()?.success() {
            return None;
        }
    }
    Some((Tls { cert: dir.join("server.pem"), key: dir.join("server.key") }, dir.join("ca.pem")))
}
