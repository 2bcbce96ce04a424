//! `daemoneye-ipc serve`: a collector on the configured endpoint until SIGINT
//! or SIGTERM, then a graceful shutdown and exit 0.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use daemoneye_ipc::{IpcServer, ServerStats};

use crate::collector::{Collector, HashPolicy};
use crate::{ConfigArgs, Failure, LogFormat};

#[derive(Args)]
pub struct ServeCmd {
    #[command(flatten)]
    settings: ConfigArgs,
    /// Unix: also admit clients running as this uid (repeatable). The
    /// server's own uid and root are always admitted.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
    /// On SIGINT/SIGTERM, how long tasks in flight may take to finish. The
    /// process exits within this plus one second, whatever is still running.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    shutdown_grace_ms: u64,
    /// CHECK_PROCESS_HASH may also read files under this directory
    /// (repeatable; none by default: only executables of running processes).
    #[arg(long = "hash-allow", value_name = "DIR")]
    hash_allow: Vec<PathBuf>,
    /// CHECK_PROCESS_HASH refuses files larger than this, without reading
    /// them (K, M, G suffixes: 1G = 1024M).
    #[arg(long, value_name = "N", default_value = "1G", value_parser = daemoneye_ipc::config::parse_byte_size)]
    max_hash_bytes: u64,
    /// Also log the counters line every N milliseconds (0: only on SIGUSR1
    /// and at shutdown). Where there is no SIGUSR1 (Windows), this is how to
    /// watch them.
    #[arg(long, value_name = "N", default_value_t = 0)]
    counters_interval_ms: u64,
    /// Log lines as text, or as one JSON object per line (for journald and
    /// log shippers). Either way on stderr, filtered by RUST_LOG.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl ServeCmd {
    pub async fn run(self) -> Result<(), Failure> {
        let loaded = self.settings.load().map_err(Failure::usage)?;
        loaded.validate_server().map_err(Failure::usage)?;
        let config = loaded.config;
        // Hooked before the endpoint exists: a stop request that arrives as
        // soon as the socket is visible must not find the default handler,
        // which would kill the process without cleaning up.
        let mut stop = StopSignals::install().map_err(Failure::runtime)?;
        let collector = Collector::new(HashPolicy {
            allowed_dirs: self.hash_allow,
            max_bytes: self.max_hash_bytes,
        });
        let (max_jobs, scan_wait) = (collector.max_jobs(), collector.scan_wait());
        let server = IpcServer::builder(config)
            .allow_uids(self.allow_uids)
            .bind(move |task| collector.clone().handle(task))
            .await
            .map_err(Failure::runtime)?;
        // Once the endpoint is bound and secured: a refused start never says
        // it was ready.
        tracing::info!(
            max_blocking_jobs = max_jobs,
            scan_wait_ms = scan_wait.as_millis() as u64,
            "collector ready"
        );
        let mut every = (self.counters_interval_ms > 0).then(|| {
            let period = Duration::from_millis(self.counters_interval_ms);
            tokio::time::interval_at(tokio::time::Instant::now() + period, period)
        });
        let signal = loop {
            let tick = async {
                match every.as_mut() {
                    Some(every) => every.tick().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                signal = stop.recv() => match signal.map_err(Failure::runtime)? {
                    Signal::Stop(signal) => break signal,
                    #[cfg(unix)]
                    Signal::Counters => log_counters(&server.stats(), "requested (SIGUSR1)"),
                },
                _ = tick => log_counters(&server.stats(), "periodic"),
            }
        };
        tracing::info!(signal, "stop requested");
        let report = server
            .shutdown(Duration::from_millis(self.shutdown_grace_ms))
            .await;
        log_counters(&report.stats, "at shutdown");
        tracing::info!(drained = report.drained, "stopped");
        Ok(())
    }
}

/// The server's counters as one log line, each counter a field.
fn log_counters(stats: &ServerStats, when: &str) {
    tracing::info!(
        when,
        transport = stats.transport,
        accepted = stats.accepted,
        rejected_limit = stats.rejected_limit,
        rejected_peer = stats.rejected_peer,
        active = stats.active,
        active_peak = stats.active_peak,
        frames_in = stats.frames_in,
        frames_out = stats.frames_out,
        bytes_in = stats.bytes_in,
        bytes_out = stats.bytes_out,
        crc_errors = stats.crc_errors,
        oversize_frames = stats.oversize_frames,
        malformed_frames = stats.malformed_frames,
        truncated_frames = stats.truncated_frames,
        read_timeouts = stats.read_timeouts,
        write_timeouts = stats.write_timeouts,
        oversize_results = stats.oversize_results,
        handler_errors = stats.handler_errors,
        task_timeouts = stats.task_timeouts,
        accept_errors = stats.accept_errors,
        bytes_held = stats.bytes_held,
        budget_pauses = stats.budget_pauses,
        "counters"
    );
}

/// What a signal asks for.
enum Signal {
    /// Stop, named.
    Stop(&'static str),
    /// Log the counters (SIGUSR1).
    #[cfg(unix)]
    Counters,
}

/// SIGINT and SIGTERM (Ctrl-C and Ctrl-Break on Windows) to stop, and on
/// Unix SIGUSR1 for the counters, all hooked at once.
struct StopSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    counters: tokio::signal::unix::Signal,
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
                counters: signal(SignalKind::user_defined1())?,
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

    /// Waits for the next signal.
    async fn recv(&mut self) -> std::io::Result<Signal> {
        #[cfg(unix)]
        {
            Ok(tokio::select! {
                _ = self.terminate.recv() => Signal::Stop("SIGTERM"),
                _ = self.interrupt.recv() => Signal::Stop("SIGINT"),
                _ = self.counters.recv() => Signal::Counters,
            })
        }
        #[cfg(windows)]
        {
            Ok(tokio::select! {
                _ = self.ctrl_c.recv() => Signal::Stop("Ctrl-C"),
                _ = self.ctrl_break.recv() => Signal::Stop("Ctrl-Break"),
            })
        }
    }
}
