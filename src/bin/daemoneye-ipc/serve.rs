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
        // Hooked before the endpoint exists: a stop request that arrives as
        // soon as the socket is visible must not find the default handler,
        // which would kill the process without cleaning up.
        let mut stop = StopSignals::install().map_err(Failure::runtime)?;
        let collector = Collector::new();
        let server = IpcServer::builder(config)
            .allow_uids(self.allow_uids)
            .bind(move |task| collector.clone().handle(task))
            .await
            .map_err(Failure::runtime)?;
        let signal = stop.recv().await.map_err(Failure::runtime)?;
        tracing::info!(signal, "stop requested");
        let report = server
            .shutdown(Duration::from_millis(self.shutdown_grace_ms))
            .await;
        tracing::info!(drained = report.drained, stats = ?report.stats, "stopped");
        Ok(())
    }
}

/// SIGINT and SIGTERM (Ctrl-C and Ctrl-Break on Windows), hooked at once.
struct StopSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(windows)]
    ctrl_c: tokio::signal::windows::CtrlC,
    #[cfg(windows)]
    ctrl_break: tokio::signal::windows::CtrlBreak,
}

impl StopSignals {
    fn install() -> std::io::Result<StopSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(StopSignals {
                terminate: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(windows)]
        {
            Ok(StopSignals {
                ctrl_c: tokio::signal::windows::ctrl_c()?,
                ctrl_break: tokio::signal::windows::ctrl_break()?,
            })
        }
    }

    /// Waits for the first stop request and names it.
    async fn recv(&mut self) -> std::io::Result<&'static str> {
        #[cfg(unix)]
        {
            Ok(tokio::select! {
                _ = self.terminate.recv() => "SIGTERM",
                _ = self.interrupt.recv() => "SIGINT",
            })
        }
        #[cfg(windows)]
        {
            Ok(tokio::select! {
                _ = self.ctrl_c.recv() => "Ctrl-C",
                _ = self.ctrl_break.recv() => "Ctrl-Break",
            })
        }
    }
}
