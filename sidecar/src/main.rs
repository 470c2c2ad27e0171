//! `inferpool-sidecar`: parse the configuration, bind the listeners, serve until SIGTERM/SIGINT.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use inferpool_sidecar::config::{Args, EXIT_CONFIG, LogFormat};
use tokio::net::{TcpListener, TcpSocket};

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("inferpool-sidecar: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    init_logging(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("inferpool-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("inferpool-sidecar: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: inferpool_sidecar::Config) -> anyhow::Result<()> {
    let listener = listen(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
    let admin =
        listen(config.admin_listen).with_context(|| format!("cannot listen on {} (admin)", config.admin_listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(api = %addr, admin = %admin.local_addr()?, model = %config.model.display(), "listening; the model loads in the background (GET /readyz)");
    tracing::info!(
        "try: curl -s -H 'Content-Type: image/jpeg' --data-binary @photo.jpg http://{addr}/api/v1/embed | head -c 300"
    );
    inferpool_sidecar::run(listener, admin, config, inferpool_serve::shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Binds with a deep accept backlog: a burst of new connections (a client pool opening at once)
/// must wait in the kernel rather than be refused. The kernel caps it at net.core.somaxconn.
fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

fn init_logging(format: LogFormat) {
    let format = match format {
        LogFormat::Json => inferpool_serve::LogFormat::Json { flatten_event: false },
        LogFormat::Text => inferpool_serve::LogFormat::Text,
    };
    inferpool_serve::init_logging(format, "INFERPOOL_LOG", "info,ort=warn");
}
