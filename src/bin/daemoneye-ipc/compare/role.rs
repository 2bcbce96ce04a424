//! The server side of a comparison: `daemoneye-ipc bench-server`, a hidden
//! subcommand that `compare` starts as a child process per backend and round,
//! so that every measurement crosses a real process boundary.
//!
//! It prints `ready` once listening and serves until its stdin closes (the
//! parent finished, or died).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use daemoneye_ipc::{
    Crc32Variant, DetectionResult, DetectionTask, IpcConfig, IpcServer, Reply, TransportKind,
};

use super::Backend;
use crate::Failure;

/// Hidden: serve one backend for `compare`.
#[derive(Args)]
pub struct BenchServerCmd {
    #[arg(long)]
    backend: Backend,
    #[arg(long)]
    endpoint: String,
    /// Response sizes to prepare, in bytes.
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<usize>,
    #[arg(long, default_value = "ieee")]
    crc32: Crc32Variant,
    /// Pin the server (all its threads) to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    #[arg(long, value_enum, default_value_t = ServerRuntime::MultiThread)]
    runtime: ServerRuntime,
}

/// The Tokio runtime a bench server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerRuntime {
    /// As `daemoneye-ipc serve`: one worker thread per CPU.
    MultiThread,
    /// One thread.
    CurrentThread,
}

impl ServerRuntime {
    pub fn name(self) -> &'static str {
        match self {
            ServerRuntime::MultiThread => "multi-thread",
            ServerRuntime::CurrentThread => "current-thread",
        }
    }

    fn build(self) -> Result<tokio::runtime::Runtime, Failure> {
        match self {
            ServerRuntime::MultiThread => crate::runtime(),
            ServerRuntime::CurrentThread => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Failure::runtime(format!("cannot start the async runtime: {e}"))),
        }
    }
}

impl BenchServerCmd {
    /// Pins first, then builds the runtime, so every worker thread inherits
    /// the placement.
    pub fn run_blocking(self) -> Result<(), Failure> {
        if let Some(cpu) = self.cpu {
            super::system::pin_current_thread(cpu).map_err(Failure::runtime)?;
        }
        match self.backend {
            #[cfg(unix)]
            Backend::RawStd => self.serve_raw_std(),
            _ => {
                let runtime = self.runtime.build()?;
                runtime.block_on(self.serve_async())
            }
        }
    }

    async fn serve_async(self) -> Result<(), Failure> {
        match self.backend {
            Backend::Product(transport) => self.serve_product(transport).await,
            Backend::RawTokio => self.serve_raw_tokio().await,
            Backend::RawStd => Err(Failure::runtime("raw-std is not available on this OS")),
        }
    }

    async fn serve_product(&self, transport: TransportKind) -> Result<(), Failure> {
        let largest = self.sizes.iter().copied().max().unwrap_or(0);
        let config = IpcConfig {
            transport,
            endpoint_path: self.endpoint.clone(),
            max_frame_bytes: largest + 64 * 1024,
            max_connections: 256,
            crc32_variant: self.crc32,
            ..IpcConfig::default()
        };
        let results = Arc::new(SizedResults::new(&self.sizes));
        let server = IpcServer::bind(config, move |task: DetectionTask| {
            let results = results.clone();
            async move { results.answer(task) }
        })
        .await
        .map_err(Failure::runtime)?;
        announce_ready()?;
        wait_for_stdin_to_close().await;
        server.shutdown(Duration::from_secs(1)).await;
        Ok(())
    }

    async fn serve_raw_tokio(&self) -> Result<(), Failure> {
        let responses = super::floors::Responses::new(&self.sizes);
        #[cfg(unix)]
        let accepting = {
            let listener =
                tokio::net::UnixListener::bind(&self.endpoint).map_err(Failure::runtime)?;
            accept_raw_tokio(listener, responses)
        };
        #[cfg(windows)]
        let accepting = {
            use tokio::net::windows::named_pipe::ServerOptions;
            let first = ServerOptions::new()
                .first_pipe_instance(true)
                .create(&self.endpoint)
                .map_err(Failure::runtime)?;
            accept_raw_tokio(first, self.endpoint.clone(), responses)
        };
        announce_ready()?;
        tokio::select! {
            accepted = accepting => accepted.map_err(Failure::runtime),
            _ = wait_for_stdin_to_close() => Ok(()),
        }
    }

    #[cfg(unix)]
    fn serve_raw_std(&self) -> Result<(), Failure> {
        let listener =
            std::os::unix::net::UnixListener::bind(&self.endpoint).map_err(Failure::runtime)?;
        let responses = super::floors::Responses::new(&self.sizes);
        std::thread::spawn(move || super::floors::blocking::serve(listener, responses));
        announce_ready()?;
        std::io::stdin()
            .read_to_end(&mut Vec::new())
            .map_err(Failure::runtime)?;
        Ok(())
    }
}

#[cfg(unix)]
async fn accept_raw_tokio(
    listener: tokio::net::UnixListener,
    responses: super::floors::Responses,
) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(super::floors::serve_tokio(stream, responses.clone()));
    }
}

/// A pipe instance always waits for the next client, as in the Tokio backend.
#[cfg(windows)]
async fn accept_raw_tokio(
    mut waiting: tokio::net::windows::named_pipe::NamedPipeServer,
    name: String,
    responses: super::floors::Responses,
) -> std::io::Result<()> {
    use tokio::net::windows::named_pipe::ServerOptions;
    loop {
        waiting.connect().await?;
        let next = ServerOptions::new().create(&name)?;
        let connected = std::mem::replace(&mut waiting, next);
        tokio::spawn(super::floors::serve_tokio(connected, responses.clone()));
    }
}

/// Prebuilt results by size, shared by every answer: the server writes
/// each without copying it ([`Reply::Shared`]), so the figures measure the
/// transport and the codec rather than a handler building results.
struct SizedResults {
    /// A handful of sizes: a list searched in order costs a handler fewer
    /// instructions than hashing the size, and the instruction counts
    /// measure the transport, not the lookup.
    by_size: Vec<(usize, Arc<DetectionResult>)>,
}

impl SizedResults {
    fn new(sizes: &[usize]) -> SizedResults {
        let by_size = sizes
            .iter()
            .map(|&size| {
                (
                    size,
                    Arc::new(daemoneye_ipc::sample::detection_result("", size)),
                )
            })
            .collect();
        SizedResults { by_size }
    }

    /// The task's metadata names the size wanted (`size=N`).
    fn answer(&self, task: DetectionTask) -> Reply {
        let size: Option<usize> = task
            .metadata
            .as_deref()
            .and_then(|m| m.strip_prefix("size=")?.parse().ok());
        let prepared = self
            .by_size
            .iter()
            .find(|(prepared, _)| Some(*prepared) == size);
        match prepared {
            Some((_, result)) => Reply::Shared(result.clone()),
            None => Reply::Owned(DetectionResult {
                task_id: task.task_id,
                success: false,
                error_message: Some(format!("no prepared result for {:?}", task.metadata)),
                ..Default::default()
            }),
        }
    }
}

/// `ready PID`: the parent measures the process that serves, which is not
/// the one it started when a wrapper (`DAEMONEYE_COMPARE_RUNNER`) forks.
fn announce_ready() -> Result<(), Failure> {
    let mut stdout = std::io::stdout();
    writeln!(stdout, "ready {}", std::process::id())
        .and_then(|()| stdout.flush())
        .map_err(Failure::runtime)
}

async fn wait_for_stdin_to_close() {
    let _ = tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await;
}

/// A running bench server, from the parent's side. Dropping it closes the
/// server's stdin (it exits) and reaps it.
pub struct ServerChild {
    child: Child,
    stdin: Option<ChildStdin>,
    pub endpoint: String,
    /// The serving process, as it reported itself.
    pid: u32,
}

/// How long a server may take to start (under callgrind, a while).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What server to start, and how.
pub struct ServerLaunch<'a> {
    pub backend: Backend,
    pub endpoint: String,
    /// Result sizes to prepare.
    pub sizes: &'a [usize],
    pub crc32: Crc32Variant,
    /// Pin it to this CPU.
    pub cpu: Option<usize>,
    pub runtime: ServerRuntime,
    /// A command to run it under (a profiler), program first; empty for
    /// none, or for `DAEMONEYE_COMPARE_RUNNER` if set.
    pub wrapper: Vec<String>,
}

impl ServerChild {
    pub fn spawn(launch: ServerLaunch<'_>) -> Result<ServerChild, String> {
        let ServerLaunch {
            backend,
            endpoint,
            sizes,
            crc32,
            cpu,
            runtime,
            wrapper,
        } = launch;
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
        let sizes: Vec<String> = sizes.iter().map(ToString::to_string).collect();
        // Under user-mode emulation (qemu-user without binfmt_misc), or a
        // profiler, the servers must be started through the same wrapper.
        let runner = std::env::var("DAEMONEYE_COMPARE_RUNNER").unwrap_or_default();
        let wrapper = if wrapper.is_empty() {
            runner.split_whitespace().map(str::to_owned).collect()
        } else {
            wrapper
        };
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(exe);
                command
            }
            None => Command::new(exe),
        };
        command
            .args([
                "bench-server",
                "--backend",
                backend.name(),
                "--endpoint",
                &endpoint,
            ])
            .args([
                "--sizes",
                &sizes.join(","),
                "--crc32",
                crc32.name(),
                "--runtime",
                runtime.name(),
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("DAEMONEYE_IPC_") {
                command.env_remove(key);
            }
        }
        if let Some(cpu) = cpu {
            command.args(["--cpu", &cpu.to_string()]);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start the {} server: {e}", backend.name()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped");
        // The first line, read on a thread so that a wedged child cannot
        // hang the comparison.
        let (line_tx, line_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = line_tx.send(BufReader::new(stdout).read_line(&mut line).map(|_| line));
        });
        let ready = line_rx.recv_timeout(READY_TIMEOUT);
        let pid = match &ready {
            Ok(Ok(line)) => line
                .trim()
                .strip_prefix("ready ")
                .and_then(|pid| pid.parse().ok()),
            _ => None,
        };
        let Some(pid) = pid else {
            let _ = child.kill();
            let _ = child.wait();
            let why = match ready {
                Err(_) => format!("did not report ready within {} s", READY_TIMEOUT.as_secs()),
                Ok(Err(e)) => format!("could not be read: {e}"),
                Ok(Ok(line)) if line.is_empty() => "exited (see its error above)".to_owned(),
                Ok(Ok(line)) => format!("said {:?} instead of ready", line.trim()),
            };
            return Err(format!("the {} server {why}", backend.name()));
        };
        Ok(ServerChild {
            child,
            stdin,
            endpoint,
            pid,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// A private directory for the comparison's sockets, removed at the end.
pub struct Workspace {
    dir: PathBuf,
    run: u32,
}

impl Workspace {
    pub fn create() -> Result<Workspace, String> {
        // A directory a killed run left behind under a since-recycled pid
        // is not ours to reuse: take the next free name.
        let base = std::env::temp_dir();
        for attempt in 0..100 {
            let dir = base.join(format!(
                "daemoneye-compare-{}-{attempt}",
                std::process::id()
            ));
            match create_private_dir(&dir) {
                Ok(()) => return Ok(Workspace { dir, run: 0 }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
            }
        }
        Err(format!(
            "cannot find a free directory name in {}",
            base.display()
        ))
    }

    /// A number not handed out before, for names in the workspace.
    pub fn next_run(&mut self) -> u32 {
        self.run += 1;
        self.run
    }

    /// A file in the workspace (removed with it).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A fresh endpoint name for the next server.
    pub fn endpoint(&mut self, backend: Backend) -> String {
        self.run += 1;
        #[cfg(unix)]
        {
            self.dir
                .join(format!("{}-{}.sock", backend.name(), self.run))
                .to_string_lossy()
                .into_owned()
        }
        #[cfg(windows)]
        {
            format!(
                r"\\.\pipe\daemoneye-compare-{}\{}-{}",
                std::process::id(),
                backend.name(),
                self.run
            )
        }
    }
}

/// A directory only its owner can enter (Unix: 0700).
fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(dir)
    }
    #[cfg(windows)]
    {
        std::fs::create_dir(dir)
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
