//! Process signals.

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// From now on, calls `on_hangup` for every SIGHUP (the proxy reloads its
/// configuration) and logs and otherwise ignores SIGUSR1 and SIGUSR2, whose
/// default action would end the process. The handlers are installed before
/// this returns; the loops run on the current tokio runtime.
pub fn handle_reload_signals<F>(on_hangup: F) -> std::io::Result<()>
where
    F: Fn() + Send + 'static,
{
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP received: reloading the configuration");
                on_hangup();
            }
        });
        for (kind, name) in [
            (SignalKind::user_defined1(), "SIGUSR1"),
            (SignalKind::user_defined2(), "SIGUSR2"),
        ] {
            let mut s = signal(kind)?;
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    tracing::info!("{name} received: ignored (SIGHUP reloads, SIGTERM stops)");
                }
            });
        }
    }
    #[cfg(not(unix))]
    {
        let _ = on_hangup;
    }
    Ok(())
}
