//! inferpool's one way to serve HTTP.
//!
//! Every listener in the project (the operator's `/healthz`, `/readyz` and `/metrics`, the sidecar's
//! public API and admin listener, the local control plane's API server double) runs [`serve`]: a
//! bound listener, a service per connection, a shutdown future and [`Options`]. It accepts until
//! the shutdown future completes, then lets the open connections finish (graceful shutdown).
//!
//! A failed accept (out of file descriptors, `EMFILE`, is the usual one) leaves the pending
//! connection in the kernel's queue, so retrying at once fails again at once: the loop would spin
//! on a core while the process cannot serve. [`serve`] waits instead, exponentially longer (with
//! jitter, capped) after each consecutive failure, logs one warning per wait, and starts over from
//! the shortest wait after the next accept that succeeds.
//!
//! [`shutdown_signal`] and [`init_logging`] are the other two things every binary's `main` needs.

mod logging;
mod signal;

use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

pub use logging::{LogFormat, init_logging};
pub use signal::shutdown_signal;

/// How a listener serves its connections.
#[derive(Debug, Clone)]
pub struct Options {
    /// Longest an HTTP/1 client may take to send a request's headers (None: no limit).
    pub header_read_timeout: Option<Duration>,
    /// Sets TCP_NODELAY on every accepted connection (small responses leave at once).
    pub nodelay: bool,
    /// Longest the open connections may take to finish after shutdown (None: as long as they need).
    pub grace: Option<Duration>,
    /// The wait after the first failed accept in a row; it doubles with each further failure.
    pub accept_backoff_min: Duration,
    /// The longest wait between failed accepts, before jitter (which adds up to as much again).
    pub accept_backoff_max: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            header_read_timeout: None,
            nodelay: false,
            grace: None,
            accept_backoff_min: Duration::from_millis(5),
            accept_backoff_max: Duration::from_millis(500),
        }
    }
}

impl Options {
    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.accept_backoff_min)
            .with_max_delay(self.accept_backoff_max)
            .with_jitter()
            .without_max_times()
    }
}

/// What [`serve`] did, for the caller's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Every connection finished within the grace period.
    Drained,
    /// The grace period ran out with connections still open; they were dropped.
    GraceExpired,
}

/// Serves HTTP/1 and HTTP/2 on `listener` until `shutdown` completes, then drains.
///
/// `make_service` is called once per accepted connection with the peer's address.
pub async fn serve<M, S, B>(
    listener: TcpListener,
    mut make_service: M,
    shutdown: impl Future<Output = ()>,
    options: &Options,
) -> Stopped
where
    M: FnMut(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if let Some(timeout) = options.header_read_timeout {
        builder.http1().timer(TokioTimer::new()).header_read_timeout(timeout);
    }
    let graceful = GracefulShutdown::new();
    let backoff = options.backoff();
    let mut delays = backoff.build();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(connection) => {
                delays = backoff.build();
                connection
            }
            Err(error) => {
                // `without_max_times` makes the iterator endless; the fallback is never used.
                let delay = delays.next().unwrap_or(options.accept_backoff_max);
                tracing::warn!(%error, retry_in_ms = delay.as_millis(), "accept failed; waiting before the next try");
                tokio::select! {
                    () = tokio::time::sleep(delay) => continue,
                    () = &mut shutdown => break,
                }
            }
        };
        if options.nodelay
            && let Err(error) = stream.set_nodelay(true)
        {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let connection = builder.serve_connection(TokioIo::new(stream), make_service(peer)).into_owned();
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = watched.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    match options.grace {
        None => {
            graceful.shutdown().await;
            Stopped::Drained
        }
        Some(grace) => match tokio::time::timeout(grace, graceful.shutdown()).await {
            Ok(()) => Stopped::Drained,
            Err(_) => Stopped::GraceExpired,
        },
    }
}
