//! `daemoneye-ipc compare`: every compiled-in backend, plus two floors, side
//! by side, with the decision record's verdict.
//!
//! Each backend's server is a child process (`bench-server`); this process
//! is the client. Rounds interleave the backends (A B C ... A B C ...), each
//! round with a fresh server, and every figure is reported as the median over
//! rounds with its min-max spread.

mod floors;
mod instructions;
mod report;
mod role;
mod system;
mod workload;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;
use daemoneye_ipc::{Crc32Variant, TransportKind};
use indicatif::{ProgressBar, ProgressStyle};

pub use instructions::BenchClientCmd;
pub use role::BenchServerCmd;

use self::report::REFERENCE_IN_FLIGHT;
use self::report::{Report, RoundFigures, SizeFigures, ThroughputFigures};
use self::role::{ServerChild, ServerLaunch, ServerRuntime, Workspace};
use self::system::{Pin, Placement, ProcessProbe};
use self::workload::{Driver, FRESH_CONNECTION_SIZE, Plan, Results, Until};
use crate::Failure;

/// Tasks in flight for the pipelined throughput runs.
pub const IN_FLIGHT: [usize; 3] = [1, 8, 32];

/// Clients held open for the server-memory figure.
const HELD_CLIENTS: usize = 16;

/// Something that carries bytes between two processes: a product backend,
/// or a floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    Product(TransportKind),
    /// Blocking `std` Unix sockets, bare length prefix.
    RawStd,
    /// Tokio sockets (or pipes), bare length prefix.
    RawTokio,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Product(kind) => kind.name(),
            Backend::RawStd => "raw-std",
            Backend::RawTokio => "raw-tokio",
        }
    }

    pub fn is_floor(self) -> bool {
        !matches!(self, Backend::Product(_))
    }

    /// Every backend this build can run: the compiled-in products, then the
    /// floors (raw-std needs Unix sockets in std).
    pub fn available() -> Vec<Backend> {
        let mut backends: Vec<Backend> = TransportKind::compiled().map(Backend::Product).collect();
        if cfg!(unix) {
            backends.push(Backend::RawStd);
        }
        backends.push(Backend::RawTokio);
        backends
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Backend, String> {
        Backend::available()
            .into_iter()
            .find(|backend| backend.name() == s.trim())
            .ok_or_else(|| {
                let names: Vec<&str> = Backend::available()
                    .into_iter()
                    .map(Backend::name)
                    .collect();
                format!(
                    "unknown or unavailable backend {s:?}; this build has: {}",
                    names.join(", ")
                )
            })
    }
}

/// A number of rounds: at least 3, so that every figure has a median and a
/// spread around it.
fn parse_rounds(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(rounds) if rounds >= 3 => Ok(rounds),
        Ok(_) => Err(
            "compare needs at least 3 rounds, so that each figure has a median and a spread".into(),
        ),
        Err(_) => Err("the number of rounds is a whole number, 3 or more".into()),
    }
}

/// Sizes like `64`, `1K`, `64KiB`, `1M`.
fn parse_size(text: &str) -> Result<usize, String> {
    let size = daemoneye_ipc::config::parse_byte_size(text)
        .map_err(|expected| format!("{:?} is not a size: expected {expected}", text.trim()))?;
    if !(1..=64 * 1024 * 1024).contains(&size) {
        return Err(format!(
            "{:?}: sizes run from 1 byte to 64 MiB",
            text.trim()
        ));
    }
    Ok(size as usize)
}

#[derive(Args)]
pub struct CompareCmd {
    /// Rounds per backend, interleaved (A B C ... A B C ...); figures are
    /// medians over rounds with their min-max spread.
    #[arg(long, default_value_t = 3, value_parser = parse_rounds)]
    rounds: u32,
    /// Payload sizes, comma-separated (K and M suffixes: 1K = 1024).
    #[arg(long, value_delimiter = ',', default_value = "64,1K,64K,1M", value_parser = parse_size)]
    sizes: Vec<usize>,
    /// Placement of client and servers: same CPU, split CPUs, or none.
    #[arg(long, value_enum, default_value_t = Pin::default_for_os())]
    pin: Pin,
    /// Short measurement windows: the whole run in under 30 seconds.
    #[arg(long)]
    quick: bool,
    /// Only these backends, comma-separated (default: every one available).
    #[arg(long, value_delimiter = ',')]
    backends: Vec<Backend>,
    /// Frame checksum of the product backends.
    #[arg(long, default_value = "ieee")]
    crc32: Crc32Variant,
    /// Tokio runtime of the servers (the product's `serve` uses multi-thread).
    #[arg(long, value_enum, default_value_t = ServerRuntime::MultiThread)]
    server_runtime: ServerRuntime,
    /// Also count instructions per task, client and server, with callgrind
    /// (needs valgrind; adds a few minutes).
    #[arg(long)]
    instructions: bool,
    /// Write every raw figure, the machine, placement and versions as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the tables as Markdown.
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// Write a chart of p50/p99 latency and throughput per backend and size.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Print every table (spreads, p99 and p99.9, every in-flight level,
    /// views, the cost over the floors), wider than 100 columns.
    #[arg(long)]
    wide: bool,
}

impl CompareCmd {
    /// Pins this process first, then measures on a single-threaded runtime
    /// (the client side stays on the one CPU it was given).
    pub fn run_blocking(mut self) -> Result<(), Failure> {
        if self.instructions {
            instructions::check_available()?;
        }
        let placement = Placement::apply(self.pin).map_err(Failure::usage)?;
        if self.backends.is_empty() {
            self.backends = Backend::available();
        }
        self.sizes.sort_unstable();
        self.sizes.dedup();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Failure::runtime(format!("cannot start the async runtime: {e}")))?;
        let report = runtime.block_on(self.measure(placement))?;
        print!("{}", report.to_text(self.wide));
        if let Some(path) = &self.json {
            write(path, &report.to_json().map_err(Failure::runtime)?)?;
        }
        if let Some(path) = &self.markdown {
            write(path, &report.to_markdown())?;
        }
        if let Some(path) = &self.svg {
            report
                .write_svg(path)
                .map_err(|e| Failure::runtime(format!("cannot write {}: {e}", path.display())))?;
        }
        Ok(())
    }

    async fn measure(&self, placement: Placement) -> Result<Report, Failure> {
        let plan = if self.quick {
            Plan::quick()
        } else {
            Plan::full()
        };
        let mut workspace = Workspace::create().map_err(Failure::runtime)?;
        let steps_per_round = self.sizes.len() * (2 + IN_FLIGHT.len()) + 2;
        let progress =
            ProgressBar::new((self.rounds as usize * self.backends.len() * steps_per_round) as u64);
        progress.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .expect("valid template"),
        );
        let mut rounds: Vec<(Backend, Vec<RoundFigures>)> = self
            .backends
            .iter()
            .map(|&backend| (backend, Vec::new()))
            .collect();
        for round in 1..=self.rounds {
            for (backend, figures) in &mut rounds {
                let endpoint = workspace.endpoint(*backend);
                let figures_of_round = self
                    .round(*backend, endpoint, &placement, &plan, &progress, round)
                    .await
                    .map_err(|e| Failure::runtime(format!("{backend}, round {round}: {e}")))?;
                figures.push(figures_of_round);
            }
        }
        let mut counts = Vec::new();
        if self.instructions {
            for &backend in &self.backends {
                for &size in &self.sizes {
                    progress.set_message(format!(
                        "instructions: {backend} {}",
                        report::size_label(size)
                    ));
                    let counted = instructions::count(
                        backend,
                        size,
                        self.crc32,
                        placement.server_cpu,
                        &mut workspace,
                    )
                    .map_err(|e| {
                        Failure::runtime(format!(
                            "{backend}, counting instructions at {}: {e}",
                            report::size_label(size)
                        ))
                    })?;
                    counts.push(counted);
                }
            }
        }
        progress.finish_and_clear();
        Ok(Report::new(
            self.command_line(),
            placement,
            plan,
            self.rounds,
            self.sizes.clone(),
            self.crc32,
            rounds,
        )
        .with_instructions(counts))
    }

    /// One round of every workload against a fresh server for `backend`.
    async fn round(
        &self,
        backend: Backend,
        endpoint: String,
        placement: &Placement,
        plan: &Plan,
        progress: &ProgressBar,
        round: u32,
    ) -> Result<RoundFigures, String> {
        let largest = *self.sizes.last().expect("at least one size");
        // Answers of every size measured, and of the fresh connections'.
        let mut prepared = self.sizes.clone();
        prepared.push(FRESH_CONNECTION_SIZE);
        let server = ServerChild::spawn(ServerLaunch {
            backend,
            endpoint,
            sizes: &prepared,
            crc32: self.crc32,
            cpu: placement.server_cpu,
            runtime: self.server_runtime,
            wrapper: Vec::new(),
        })?;
        let mut probe = ProcessProbe::new(server.pid());
        let client = ProcessProbe::new(std::process::id());
        let driver = Driver::new(backend, &server.endpoint, self.crc32, largest);
        let step = |what: String| {
            progress.set_message(format!("round {round}/{}: {backend} {what}", self.rounds));
        };

        step("memory".to_owned());
        let rss_idle = probe.rss()?;
        let held = driver.hold(HELD_CLIENTS, largest).await?;
        let rss_held = probe.rss()?;
        let rss_peak_held = probe.peak_rss()?.max(rss_held);
        drop(held);
        progress.inc(1);

        step("a new connection per task".to_owned());
        let fresh = driver.fresh_connections(plan).await?;
        progress.inc(1);

        let window = Duration::from_millis(plan.throughput_window_ms);
        let mut sizes = Vec::with_capacity(self.sizes.len());
        for &size in &self.sizes {
            step(format!("{} latency", report::size_label(size)));
            let latency = driver.latency(size, plan).await?;
            progress.inc(1);
            let mut throughput = Vec::with_capacity(IN_FLIGHT.len());
            for in_flight in IN_FLIGHT {
                step(format!(
                    "{} x{in_flight} throughput",
                    report::size_label(size)
                ));
                let run = pipelined(
                    &driver,
                    &mut probe,
                    &client,
                    size,
                    in_flight,
                    window,
                    Results::Plain,
                );
                throughput.push(run.await?);
                progress.inc(1);
            }
            let views = if backend.is_floor() {
                None
            } else {
                step(format!("{} views", report::size_label(size)));
                let run = pipelined(
                    &driver,
                    &mut probe,
                    &client,
                    size,
                    REFERENCE_IN_FLIGHT,
                    window,
                    Results::Views,
                );
                Some(run.await?)
            };
            progress.inc(1);
            sizes.push(SizeFigures::new(size, &latency, throughput, views));
        }
        drop(server);
        Ok(RoundFigures {
            round,
            rss_idle_bytes: rss_idle,
            rss_held_peak_bytes: rss_peak_held,
            connect_p50_ns: fresh.latencies.value_at_quantile(0.5),
            connect_p99_ns: fresh.latencies.value_at_quantile(0.99),
            fresh_connection_tasks_per_second: fresh.tasks as f64
                / fresh.elapsed.as_secs_f64().max(f64::EPSILON),
            sizes,
        })
    }

    fn command_line(&self) -> String {
        std::env::args().collect::<Vec<_>>().join(" ")
    }
}

/// One pipelined run on a fresh, warm connection, with the server's CPU
/// time and both sides' page faults over it.
async fn pipelined(
    driver: &Driver,
    server: &mut ProcessProbe,
    client: &ProcessProbe,
    size: usize,
    in_flight: usize,
    window: Duration,
    results: Results,
) -> Result<ThroughputFigures, String> {
    // Connected and warm before the server's clocks are read, and still
    // connected when they are read again (a raw-std server's thread and its
    // CPU time end with the connection).
    let mut session = driver.open().await?;
    session.warm_up(size, 2).await?;
    let before = (
        server.cpu_time_ns(),
        server.minor_faults(),
        client.minor_faults(),
    );
    let until = Until::Deadline(std::time::Instant::now() + window);
    let run = session.pipelined(size, in_flight, until, results).await?;
    let cpu = server.cpu_time_ns().saturating_sub(before.0);
    let faults = (
        faults_since(before.1, server.minor_faults()),
        faults_since(before.2, client.minor_faults()),
    );
    drop(session);
    Ok(ThroughputFigures::new(in_flight, size, run, cpu, faults))
}

fn faults_since(before: Option<u64>, after: Option<u64>) -> Option<u64> {
    Some(after?.saturating_sub(before?))
}

fn write(path: &PathBuf, text: &str) -> Result<(), Failure> {
    std::fs::write(path, text)
        .map_err(|e| Failure::runtime(format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("64"), Ok(64));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert!(parse_size("0").is_err());
        assert!(
            parse_size("1G")
                .unwrap_err()
                .contains("sizes run from 1 byte to 64 MiB")
        );
        assert!(parse_size("lots").unwrap_err().contains("1K = 1024"));
    }

    #[test]
    fn backends_parse_by_name() {
        for backend in Backend::available() {
            assert_eq!(backend.name().parse::<Backend>(), Ok(backend));
        }
        assert!(
            "shared-memory"
                .parse::<Backend>()
                .unwrap_err()
                .contains("this build has")
        );
    }
}
