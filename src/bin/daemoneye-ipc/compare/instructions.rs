//! Instructions per task, counted by callgrind (`compare --instructions`):
//! on a shared, noisy machine the one figure that does not move from run to
//! run, and the one that shows where a change saved work.
//!
//! For each backend and size, a server and a client (`bench-client`, a
//! hidden subcommand) run under `valgrind --tool=callgrind` twice: once with
//! `n` pipelined tasks and once with `3n`. Start-up, connecting and warming
//! up cost the same in both runs, so the difference divided by `2n` is what
//! each task costs each process.

use std::path::Path;
use std::process::{Command, Stdio};

use clap::Args;
use daemoneye_ipc::Crc32Variant;

use super::Backend;
use super::report::{InstructionCounts, REFERENCE_IN_FLIGHT};
use super::role::{ServerChild, ServerLaunch, Workspace};
use super::workload::{Driver, Plan, Results, Until};
use crate::Failure;

/// Payload bytes each counted run moves, at least: enough tasks that the
/// per-task figure is not start-up noise, few enough that a 1 MiB run under
/// callgrind (50 to 100 times slower than native) takes seconds.
const BYTES_PER_RUN: usize = 2 * 1024 * 1024;
const MIN_TASKS: u64 = 8;
const MAX_TASKS: u64 = 200;

/// Checks that valgrind can be run, before any measuring starts.
pub fn check_available() -> Result<(), Failure> {
    let found = Command::new("valgrind")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if found {
        Ok(())
    } else {
        Err(Failure::usage(
            "--instructions counts instructions with callgrind, and valgrind is not on PATH; \
             install it (Debian/Ubuntu: apt install valgrind) or run without --instructions",
        ))
    }
}

/// Counts instructions per task for `backend` at `size`.
pub fn count(
    backend: Backend,
    size: usize,
    crc32: Crc32Variant,
    server_cpu: Option<usize>,
    workspace: &mut Workspace,
) -> Result<InstructionCounts, String> {
    let tasks = (BYTES_PER_RUN / size.max(1)).clamp(MIN_TASKS as usize, MAX_TASKS as usize) as u64;
    let short = run(backend, size, crc32, server_cpu, tasks, workspace)?;
    let long = run(backend, size, crc32, server_cpu, 3 * tasks, workspace)?;
    let per_task = |side: &str, short: u64, long: u64| match long.checked_sub(short) {
        Some(extra) => Ok(extra as f64 / (2 * tasks) as f64),
        None => Err(format!(
            "the {side} ran fewer instructions for {} tasks ({long}) than for {tasks} ({short}); \
             the counts cannot be trusted (is something else running under valgrind?)",
            3 * tasks
        )),
    };
    Ok(InstructionCounts {
        backend: backend.name(),
        size,
        in_flight: REFERENCE_IN_FLIGHT,
        client_per_task: per_task("client", short.client, long.client)?,
        server_per_task: per_task("server", short.server, long.server)?,
    })
}

/// Instructions each process ran in one counted run, in total.
struct Totals {
    client: u64,
    server: u64,
}

fn run(
    backend: Backend,
    size: usize,
    crc32: Crc32Variant,
    server_cpu: Option<usize>,
    tasks: u64,
    workspace: &mut Workspace,
) -> Result<Totals, String> {
    let run = workspace.next_run();
    let server_out = workspace.file(&format!("callgrind-server-{run}"));
    let client_out = workspace.file(&format!("callgrind-client-{run}"));
    let endpoint = workspace.endpoint(backend);
    let server = ServerChild::spawn(ServerLaunch {
        backend,
        endpoint,
        sizes: &[size],
        crc32,
        cpu: server_cpu,
        runtime: super::role::ServerRuntime::MultiThread,
        wrapper: std::iter::once("valgrind".to_owned())
            .chain(callgrind_options(&server_out))
            .collect(),
    })?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let status = Command::new("valgrind")
        .args(callgrind_options(&client_out))
        .arg(exe)
        .args(["bench-client", "--backend", backend.name(), "--endpoint"])
        .arg(&server.endpoint)
        .args(["--size", &size.to_string(), "--tasks", &tasks.to_string()])
        .args(["--in-flight", &REFERENCE_IN_FLIGHT.to_string()])
        .args(["--crc32", crc32.name()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot start valgrind: {e}"))?;
    // The server writes its counts when it exits, which dropping it waits for.
    drop(server);
    if !status.success() {
        return Err(format!(
            "the counted client failed ({status}); see its error above"
        ));
    }
    Ok(Totals {
        client: total(&client_out)?,
        server: total(&server_out)?,
    })
}

/// valgrind's options to run a program under callgrind, writing to `out`.
fn callgrind_options(out: &Path) -> Vec<String> {
    vec![
        "--tool=callgrind".to_owned(),
        "--quiet".to_owned(),
        format!("--callgrind-out-file={}", out.display()),
    ]
}

/// The instructions a callgrind output file counted, in total.
fn total(path: &Path) -> Result<u64, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("callgrind wrote no counts to {}: {e}", path.display()))?;
    parse_total(&text).ok_or_else(|| format!("no totals line in {}", path.display()))
}

fn parse_total(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| {
            line.strip_prefix("totals:")
                .or_else(|| line.strip_prefix("summary:"))
        })
        .and_then(|counts| counts.split_whitespace().next()?.parse().ok())
}

/// Hidden: the client of a counted run; `tasks` pipelined tasks of `size`,
/// `in_flight` at a time, after a short warm-up (or, with
/// `--new-connection-per-task`, `tasks` new connections of one round trip
/// each, as `compare` times them: for profiling a connection's set-up).
#[derive(Args)]
pub struct BenchClientCmd {
    #[arg(long)]
    backend: Backend,
    #[arg(long)]
    endpoint: String,
    #[arg(long)]
    size: usize,
    #[arg(long)]
    tasks: u64,
    #[arg(long, default_value_t = REFERENCE_IN_FLIGHT)]
    in_flight: usize,
    #[arg(long, default_value = "ieee")]
    crc32: Crc32Variant,
    /// Each task on a connection of its own, of the 64 B `compare` times
    /// new connections with (`--size` and `--in-flight` do not apply).
    #[arg(long)]
    new_connection_per_task: bool,
}

impl BenchClientCmd {
    pub fn run_blocking(self) -> Result<(), Failure> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Failure::runtime(format!("cannot start the async runtime: {e}")))?;
        runtime.block_on(async {
            let driver = Driver::new(self.backend, &self.endpoint, self.crc32, self.size);
            if self.new_connection_per_task {
                let plan = Plan {
                    connects: self.tasks,
                    ..Plan::quick()
                };
                driver
                    .fresh_connections(&plan)
                    .await
                    .map_err(Failure::runtime)?;
                return Ok(());
            }
            let mut session = driver.open().await.map_err(Failure::runtime)?;
            session
                .warm_up(self.size, 2)
                .await
                .map_err(Failure::runtime)?;
            let run = session
                .pipelined(
                    self.size,
                    self.in_flight,
                    Until::Tasks(self.tasks),
                    Results::Plain,
                )
                .await
                .map_err(Failure::runtime)?;
            if run.tasks == self.tasks {
                Ok(())
            } else {
                Err(Failure::runtime(format!(
                    "{} of {} tasks completed",
                    run.tasks, self.tasks
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_are_read_from_either_line_callgrind_writes() {
        assert_eq!(
            parse_total("events: Ir\nsummary: 1234\n\ntotals: 1234\n"),
            Some(1234)
        );
        assert_eq!(parse_total("events: Ir\ntotals: 99 1\n"), Some(99));
        assert_eq!(parse_total("events: Ir\n"), None);
    }
}
