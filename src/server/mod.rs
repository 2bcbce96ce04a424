//! [`IpcServer`]: the collector's side. Binds the endpoint, accepts agents,
//! reads [`DetectionTask`]s, runs the handler, writes
//! [`DetectionResult`](crate::DetectionResult)s.
//!
//! What the server does is decided once, for every backend: the endpoint
//! hardening in [`crate::endpoint`], the rules of a connection in the policy
//! core (`src/policy/`), peer checks, telemetry and shutdown here. Two
//! drivers feed the policy core: `async_driver` for the `interprocess` and
//! `tokio` backends (a Tokio task per connection), and `blocking_driver`
//! for `legacy` (a thread per connection, handlers still run on the
//! caller's runtime).

#[cfg(async_backend)]
mod async_driver;
#[cfg(feature = "ipc-legacy")]
mod blocking_driver;
pub(crate) mod slots;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{IpcConfig, TransportKind};
use crate::endpoint::{Endpoint, SocketGroup};
use crate::error::IpcError;
use crate::peer::PeerPolicy;
use crate::policy::budget::MemoryBudget;
use crate::policy::encodings::SharedEncodings;
use crate::policy::server::ConnectionLimits;
use crate::proto::DetectionTask;
use crate::telemetry::{Counters, LogThrottle, ServerStats};
use crate::transport::PeerCredentials;

pub use crate::policy::server::Reply;

use self::slots::Slots;

/// Tasks one connection may have in flight before the server stops reading
/// from it (backpressure), unless [`ServerBuilder::max_in_flight_per_connection`]
/// says otherwise.
pub const DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION: usize = 32;

/// Bytes a server holds for tasks in flight, every connection together,
/// before its connections stop reading, unless
/// [`ServerBuilder::max_bytes_in_flight`] says otherwise: 64 MiB.
pub const DEFAULT_MAX_BYTES_IN_FLIGHT: usize = 64 * 1024 * 1024;

/// Backoff between failed accepts (fd exhaustion, for instance).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Answers tasks. Implemented for every
/// `Fn(DetectionTask) -> impl Future<Output = R>` where `R` is a
/// [`DetectionResult`](crate::DetectionResult) or an `Arc<DetectionResult>` (see [`Reply`]), so an
/// async closure works:
///
/// ```
/// # use daemoneye_ipc::{DetectionResult, DetectionTask, server::TaskHandler};
/// fn assert_handler(_: impl TaskHandler) {}
/// assert_handler(|task: DetectionTask| async move {
///     DetectionResult { task_id: task.task_id, success: true, ..Default::default() }
/// });
/// ```
///
/// The server answers with the task's own `task_id` whatever the handler
/// sets, since that id is how the client matches answers.
///
/// A handler must not block: the server polls it first where the task was
/// read (a handler that is done at once is answered without a task of its
/// own), so blocking there would stall that connection. Put blocking or
/// CPU-heavy work on `tokio::task::spawn_blocking`, as `daemoneye-ipc serve`
/// does. A handler that has not finished within `task_timeout_ms` is
/// answered with an error and its future is dropped.
pub trait TaskHandler: Send + Sync + 'static {
    /// Runs one task. Several run at once: a handler that has to wait
    /// continues as a task of its own while its connection reads the next.
    fn handle(&self, task: DetectionTask) -> impl Future<Output = Reply> + Send;
}

impl<F, Fut> TaskHandler for F
where
    F: Fn(DetectionTask) -> Fut + Send + Sync + 'static,
    Fut: Future + Send,
    Fut::Output: Into<Reply>,
{
    fn handle(&self, task: DetectionTask) -> impl Future<Output = Reply> + Send {
        let answer = self(task);
        async move { answer.await.into() }
    }
}

/// Options beyond [`IpcConfig`].
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    config: IpcConfig,
    allowed_uids: Vec<u32>,
    max_in_flight_per_connection: usize,
    max_bytes_in_flight: usize,
}

impl ServerBuilder {
    /// Unix: also admit peers running as these uids. The server's own
    /// effective uid and root are always admitted. Ignored on Windows, where
    /// the pipe's security descriptor decides.
    pub fn allow_uids(mut self, uids: impl IntoIterator<Item = u32>) -> Self {
        self.allowed_uids.extend(uids);
        self
    }

    /// Tasks one connection may have in flight (at least 1). When reached,
    /// the server reads nothing more from that connection until a result
    /// has gone out.
    pub fn max_in_flight_per_connection(mut self, limit: usize) -> Self {
        self.max_in_flight_per_connection = limit.max(1);
        self
    }

    /// Bytes the server holds for tasks in flight, every connection together
    /// (tasks decoded and not yet answered, results encoded and not yet
    /// written, each counted by its frame's size). Past it, connections that
    /// have something in flight stop reading until results have been
    /// written; a connection with nothing in flight may still take one
    /// task, so none is starved. Default [`DEFAULT_MAX_BYTES_IN_FLIGHT`];
    /// [`ServerStats::bytes_held`] says how much is held.
    pub fn max_bytes_in_flight(mut self, bytes: usize) -> Self {
        self.max_bytes_in_flight = bytes;
        self
    }

    /// Validates the config, secures and binds the endpoint, and starts
    /// accepting. Must be called within a Tokio runtime: handlers run on it,
    /// whichever backend carries the bytes.
    pub async fn bind<H: TaskHandler>(self, handler: H) -> Result<IpcServer, IpcError> {
        let ServerBuilder {
            config,
            allowed_uids,
            max_in_flight_per_connection,
            max_bytes_in_flight,
        } = self;
        config.validate()?;
        let endpoint = Endpoint::parse(&config.endpoint_path)?;
        // A live server on the name is refused here on Windows; on Unix,
        // `endpoint::unix::bind` finds out under the endpoint's lock.
        #[cfg(windows)]
        crate::endpoint::windows::refuse_if_served(&endpoint).await?;
        let transport = config.transport;
        let socket_group = match config.socket_group.as_deref() {
            // validate() has resolved it once already.
            Some(group) => Some(SocketGroup::resolve(group).map_err(|requirement| {
                IpcError::InvalidConfig {
                    field: "socket_group",
                    value: format!("{group:?}"),
                    origin: None,
                    requirement,
                }
            })?),
            None => None,
        };
        let shared = Arc::new(Shared {
            limits: ConnectionLimits {
                settings: config.frame_settings(),
                read_timeout: config.read_timeout(),
                write_timeout: config.write_timeout(),
                task_timeout: config.task_timeout(),
                max_in_flight: max_in_flight_per_connection,
            },
            slots: Slots::new(config.max_connections, config.accept_timeout()),
            accept_timeout: config.accept_timeout(),
            peers: PeerPolicy::new(allowed_uids)
                .admitting_group(socket_group.as_ref().map(|group| group.gid)),
            socket_group,
            counters: Arc::new(Counters::default()),
            budget: Arc::new(MemoryBudget::new(max_bytes_in_flight)),
            encodings: Arc::default(),
            peer_log: LogThrottle::per_second(),
            limit_log: LogThrottle::per_second(),
            stop_accepting: CancellationToken::new(),
            accepting_stopped: CancellationToken::new(),
            stop_reading: CancellationToken::new(),
            abort: CancellationToken::new(),
            next_connection_id: AtomicU64::new(1),
        });
        let tasks = TaskTracker::new();
        let handler = Arc::new(handler);
        let started = match transport {
            #[cfg(feature = "ipc-legacy")]
            TransportKind::Legacy => {
                blocking_driver::start(&endpoint, shared.clone(), handler, tasks.clone())?
            }
            #[cfg(async_backend)]
            _ => async_driver::start(transport, &endpoint, shared.clone(), handler, tasks.clone())?,
            #[allow(unreachable_patterns)] // Reached only in a legacy-only build.
            _ => unreachable!("IpcConfig::validate refuses a transport not compiled in"),
        };
        tracing::info!(
            transport = %transport,
            endpoint = %endpoint,
            max_connections = config.max_connections,
            max_frame_bytes = config.max_frame_bytes,
            crc32 = %config.crc32_variant,
            "listening"
        );
        Ok(IpcServer {
            endpoint,
            transport,
            shared,
            tasks,
            #[cfg(unix)]
            bound_endpoint: Some(started.endpoint),
            wake: started.wake,
        })
    }
}

/// What a driver hands the server when it has bound the endpoint.
struct Started {
    /// Unix: the socket file (removed when dropped) and the endpoint lock.
    #[cfg(unix)]
    endpoint: crate::endpoint::unix::BoundEndpoint,
    /// Wakes the driver's threads, which block in the OS rather than watch
    /// the cancellation tokens (the blocking driver).
    wake: DriverWake,
}

/// How to get the driver's attention after a cancellation token fired.
enum DriverWake {
    /// The async driver's tasks watch the tokens themselves.
    #[cfg(async_backend)]
    Tokens,
    /// The blocking driver's threads are woken by this.
    #[cfg(feature = "ipc-legacy")]
    Threads(blocking_driver::Wake),
}

impl std::fmt::Debug for DriverWake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            #[cfg(async_backend)]
            DriverWake::Tokens => f.write_str("Tokens"),
            #[cfg(feature = "ipc-legacy")]
            DriverWake::Threads(_) => f.write_str("Threads"),
        }
    }
}

fn bind_error(endpoint: &Endpoint, transport: TransportKind, source: std::io::Error) -> IpcError {
    // A name another server holds: AddrInUse for sockets; for pipes created
    // with FILE_FLAG_FIRST_PIPE_INSTANCE, ERROR_ACCESS_DENIED (5) or
    // ERROR_PIPE_BUSY (231).
    let in_use = source.kind() == std::io::ErrorKind::AddrInUse
        || (cfg!(windows) && matches!(source.raw_os_error(), Some(5 | 231)));
    if in_use {
        return IpcError::EndpointInUse {
            endpoint: endpoint.to_string(),
        };
    }
    IpcError::Bind {
        endpoint: endpoint.to_string(),
        transport: transport.name(),
        source,
    }
}

/// A running server. Dropping it stops accepting, aborts connections and
/// removes the socket file; [`shutdown`](Self::shutdown) does the same
/// gracefully.
#[derive(Debug)]
pub struct IpcServer {
    endpoint: Endpoint,
    transport: TransportKind,
    shared: Arc<Shared>,
    tasks: TaskTracker,
    /// Released as soon as a graceful shutdown starts.
    #[cfg(unix)]
    bound_endpoint: Option<crate::endpoint::unix::BoundEndpoint>,
    wake: DriverWake,
}

/// What a graceful shutdown achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// True if every in-flight task finished and was answered within the
    /// grace period; false if some connections had to be cut.
    pub drained: bool,
    /// The counters at the end.
    pub stats: ServerStats,
}

impl IpcServer {
    /// A builder for options beyond [`IpcConfig`] (peer allow-list,
    /// per-connection in-flight limit).
    pub fn builder(config: IpcConfig) -> ServerBuilder {
        ServerBuilder {
            config,
            allowed_uids: Vec::new(),
            max_in_flight_per_connection: DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION,
            max_bytes_in_flight: DEFAULT_MAX_BYTES_IN_FLIGHT,
        }
    }

    /// Binds with default options. See [`ServerBuilder::bind`].
    pub async fn bind<H: TaskHandler>(
        config: IpcConfig,
        handler: H,
    ) -> Result<IpcServer, IpcError> {
        IpcServer::builder(config).bind(handler).await
    }

    /// The endpoint being served.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The backend serving.
    pub fn transport(&self) -> TransportKind {
        self.transport
    }

    /// The counters, with the active transport's name.
    pub fn stats(&self) -> ServerStats {
        let held = self.shared.budget.held() as u64;
        self.shared.counters.snapshot(self.transport.name(), held)
    }

    /// Stops accepting and reading new tasks, lets tasks in flight finish
    /// and their results go out for up to `grace`, then cuts whatever is
    /// left.
    ///
    /// The socket file is removed at once, with the listener: a replacement
    /// server may bind the endpoint while this one drains, and this one
    /// never removes the replacement's socket.
    ///
    /// Accepting ends before reading does. A client whose task the drain
    /// cuts reconnects at once; were this server still listening, it would
    /// be accepted only to be cut again, and lose a second task. It finds
    /// no listener instead, and waits for the replacement.
    pub async fn shutdown(mut self, grace: Duration) -> ShutdownReport {
        tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down");
        self.shared.stop_accepting.cancel();
        self.wake_driver();
        self.release_endpoint();
        self.shared.accepting_stopped.cancelled().await;
        self.shared.stop_reading.cancel();
        self.wake_driver();
        self.tasks.close();
        let drained = tokio::time::timeout(grace, self.tasks.wait()).await.is_ok();
        if !drained {
            tracing::warn!("grace period over with tasks in flight; closing their connections");
            self.shared.abort.cancel();
            self.wake_driver();
            self.tasks.wait().await;
        }
        let stats = self.stats();
        tracing::info!(drained, "shut down");
        ShutdownReport { drained, stats }
    }

    /// Removes the socket file and releases the endpoint's lock now. (A
    /// Windows pipe name is released with the listener's last instance.)
    fn release_endpoint(&mut self) {
        #[cfg(unix)]
        drop(self.bound_endpoint.take());
    }

    fn wake_driver(&self) {
        match &self.wake {
            #[cfg(async_backend)]
            DriverWake::Tokens => {}
            #[cfg(feature = "ipc-legacy")]
            DriverWake::Threads(wake) => wake.wake_all(),
        }
    }
}

impl Drop for IpcServer {
    fn drop(&mut self) {
        self.shared.stop_accepting.cancel();
        self.shared.stop_reading.cancel();
        self.shared.abort.cancel();
        self.wake_driver();
    }
}

/// State every connection shares, whichever driver serves it.
#[derive(Debug)]
struct Shared {
    limits: ConnectionLimits,
    slots: Slots,
    accept_timeout: Duration,
    peers: PeerPolicy,
    /// Unix: whose members may connect besides the allowed uids.
    #[cfg_attr(windows, allow(dead_code))]
    socket_group: Option<SocketGroup>,
    counters: Arc<Counters>,
    budget: Arc<MemoryBudget>,
    /// Shared results' encodings, made once for every connection.
    encodings: Arc<SharedEncodings>,
    /// Rejections are counted always, logged at most once a second.
    peer_log: LogThrottle,
    limit_log: LogThrottle,
    /// Shutdown, first step: stop accepting and drop the listener.
    stop_accepting: CancellationToken,
    /// Fired by the accept loop once its listener is gone (by a guard it
    /// drops after the listener, so also if it panics).
    accepting_stopped: CancellationToken,
    /// Graceful shutdown, once accepting has stopped: stop reading, finish
    /// what is in flight.
    stop_reading: CancellationToken,
    /// Hard stop: drop everything now.
    abort: CancellationToken,
    next_connection_id: AtomicU64,
}

impl Shared {
    fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Relaxed)
    }

    /// Admits a peer by its credentials, or counts its refusal (and logs
    /// it, at most once a second).
    fn admit_peer(&self, peer: std::io::Result<PeerCredentials>) -> bool {
        match self.peers.check(peer) {
            Ok(()) => true,
            Err(reason) => {
                crate::telemetry::bump(&self.counters.rejected_peer);
                if let Some(rejected) = self.peer_log.admit(std::time::Instant::now()) {
                    tracing::warn!(
                        rejected_since_last_line = rejected,
                        "peer rejected: it {reason}"
                    );
                }
                false
            }
        }
    }

    /// Counts a connection closed without a slot (and logs it, at most once
    /// a second).
    fn refused_for_limit(&self) {
        crate::telemetry::bump(&self.counters.rejected_limit);
        if let Some(rejected) = self.limit_log.admit(std::time::Instant::now()) {
            tracing::warn!(
                rejected_since_last_line = rejected,
                accept_timeout_ms = self.accept_timeout.as_millis() as u64,
                "no connection slot freed in time (max_connections reached); closing"
            );
        }
    }

    /// Counts and logs how a served connection ended.
    fn connection_ended(&self, outcome: Result<(), IpcError>) {
        match outcome {
            Ok(()) => tracing::debug!("closed"),
            Err(error) => {
                if self.counters.count_connection_error(&error) {
                    tracing::warn!(%error, "closing connection");
                } else {
                    tracing::info!(%error, "connection ended");
                }
            }
        }
    }
}

/// A handler started on a task: finished already, or still running.
enum Handling<F> {
    Finished(HandlerOutcome),
    Running(Pin<Box<F>>),
}

/// Starts the handler on `task` with one poll: a handler that finishes at
/// once (nothing to wait for) is answered without the cost of a task of its
/// own; one that must wait is handed back, to be spawned and polled with a
/// real waker from then on. A panic on that first poll is caught.
fn start_handler<H: TaskHandler>(
    handler: &Arc<H>,
    task: DetectionTask,
) -> Handling<impl Future<Output = Reply> + Send + 'static> {
    let handler = handler.clone();
    let mut running = Box::pin(async move { handler.handle(task).await });
    let mut first_poll = Context::from_waker(Waker::noop());
    match std::panic::catch_unwind(AssertUnwindSafe(|| running.as_mut().poll(&mut first_poll))) {
        Ok(Poll::Ready(reply)) => Handling::Finished(Ok(reply)),
        Ok(Poll::Pending) => Handling::Running(running),
        Err(panic) => Handling::Finished(Err(panicked(&*panic))),
    }
}

/// How a panic is described in the answer and the log.
fn panicked(panic: &(dyn std::any::Any + Send)) -> String {
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message");
    format!("panicked: {message}")
}

/// A handler's result as the policy core takes it: the reply, or why there
/// is none.
type HandlerOutcome = Result<Reply, String>;
