//! The stop signal: SIGINT or SIGTERM, handled explicitly (a process started in the background
//! of a shell has SIGINT ignored by default, and systemd stops services with SIGTERM).

use tokio::signal::unix::{signal, SignalKind};

/// Completes at the first SIGINT or SIGTERM.
///
/// # Errors
/// The signal handlers cannot be installed.
pub fn signal_future() -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
