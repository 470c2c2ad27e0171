//! The stop signal every binary waits for.

/// Completes on SIGTERM (what Kubernetes sends) or SIGINT (Ctrl-C), logging which.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; only Ctrl-C stops the process");
            if let Err(error) = tokio::signal::ctrl_c().await {
                tracing::warn!(%error, "cannot watch SIGINT either");
                std::future::pending::<()>().await;
            }
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
