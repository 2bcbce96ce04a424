//! `daemoneye-ipc serve`: a collector on the configured endpoint until SIGINT
//! or SIGTERM, then a graceful shutdown and exit 0.

use std::time::Duration;

use clap::Args;
use daemoneye_ipc::IpcServer;

use crate::collector::Collector;
use crate::{ConfigArgs, Failure};

#[derive(Args)]
pub struct ServeCmd {
    #[command(flatten)]
    settings: ConfigArgs,
    /// Unix: also admit clients running as this uid (repeatable). The
    /// server's own uid and root are always admitted.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
    /// On SIGINT/SIGTERM, how long tasks in flight may take to finish.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    shutdown_grace_ms: u64,
}

impl ServeCmd {
    pub async fn run(self) -> Result<(), Failure> {
        let config = self.settings.load().map_err(Failure::usage)?.config;
        let collector = Collector::new();
        let server = IpcServer::builder(config)
            .allow_uids(self.allow_uids)
            .bind(move |task| collector.clone().handle(task))
            .await
            .map_err(Failure::runtime)?;
        let signal = stop_signal().await.map_err(Failure::runtime)?;
        tracing::info!(signal, "stop requested");
        let report = server
            .shutdown(Duration::from_millis(self.shutdown_grace_ms))
            .await;
        tracing::info!(drained = report.drained, stats = ?report.stats, "stopped");
        Ok(())
    }
}

/// Waits for SIGINT or SIGTERM (Ctrl-C or Ctrl-Break on Windows) and names it.
async fn stop_signal() -> std::io::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        Ok(tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        })
    }
    #[cfg(windows)]
    {
        let mut ctrl_break = tokio::signal::windows::ctrl_break()?;
        Ok(tokio::select! {
            result = tokio::signal::ctrl_c() => { result?; "Ctrl-C" }
            _ = ctrl_break.recv() => "Ctrl-Break",
        })
    }
}
