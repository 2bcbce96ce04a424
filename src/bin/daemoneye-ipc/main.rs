//! `daemoneye-ipc`: the operator's command line for the DaemonEye IPC layer.
//!
//! Exit codes: 0 success, 1 the operation failed (I/O, the peer, the
//! handler), 2 bad usage or configuration, 3 (`send --expected-hash`) the
//! file's hash is not the one expected.

mod collector;
#[cfg(feature = "bench")]
mod compare;
mod config_cmd;
mod manuals;
mod ping;
mod send;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use daemoneye_ipc::config::{ConfigLoader, ConfigOverrides, LoadedConfig};
use daemoneye_ipc::{Crc32Variant, IpcError, TransportKind};

/// Exit code for an operation that failed at run time.
const EXIT_FAILURE: u8 = 1;
/// Exit code for bad usage or an invalid configuration (clap uses it too).
const EXIT_USAGE: u8 = 2;
/// Exit code of `send --expected-hash` when the hash came back different,
/// or could not be computed.
const EXIT_HASH_MISMATCH: u8 = 3;

/// How long `serve` waits, after its graceful shutdown, for blocking work
/// that is still running before it exits anyway.
const SHUTDOWN_STRAGGLERS: std::time::Duration = std::time::Duration::from_millis(500);

#[derive(Parser)]
#[command(
    name = "daemoneye-ipc",
    version,
    about = "DaemonEye collector/agent IPC over local sockets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a collector: answer detection tasks until SIGINT or SIGTERM.
    Serve(serve::ServeCmd),
    /// Send one task to a collector and print the result as JSON.
    Send(send::SendCmd),
    /// Connect, make round trips (one unless --count), and print the latency.
    Ping(ping::PingCmd),
    /// Print the effective configuration and where each value came from.
    Config(config_cmd::ConfigCmd),
    /// Measure every compiled-in backend and two floors side by side, and
    /// judge interprocess against the decision record's bar.
    #[cfg(feature = "bench")]
    Compare(compare::CompareCmd),
    /// Measure the backends side by side (needs a build with the `bench`
    /// feature).
    #[cfg(not(feature = "bench"))]
    Compare(manuals::NotInThisBuild),
    /// A server for `compare` (started by it, one per backend and round).
    #[cfg(feature = "bench")]
    #[command(hide = true)]
    BenchServer(compare::BenchServerCmd),
    /// A client for `compare --instructions` (started by it under callgrind).
    #[cfg(feature = "bench")]
    #[command(hide = true)]
    BenchClient(compare::BenchClientCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish or
    /// powershell) to stdout.
    Completions(manuals::CompletionsCmd),
    /// Print the man page (roff) to stdout.
    Man(manuals::ManCmd),
}

/// The settings every subcommand accepts. Flags override `DAEMONEYE_IPC_*`
/// environment variables, which override the `[ipc]` table of `--config`.
#[derive(Args, Debug, Clone, Default)]
struct ConfigArgs {
    /// TOML file whose [ipc] table holds the settings.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Unix socket path or Windows pipe name.
    #[arg(long, value_name = "PATH")]
    endpoint: Option<String>,
    /// Backend: interprocess, tokio or legacy (those compiled into this build).
    #[arg(long, value_name = "T")]
    transport: Option<TransportKind>,
    /// Frame checksum: ieee or castagnoli.
    #[arg(long, value_name = "ieee|castagnoli")]
    crc32: Option<Crc32Variant>,
    /// Connections served at once.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Server: connections one peer (uid) may hold, served or waiting; 0
    /// for no cap.
    #[arg(long, value_name = "N")]
    max_connections_per_peer: Option<usize>,
    /// Server: how long an excess connection waits for a slot; client: how
    /// long to keep trying to connect.
    #[arg(long, value_name = "N")]
    accept_timeout_ms: Option<u64>,
    /// Deadline for a whole frame once it starts, and the idle limit.
    #[arg(long, value_name = "N")]
    read_timeout_ms: Option<u64>,
    /// Deadline for writing one frame.
    #[arg(long, value_name = "N")]
    write_timeout_ms: Option<u64>,
    /// Server: how long a handler may take over one task.
    #[arg(long, value_name = "N")]
    task_timeout_ms: Option<u64>,
    /// Largest message body in bytes (K, M suffixes: 1K = 1024).
    #[arg(long, value_name = "N", value_parser = parse_bytes)]
    max_frame_bytes: Option<usize>,
    /// Unix server: the group (name or gid) whose members may connect; the
    /// socket is then 0660 and its directory 0750, both the group's.
    #[arg(long, value_name = "NAME|GID")]
    socket_group: Option<String>,
}

/// A byte count from the command line, with the units the config file and
/// the environment accept.
fn parse_bytes(text: &str) -> Result<usize, String> {
    daemoneye_ipc::config::parse_byte_size(text)
        .map(|bytes| usize::try_from(bytes).unwrap_or(usize::MAX))
}

impl ConfigArgs {
    /// Layers defaults, the file, the process environment and these flags.
    fn load(&self) -> Result<LoadedConfig, IpcError> {
        let flags = ConfigOverrides {
            transport: self.transport,
            endpoint_path: self.endpoint.clone(),
            max_frame_bytes: self.max_frame_bytes,
            accept_timeout_ms: self.accept_timeout_ms,
            read_timeout_ms: self.read_timeout_ms,
            write_timeout_ms: self.write_timeout_ms,
            task_timeout_ms: self.task_timeout_ms,
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
            crc32_variant: self.crc32,
            socket_group: self.socket_group.clone(),
        };
        let mut loader = ConfigLoader::new().env_from_process().flags(flags);
        if let Some(path) = &self.config {
            loader = loader.file(path);
        }
        loader.load()
    }
}

/// A failure, and the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn usage(err: impl std::fmt::Display) -> Failure {
        Failure {
            code: EXIT_USAGE,
            message: err.to_string(),
        }
    }

    fn runtime(err: impl std::fmt::Display) -> Failure {
        Failure {
            code: EXIT_FAILURE,
            message: err.to_string(),
        }
    }

    fn hash_mismatch(message: impl std::fmt::Display) -> Failure {
        Failure {
            code: EXIT_HASH_MISMATCH,
            message: message.to_string(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Serve(cmd) => init_logging("info", cmd.log_format),
        _ => init_logging("warn", LogFormat::Text),
    }
    let outcome = match cli.command {
        Command::Serve(cmd) => runtime().and_then(|rt| {
            let served = rt.block_on(cmd.run());
            // Blocking work still running (a hash, a stuck /proc read) is not
            // waited for: the process ends within the grace period and this.
            rt.shutdown_timeout(SHUTDOWN_STRAGGLERS);
            served
        }),
        Command::Send(cmd) => runtime().and_then(|rt| rt.block_on(cmd.run())),
        Command::Ping(cmd) => runtime().and_then(|rt| rt.block_on(cmd.run())),
        Command::Config(cmd) => cmd.run(),
        // These pin themselves before any runtime thread exists.
        #[cfg(feature = "bench")]
        Command::Compare(cmd) => cmd.run_blocking(),
        #[cfg(not(feature = "bench"))]
        Command::Compare(cmd) => cmd.run("compare", "bench"),
        #[cfg(feature = "bench")]
        Command::BenchServer(cmd) => cmd.run_blocking(),
        #[cfg(feature = "bench")]
        Command::BenchClient(cmd) => cmd.run_blocking(),
        Command::Completions(cmd) => cmd.run(Cli::command()),
        Command::Man(cmd) => cmd.run(Cli::command()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("daemoneye-ipc: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|err| Failure::runtime(format!("cannot start the async runtime: {err}")))
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, with every field (for journald and log
    /// shippers).
    Json,
}

/// Logs go to stderr, filtered by `RUST_LOG` (`default_level` without it):
/// `info` for a server, `warn` for one-shot commands, whose stdout is
/// their answer.
fn init_logging(default_level: &str, format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}
