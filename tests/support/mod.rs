//! Shared by the integration tests: a real `daemoneye-ipc serve` process,
//! a raw byte-level client, and waiting on conditions with deadlines.
#![allow(dead_code)] // Each test file uses a different part.

#[cfg(windows)]
pub mod described_pipe;
pub mod raw_server;
pub mod sized_server;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use daemoneye_ipc::frame::codec::ClientCodec;
use daemoneye_ipc::frame::{FrameSettings, encode_message};
use daemoneye_ipc::{DetectionResult, DetectionTask, IpcConfig, TransportKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Decoder;

/// How long any single condition may take before a test gives up.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Polls `probe` until it returns `Some`, or panics after `deadline`.
pub fn wait_until<T>(what: &str, deadline: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The compiled-in transports.
pub fn transports() -> Vec<TransportKind> {
    TransportKind::compiled().collect()
}

/// Runs the test function `NAME(transport: TransportKind)` once per
/// compiled-in backend, as the tests `NAME::interprocess`, `NAME::tokio` and
/// `NAME::legacy` (those built in). Every backend gets every test that
/// applies, written once, as a plain function:
///
/// ```ignore
/// each_backend!(a_bad_frame_closes_the_connection);
/// /// What the test shows.
/// fn a_bad_frame_closes_the_connection(transport: TransportKind) { ... }
///
/// each_backend!(async answers_come_back_as_they_complete);
/// async fn answers_come_back_as_they_complete(transport: TransportKind) { ... }
/// ```
///
/// An `async fn` runs on a fresh two-worker Tokio runtime.
#[macro_export]
macro_rules! each_backend {
    (async $name:ident) => {
        $crate::each_backend!(@tests $name, |transport| {
            $crate::support::runtime().block_on(super::$name(transport))
        });
    };
    ($name:ident) => {
        $crate::each_backend!(@tests $name, |transport| super::$name(transport));
    };
    (@tests $name:ident, |$transport:ident| $run:expr) => {
        mod $name {
            #[cfg(feature = "ipc-interprocess")]
            #[test]
            fn interprocess() {
                let $transport = daemoneye_ipc::TransportKind::Interprocess;
                $run
            }

            #[cfg(feature = "ipc-tokio")]
            #[test]
            fn tokio() {
                let $transport = daemoneye_ipc::TransportKind::Tokio;
                $run
            }

            #[cfg(feature = "ipc-legacy")]
            #[test]
            fn legacy() {
                let $transport = daemoneye_ipc::TransportKind::Legacy;
                $run
            }
        }
    };
}

/// A fresh multi-threaded runtime with two workers (the machines the tests
/// run on have two cores).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A fresh endpoint: a socket in a private temporary directory (Unix), or a
/// uniquely named pipe (Windows). Keep the directory alive with the endpoint.
pub struct Endpoint {
    pub name: String,
    pub dir: tempfile::TempDir,
}

impl Endpoint {
    pub fn fresh() -> Endpoint {
        Endpoint::fresh_in(&socket_temp_root())
    }

    /// An endpoint other users can reach: under a directory every user may
    /// traverse, its own directory made traversable (0711) too.
    #[cfg(unix)]
    pub fn reachable_by_others() -> Endpoint {
        use std::os::unix::fs::PermissionsExt;
        let endpoint = Endpoint::fresh_in(&shared_temp_root());
        std::fs::set_permissions(endpoint.dir.path(), std::fs::Permissions::from_mode(0o711))
            .unwrap();
        endpoint
    }

    fn fresh_in(root: &Path) -> Endpoint {
        let dir = tempfile::Builder::new()
            .prefix("dipc")
            .tempdir_in(root)
            .unwrap();
        #[cfg(unix)]
        let name = dir
            .path()
            .join("run")
            .join("procmond.sock")
            .to_string_lossy()
            .into_owned();
        #[cfg(windows)]
        let name = format!(
            r"\\.\pipe\daemoneye-test\{}",
            dir.path().file_name().unwrap().to_string_lossy()
        );
        Endpoint { name, dir }
    }

    #[cfg(unix)]
    pub fn path(&self) -> &Path {
        Path::new(&self.name)
    }
}

/// Where test sockets go: the temporary directory, unless its path is so
/// long that a socket path under it would not fit in `sun_path` (then
/// `/tmp`, which every Unix has).
fn socket_temp_root() -> PathBuf {
    let temp = std::env::temp_dir();
    if cfg!(unix) && temp.as_os_str().len() > 48 {
        return PathBuf::from("/tmp");
    }
    temp
}

/// A temporary directory every user may traverse to (each of its ancestors
/// executable by others): the temporary directory if so, else `/tmp` or
/// `/var/tmp`. Where tests put what another uid must reach; a private
/// `TMPDIR` (as a root home directory's would be) is not such a place.
#[cfg(unix)]
pub fn shared_temp_root() -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let traversable = |dir: &Path| {
        dir.ancestors()
            .all(|part| std::fs::metadata(part).is_ok_and(|meta| meta.mode() & 0o001 != 0))
    };
    [
        socket_temp_root(),
        PathBuf::from("/tmp"),
        PathBuf::from("/var/tmp"),
    ]
    .into_iter()
    .find(|dir| traversable(dir))
    .expect("a temporary directory every user can traverse")
}

/// The `daemoneye-ipc` binary built for this test run.
fn built_binary() -> &'static str {
    // option_env!: this module is also compiled into tests that run without
    // the binary (no `cli` feature), which never call this function.
    let Some(binary) = option_env!("CARGO_BIN_EXE_daemoneye-ipc") else {
        panic!("the daemoneye-ipc binary is built only with the `cli` feature");
    };
    binary
}

/// The `daemoneye-ipc` binary with a clean `DAEMONEYE_IPC_*` environment.
/// Only tests that require the `cli` feature (see Cargo.toml) may call this.
pub fn daemoneye_ipc() -> Command {
    command_for(Path::new(built_binary()))
}

/// The `daemoneye-ipc` binary run by `wrapper` (a command and its
/// arguments, such as `unshare --pid --fork --`), with a clean
/// `DAEMONEYE_IPC_*` environment.
#[cfg(unix)]
pub fn daemoneye_ipc_in(wrapper: &[&str]) -> Command {
    command_in(wrapper, Path::new(built_binary()))
}

/// A copy of the `daemoneye-ipc` binary that another user can reach and
/// run: in a fresh directory (0755) under [`shared_temp_root`], itself
/// 0755; removed when dropped. The build's own binary may sit in a private
/// directory (a checkout under a 0700 home, or in `mktemp -d`).
#[cfg(unix)]
pub struct BinaryForOthers {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

#[cfg(unix)]
impl BinaryForOthers {
    pub fn new() -> BinaryForOthers {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("dipc-bin")
            .tempdir_in(shared_temp_root())
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("daemoneye-ipc");
        std::fs::copy(built_binary(), &path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        BinaryForOthers { _dir: dir, path }
    }

    /// The copy, with a clean `DAEMONEYE_IPC_*` environment, as
    /// [`daemoneye_ipc`] gives the original.
    pub fn command(&self) -> Command {
        command_for(&self.path)
    }

    /// The copy run by `wrapper`, as [`daemoneye_ipc_in`] runs the original.
    pub fn command_in(&self, wrapper: &[&str]) -> Command {
        command_in(wrapper, &self.path)
    }
}

fn command_for(binary: &Path) -> Command {
    command_in(&[], binary)
}

/// `binary` run by `wrapper` (none, or a command and its arguments), with
/// a clean `DAEMONEYE_IPC_*` and `RUST_LOG` environment. Under emulation
/// the binary is the emulator's to run, inside the wrapper.
fn command_in(wrapper: &[&str], binary: &Path) -> Command {
    let runner = emulator();
    let mut words = wrapper.iter().copied().chain(runner.split_whitespace());
    let mut command = match words.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(words).arg(binary);
            command
        }
        None => Command::new(binary),
    };
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DAEMONEYE_IPC_") {
            command.env_remove(key);
        }
    }
    command.env_remove("RUST_LOG");
    command
}

/// This test binary, run again with only the (ignored) test `name`: how a
/// test starts a child process of its own (a server built with the library,
/// a client to kill), through the emulator where there is one.
pub fn rerun_test_binary(name: &str) -> Command {
    let runner = emulator();
    let mut runner = runner.split_whitespace();
    let test_binary = std::env::current_exe().unwrap();
    let mut command = match runner.next() {
        Some(emulator) => {
            let mut command = Command::new(emulator);
            command.args(runner).arg(&test_binary);
            command
        }
        None => Command::new(&test_binary),
    };
    command.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ]);
    command
}

/// Under user-mode emulation (qemu-user without binfmt_misc) a child built
/// for the target must be started through the emulator too: the command
/// prefix from `DAEMONEYE_TEST_RUNNER` (set by ci/cross-test.sh), else from
/// the target's `CARGO_TARGET_<TRIPLE>_RUNNER` (set in cross's images).
/// Windows children need none: Wine starts them itself.
pub fn emulator() -> String {
    if cfg!(windows) {
        return String::new();
    }
    let target_runner = format!(
        "CARGO_TARGET_{}_RUNNER",
        env!("DAEMONEYE_BUILD_TARGET")
            .to_uppercase()
            .replace(['-', '.'], "_")
    );
    std::env::var("DAEMONEYE_TEST_RUNNER")
        .or_else(|_| std::env::var(target_runner))
        .unwrap_or_default()
}

/// A running `daemoneye-ipc serve`, logging at debug level to a file the
/// test can read. Killed when dropped.
pub struct ServerProcess {
    child: Child,
    pub endpoint: String,
    pub transport: TransportKind,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl ServerProcess {
    /// Starts `serve` on `endpoint` with `transport` and extra `args`, and
    /// waits until it is listening.
    pub fn start(endpoint: &str, transport: TransportKind, args: &[&str]) -> ServerProcess {
        let mut server = ServerProcess::spawn(endpoint, transport, args);
        server.wait_until_listening();
        server
    }

    /// Starts `serve` without waiting (for tests that expect it to fail).
    pub fn spawn(endpoint: &str, transport: TransportKind, args: &[&str]) -> ServerProcess {
        let mut server = ServerProcess::spawn_with(
            endpoint,
            &[],
            &[&["--transport", transport.name()], args].concat(),
        );
        server.transport = transport;
        server
    }

    /// Starts `serve` with extra environment variables (`DAEMONEYE_IPC_*`
    /// among them, as an operator would set them) and waits until it is
    /// listening. Its transport is whatever the environment and `args` say.
    pub fn start_with_env(endpoint: &str, env: &[(&str, &str)], args: &[&str]) -> ServerProcess {
        let mut server = ServerProcess::spawn_with(endpoint, env, args);
        server.wait_until_listening();
        server
    }

    /// Starts `serve` run by `wrapper` (see [`daemoneye_ipc_in`]) and waits
    /// until it is listening.
    #[cfg(unix)]
    pub fn start_in(
        wrapper: &[&str],
        endpoint: &str,
        transport: TransportKind,
        args: &[&str],
    ) -> ServerProcess {
        let mut server = ServerProcess::spawn_command(
            daemoneye_ipc_in(wrapper),
            endpoint,
            &[],
            &[&["--transport", transport.name()], args].concat(),
        );
        server.transport = transport;
        server.wait_until_listening();
        server
    }

    fn spawn_with(endpoint: &str, env: &[(&str, &str)], args: &[&str]) -> ServerProcess {
        ServerProcess::spawn_command(daemoneye_ipc(), endpoint, env, args)
    }

    fn spawn_command(
        mut command: Command,
        endpoint: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> ServerProcess {
        let log_dir = tempfile::tempdir().unwrap();
        let log = log_dir.path().join("server.log");
        let child = command
            .args(["serve", "--endpoint", endpoint])
            // Windows has no SIGUSR1: the counters are logged every 100 ms
            // instead (see `counters`).
            .args(if cfg!(windows) {
                &["--counters-interval-ms", "100"][..]
            } else {
                &[]
            })
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "daemoneye_ipc=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let transport = env
            .iter()
            .find(|(var, _)| *var == "DAEMONEYE_IPC_TRANSPORT")
            .map_or_else(TransportKind::default_for_build, |(_, name)| {
                name.parse().unwrap()
            });
        ServerProcess {
            child,
            endpoint: endpoint.to_owned(),
            transport,
            log,
            _log_dir: log_dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the server has logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// When the server logged each line containing `needle`, by its own
    /// clock: the lines' timestamps (RFC 3339, UTC, microseconds) as time
    /// since the first such line. Exact however late a test looks.
    pub fn logged_at(&self, needle: &str) -> Vec<Duration> {
        let times = self.logged_times(needle);
        let Some(&first) = times.first() else {
            return Vec::new();
        };
        times.into_iter().map(|time| since(first, time)).collect()
    }

    /// By the server's clock, from the first line containing `from` to the
    /// first line after it containing `to`.
    pub fn logged_between(&self, from: &str, to: &str) -> Duration {
        let logs = self.logs();
        let mut lines = logs.lines();
        let start = lines
            .by_ref()
            .find(|line| line.contains(from))
            .unwrap_or_else(|| panic!("no line with {from:?}: {logs}"));
        let end = lines
            .find(|line| line.contains(to))
            .unwrap_or_else(|| panic!("no line with {to:?} after {from:?}: {logs}"));
        since(time_of_line(start), time_of_line(end))
    }

    /// By the wall clock this process and the server share: from `instant`
    /// (a time of day, see [`time_of_day`]) to the first line containing
    /// `needle`.
    pub fn logged_after(&self, instant: Duration, needle: &str) -> Duration {
        let logged = *self
            .logged_times(needle)
            .first()
            .unwrap_or_else(|| panic!("no line with {needle:?}: {}", self.logs()));
        since(instant, logged)
    }

    /// The times of day (UTC) of the lines containing `needle`.
    fn logged_times(&self, needle: &str) -> Vec<Duration> {
        self.logs()
            .lines()
            .filter(|line| line.contains(needle))
            .map(time_of_line)
            .collect()
    }

    /// Waits until `needle` appears in the log at least `count` times.
    pub fn wait_for_log(&mut self, needle: &str, count: usize) {
        let what = format!("{count} log line(s) containing {needle:?}");
        wait_until(&what, PATIENCE, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "server exited ({status}) while waiting for {what}; log:\n{}",
                    self.logs()
                );
            }
            (self.logs().matches(needle).count() >= count).then_some(())
        });
    }

    fn wait_until_listening(&mut self) {
        self.wait_for_log("listening", 1);
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits for the process to exit on its own.
    pub fn wait_for_exit(&mut self) -> ExitStatus {
        wait_until("the server to exit", PATIENCE, || {
            self.child.try_wait().unwrap()
        })
    }

    /// SIGTERM (Unix), then waits for the exit.
    #[cfg(unix)]
    pub fn terminate(&mut self) -> ExitStatus {
        use rustix::process::{Pid, Signal, kill_process};
        let pid = Pid::from_raw(self.child.id() as i32).unwrap();
        kill_process(pid, Signal::TERM).unwrap();
        self.wait_for_exit()
    }

    /// The server's counters, as `serve` logs them on SIGUSR1 (on Windows
    /// every 100 ms): every numeric field of the next such log line, by name
    /// (`accepted`, `bytes_in`, ...).
    pub fn counters(&mut self) -> std::collections::HashMap<String, u64> {
        const MARKER: &str = ": counters ";
        let before = self.logs().matches(MARKER).count();
        self.ask_for_counters();
        self.wait_for_log(MARKER, before + 1);
        let logs = self.logs();
        let line = logs
            .lines()
            .filter(|line| line.contains(MARKER))
            .nth(before)
            .expect("the counters line just waited for");
        line.split_whitespace()
            .filter_map(|field| {
                let (name, value) = field.split_once('=')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    /// The counters line of a server started with `--log-format json`, on
    /// SIGUSR1 (on Windows the next periodic one): one JSON object with
    /// every counter a field.
    pub fn counters_json(&mut self) -> serde_json::Value {
        const MARKER: &str = r#""message":"counters""#;
        let before = self.logs().matches(MARKER).count();
        self.ask_for_counters();
        self.wait_for_log(MARKER, before + 1);
        let logs = self.logs();
        let line = logs
            .lines()
            .filter(|line| line.contains(MARKER))
            .nth(before)
            .expect("the counters line just waited for");
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// The counters `serve` logged as it shut down (after [`terminate`]).
    ///
    /// [`terminate`]: Self::terminate
    pub fn counters_at_exit(&self) -> std::collections::HashMap<String, u64> {
        let logs = self.logs();
        let line = logs
            .lines()
            .rfind(|line| line.contains(": counters ") && line.contains("at shutdown"))
            .unwrap_or_else(|| panic!("no counters at shutdown: {logs}"));
        line.split_whitespace()
            .filter_map(|field| {
                let (name, value) = field.split_once('=')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    /// Unix: SIGUSR1, which makes `serve` log its counters. Windows: nothing
    /// (it logs them every 100 ms).
    fn ask_for_counters(&self) {
        #[cfg(unix)]
        {
            use rustix::process::{Pid, Signal, kill_process};
            let pid = Pid::from_raw(self.child.id() as i32).unwrap();
            kill_process(pid, Signal::USR1).unwrap();
        }
    }

    /// SIGKILL: no cleanup runs.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// While this server runs, a second `serve` on `endpoint` (this one's,
    /// possibly written another way) with each backend is refused: exit 1,
    /// "in use by a running server". This server still answers afterwards.
    pub fn assert_second_servers_refused(&self, endpoint: &str) {
        let first = self.transport;
        for second in transports() {
            let output = daemoneye_ipc()
                .args([
                    "serve",
                    "--endpoint",
                    endpoint,
                    "--transport",
                    second.name(),
                ])
                .output()
                .unwrap();
            assert_eq!(output.status.code(), Some(1), "{first} then {second}");
            let message = String::from_utf8_lossy(&output.stderr);
            assert!(
                message.contains("is in use by a running server"),
                "{first} then {second}: {message}"
            );
            assert!(
                !message.contains("ready") && !message.contains("listening"),
                "a refused start never says it was ready: {message}"
            );
        }
        let client = daemoneye_ipc::IpcClient::new(self.client_config(first)).unwrap();
        let answer = block_on(client.send(quick_task("first-unharmed"))).unwrap();
        assert!(answer.success, "{first}: the first server still answers");
    }

    /// A client config for this server's endpoint, with `transport`.
    pub fn client_config(&self, transport: TransportKind) -> IpcConfig {
        IpcConfig {
            transport,
            endpoint_path: self.endpoint.clone(),
            ..IpcConfig::default()
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A task the real collector answers quickly: this process's own entry.
pub fn quick_task(task_id: &str) -> DetectionTask {
    DetectionTask {
        task_id: task_id.to_owned(),
        task_type: daemoneye_ipc::TaskType::EnumerateProcesses.into(),
        process_filter: Some(daemoneye_ipc::proto::ProcessFilter {
            pids: vec![std::process::id()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The bytes of one frame carrying `task`, with default settings.
pub fn frame_bytes(task: &DetectionTask) -> Vec<u8> {
    let mut wire = BytesMut::new();
    encode_message(task, FrameSettings::DEFAULT, &mut wire).unwrap();
    wire.to_vec()
}

/// A byte-level client, for sending what the library never would.
pub struct RawClient {
    #[cfg(unix)]
    stream: tokio::net::UnixStream,
    #[cfg(windows)]
    stream: tokio::net::windows::named_pipe::NamedPipeClient,
    buf: BytesMut,
    codec: ClientCodec,
    /// The server's notice, if it closed the connection with one (a result
    /// for no task, saying why it would not serve this connection).
    pub notice: Option<String>,
    /// What this client wrote, read back as tasks, to tell the answer to a
    /// task with an empty id from a notice.
    sent: BytesMut,
    sent_tasks: daemoneye_ipc::frame::codec::ServerCodec,
    empty_ids_sent: usize,
}

impl RawClient {
    pub async fn connect(endpoint: &str) -> RawClient {
        #[cfg(unix)]
        let stream = tokio::net::UnixStream::connect(endpoint).await.unwrap();
        // Every instance can be briefly taken (ERROR_PIPE_BUSY) between the
        // server's accept and its next instance: retry, as a client must.
        #[cfg(windows)]
        let stream = eventually("a free pipe instance", PATIENCE, || {
            match tokio::net::windows::named_pipe::ClientOptions::new().open(endpoint) {
                Ok(stream) => Some(stream),
                Err(error) if error.raw_os_error() == Some(231) => None,
                Err(error) => panic!("connecting to {endpoint}: {error}"),
            }
        })
        .await;
        RawClient {
            stream,
            buf: BytesMut::new(),
            codec: ClientCodec::new(FrameSettings::DEFAULT),
            notice: None,
            sent: BytesMut::new(),
            sent_tasks: daemoneye_ipc::frame::codec::ServerCodec::new(FrameSettings::DEFAULT),
            empty_ids_sent: 0,
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.sent.extend_from_slice(bytes);
        // Garbage stops the count: what follows is no task anyway.
        while let Ok(Some(task)) = self.sent_tasks.decode(&mut self.sent) {
            self.empty_ids_sent += usize::from(task.task_id.is_empty());
        }
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// The next result, or `None` if the server closed the connection
    /// (cleanly, or by a reset because our unread request was discarded),
    /// with or without a notice saying why (kept in [`notice`](Self::notice)).
    /// Panics on a bad frame, another I/O error, or silence past `deadline`.
    pub async fn read_reply(&mut self, deadline: Duration) -> Option<DetectionResult> {
        tokio::time::timeout(deadline, async {
            loop {
                if let Some(result) = self
                    .codec
                    .decode(&mut self.buf)
                    .expect("the server sends valid frames")
                {
                    if result.task_id.is_empty() {
                        if self.empty_ids_sent == 0 {
                            self.notice = result.error_message;
                            continue;
                        }
                        self.empty_ids_sent -= 1;
                    }
                    return Some(result);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) => return None,
                    Ok(_) => {}
                    Err(error) if is_closed(&error) => return None,
                    Err(error) => panic!("unexpected read error: {error}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no result and no close within {deadline:?}"))
    }

    /// The next result; panics if the connection closes instead.
    pub async fn read_result(&mut self, deadline: Duration) -> DetectionResult {
        self.read_reply(deadline)
            .await
            .expect("an answer, not a closed connection")
    }

    /// Waits for the server to close the connection, discarding anything it
    /// sends; returns how long that took. Panics after `deadline`.
    pub async fn closed_within(&mut self, deadline: Duration) -> Duration {
        let start = Instant::now();
        tokio::time::timeout(deadline, async {
            let mut sink = [0u8; 4096];
            loop {
                match self.stream.read(&mut sink).await {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(error) if is_closed(&error) => return,
                    Err(error) => panic!("unexpected read error: {error}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the server did not close the connection within {deadline:?}"));
        start.elapsed()
    }
}

/// A connection the peer closed: EOF, or a reset when it closed with our
/// bytes unread.
fn is_closed(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

/// Resident set size of a process, in bytes (Linux).
#[cfg(target_os = "linux")]
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

/// The time of day (UTC) of a log line, from its timestamp (RFC 3339).
fn time_of_line(line: &str) -> Duration {
    let time = line
        .split_whitespace()
        .next()
        .and_then(|stamp| stamp.split_once('T'))
        .map(|(_, time)| time.trim_end_matches('Z'))
        .unwrap_or_else(|| panic!("no timestamp on {line:?}"));
    let [hours, minutes, seconds]: [&str; 3] = time
        .split(':')
        .collect::<Vec<_>>()
        .try_into()
        .unwrap_or_else(|_| panic!("not a time: {time:?}"));
    let whole = hours.parse::<u64>().unwrap() * 3600 + minutes.parse::<u64>().unwrap() * 60;
    Duration::from_secs(whole) + Duration::from_secs_f64(seconds.parse().unwrap())
}

/// The time of day (UTC) now, by the wall clock the server's log uses.
pub fn time_of_day() -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    Duration::from_nanos((now.as_nanos() % (24 * 3600 * 1_000_000_000)) as u64)
}

/// From one time of day to a later one (across midnight if need be).
fn since(from: Duration, to: Duration) -> Duration {
    const DAY: Duration = Duration::from_secs(24 * 3600);
    if to < from {
        to + DAY - from
    } else {
        to - from
    }
}

/// Async `wait_until`: polls `probe` until it returns `Some`, or panics
/// after `deadline`.
pub async fn eventually<T>(
    what: &str,
    deadline: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `future` on a fresh multi-threaded runtime.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    runtime().block_on(future)
}
