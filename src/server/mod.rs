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
pub(crate) mod budget;
pub(crate) mod connection;
pub(crate) mod slots;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{IpcConfig, TransportKind};
use crate::endpoint::{Endpoint, SocketGroup};
use crate::error::IpcError;
use crate::peer::Peer;
use crate::peer::PeerPolicy;
use crate::policy::acceptor::Refusal;
use crate::policy::encodings::SharedEncodings;
use crate::policy::server::ConnectionLimits;
use crate::proto::DetectionTask;
use crate::telemetry::{Counters, LogThrottle, ServerStats};

pub use crate::policy::server::Reply;

use self::budget::SharedBudget;
use self::slots::Slots;

/// Tasks one connection may have in flight before the server stops reading
/// from it (backpressure), unless [`ServerBuilder::max_in_flight_per_connection`]
/// says otherwise.
pub const DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION: usize = 32;

/// Bytes a server holds for tasks in flight, every connection together,
/// unless [`ServerBuilder::max_bytes_in_flight`] says otherwise: 64 MiB, or
/// four of the largest tasks' reservations if `max_frame_bytes` makes that
/// more (see [`ServerBuilder::max_bytes_in_flight`]).
pub const DEFAULT_MAX_BYTES_IN_FLIGHT: usize = 64 * 1024 * 1024;

/// Backoff between failed accepts (fd exhaustion, for instance).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long a shutdown waits for connections after it has cut them, before
/// it returns anyway (a handler blocking a `legacy` connection's thread can
/// hold that thread past any cancellation).
const ABORT_WAIT: Duration = Duration::from_secs(1);

/// A handler whose first poll (run where its task was read, to spare a
/// task of its own) takes longer than this has blocked its connection...
const INLINE_POLL_LIMIT: Duration = Duration::from_millis(2);

/// ...and once this many have within [`INLINE_POLL_WINDOW`], every handler
/// of the server runs as a task of its own from then on. One slow poll
/// proves little: on a busy machine the thread can lose its CPU in the
/// middle of a quick one (a benchmark pinning client and server to one CPU
/// saw it about once a run), and over weeks such polls would add up. A
/// handler that blocks does so every time.
const INLINE_POLL_STRIKES: u32 = 3;
const INLINE_POLL_WINDOW: Duration = Duration::from_secs(60);

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
/// does. A server whose handlers block that first poll for more than 2 ms
/// three times within a minute logs a warning naming the last task and
/// from then on starts every handler as a task of its own. A handler that has not finished within
/// `task_timeout_ms` is answered with an error and its future is dropped.
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
        // Not an `async` block: that would hold the closure's future twice
        // (captured, then awaited), and the future every task is boxed in
        // would double, past the allocator's per-thread cache.
        IntoReply { answer: self(task) }
    }
}

pin_project_lite::pin_project! {
    /// A closure handler's future, its output made a [`Reply`], polled in
    /// place.
    struct IntoReply<Fut> {
        #[pin]
        answer: Fut,
    }
}

impl<Fut> Future for IntoReply<Fut>
where
    Fut: Future,
    Fut::Output: Into<Reply>,
{
    type Output = Reply;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply> {
        self.project().answer.poll(cx).map(Into::into)
    }
}

/// Options beyond [`IpcConfig`].
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    config: IpcConfig,
    allowed_uids: Vec<u32>,
    max_in_flight_per_connection: usize,
    max_bytes_in_flight: Option<usize>,
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

    /// Bytes the server holds for tasks in flight, every connection
    /// together. Before a connection reads a task's body it reserves room
    /// for the task's frame and for the largest result frame
    /// (`max_frame_bytes` plus an 8-byte header); what the result does not
    /// use goes back once it is encoded, the rest as it is written. A
    /// reservation that does not fit waits, first come first served, and
    /// its connection reads nothing meanwhile. So the bytes held for tasks
    /// and results never exceed this, however large the results and
    /// however slowly peers read them; each connection also reads up to
    /// 8 KiB ahead of what it reserved (docs/security.md gives the whole
    /// bound). [`ServerStats::bytes_held`] says how much is held now.
    ///
    /// Default [`DEFAULT_MAX_BYTES_IN_FLIGHT`], or four times the largest
    /// reservation if that is more. [`bind`](Self::bind) refuses less than
    /// twice the largest result frame (one task of the largest size could
    /// never be read).
    pub fn max_bytes_in_flight(mut self, bytes: usize) -> Self {
        self.max_bytes_in_flight = Some(bytes);
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
        config.validate_server()?;
        if !config.task_timeout_answerable() {
            tracing::warn!(
                task_timeout_ms = config.task_timeout_ms,
                read_timeout_ms = config.read_timeout_ms,
                "task_timeout_ms is over five sixths of read_timeout_ms: an agent that waits \
                 read_timeout_ms gives up on a task that runs out of time before this collector's \
                 answer reaches it; lower task_timeout_ms unless the agents wait longer"
            );
        }
        let limits = ConnectionLimits {
            settings: config.frame_settings(),
            read_timeout: config.read_timeout(),
            write_timeout: config.write_timeout(),
            task_timeout: config.task_timeout(),
            max_in_flight: max_in_flight_per_connection,
        };
        let max_bytes_in_flight = max_bytes_in_flight
            .unwrap_or_else(|| DEFAULT_MAX_BYTES_IN_FLIGHT.max(4 * limits.largest_reservation()));
        if max_bytes_in_flight < limits.largest_reservation() {
            return Err(IpcError::InvalidConfig {
                field: "max_bytes_in_flight",
                value: max_bytes_in_flight.to_string(),
                origin: None,
                requirement: format!(
                    "must be at least {} bytes: a task and its result each take up to \
                     max_frame_bytes = {} plus an 8-byte header, and each task reserves both \
                     before it is read",
                    limits.largest_reservation(),
                    config.max_frame_bytes
                ),
            });
        }
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
            limits,
            max_connections: config.max_connections,
            slots: Slots::new(
                config.max_connections,
                (config.max_connections_per_peer > 0).then_some(config.max_connections_per_peer),
                config.accept_timeout(),
            ),
            accept_timeout: config.accept_timeout(),
            peers: PeerPolicy::new(allowed_uids)
                .admitting_group(socket_group.as_ref().map(|group| group.gid)),
            socket_group,
            counters: Arc::new(Counters::default()),
            budget: SharedBudget::new(max_bytes_in_flight),
            encodings: Arc::default(),
            inline_first_poll: AtomicBool::new(true),
            slow_first_polls: std::sync::Mutex::new(SlowPolls::default()),
            peer_log: LogThrottle::per_second(),
            limit_log: LogThrottle::per_second(),
            stop_accepting: CancellationToken::new(),
            accepting_stopped: CancellationToken::new(),
            stop_reading: CancellationToken::new(),
            abort: CancellationToken::new(),
            dropped: AtomicBool::new(false),
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
#[derive(Clone)]
enum DriverWake {
    /// The async driver's tasks watch the tokens themselves.
    #[cfg(async_backend)]
    Tokens,
    /// The blocking driver's threads are woken by this.
    #[cfg(feature = "ipc-legacy")]
    Threads(blocking_driver::Wake),
}

impl DriverWake {
    fn wake(&self) {
        match self {
            #[cfg(async_backend)]
            DriverWake::Tokens => {}
            #[cfg(feature = "ipc-legacy")]
            DriverWake::Threads(wake) => wake.wake_all(),
        }
    }
}

/// Held by the accept loop (task or thread) and dropped after its listener,
/// also when it unwinds or its task is dropped: accepting has stopped. If
/// the server was dropped meanwhile, its connections are cut then, not
/// before: a client that hears of the cut and binds a replacement, or asks
/// one, finds no instance of this server still listening (on Windows the
/// accept loop's waiting pipe instance would answer a replacement's probe
/// of the name, which then refuses to bind).
struct AcceptingStopped {
    shared: Arc<Shared>,
    wake: DriverWake,
}

impl Drop for AcceptingStopped {
    fn drop(&mut self) {
        self.shared.accepting_stopped.cancel();
        if self.shared.dropped.load(SeqCst) {
            self.shared.cut();
            self.wake.wake();
        }
    }
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
            max_bytes_in_flight: None,
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
    /// left, and returns within a second of that even if a connection has
    /// not stopped yet.
    ///
    /// The socket file is removed at once, with the listener: a replacement
    /// server may bind the endpoint while this one drains, and this one
    /// never removes the replacement's socket.
    ///
    /// Accepting ends before reading does. A client whose task the drain
    /// cuts reconnects at once; were this server still listening, it would
    /// be accepted only to be cut again, and lose a second task. It finds
    /// no listener instead, and waits for the replacement. (On Windows,
    /// accepting has ended once the pipe name takes no new client, which
    /// can take a moment after the listener is dropped; shutdown waits for
    /// that, up to a second, before it stops reading.)
    pub async fn shutdown(mut self, grace: Duration) -> ShutdownReport {
        tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down");
        self.shared.stop_accepting.cancel();
        self.wake_driver();
        self.release_endpoint();
        self.shared.accepting_stopped.cancelled().await;
        // So that a replacement can bind as soon as this returns.
        #[cfg(windows)]
        crate::endpoint::windows::until_not_listening(&self.endpoint).await;
        self.shared.stop_reading.cancel();
        self.wake_driver();
        self.tasks.close();
        let drained = tokio::time::timeout(grace, self.tasks.wait()).await.is_ok();
        if !drained {
            tracing::warn!("grace period over with tasks in flight; closing their connections");
            self.shared.abort.cancel();
            self.wake_driver();
            if tokio::time::timeout(ABORT_WAIT, self.tasks.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    still_running = self.tasks.len(),
                    "connections not stopped within a second of being cut (a handler blocking \
                     its connection's thread?); returning without them"
                );
            }
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
        self.wake.wake();
    }
}

impl Drop for IpcServer {
    // Stops accepting, and cuts every connection once the listener is gone
    // (`AcceptingStopped`), or at once if it already is.
    fn drop(&mut self) {
        // Said before accepting stops, so that the accept loop, ending,
        // sees it; if it ended before, its guard did not, and it is seen
        // here instead.
        self.shared.dropped.store(true, SeqCst);
        self.shared.stop_accepting.cancel();
        if self.shared.accepting_stopped.is_cancelled() {
            self.shared.cut();
        }
        self.wake_driver();
    }
}

/// The frame a server writes before it closes a connection it does not
/// serve, saying why (see [`Shared::notice`]); written once, best effort.
#[derive(Debug)]
struct Notice(bytes::Bytes);

/// How long a notice may take to be written: the connection is new, so its
/// buffer is empty and this is never reached but by a peer that is gone.
const NOTICE_WAIT: Duration = Duration::from_millis(100);

/// State every connection shares, whichever driver serves it.
#[derive(Debug)]
struct Shared {
    limits: ConnectionLimits,
    max_connections: usize,
    slots: Slots,
    accept_timeout: Duration,
    peers: PeerPolicy,
    /// Unix: whose members may connect besides the allowed uids.
    #[cfg_attr(windows, allow(dead_code))]
    socket_group: Option<SocketGroup>,
    counters: Arc<Counters>,
    budget: SharedBudget,
    /// Shared results' encodings, made once for every connection.
    encodings: Arc<SharedEncodings>,
    /// Whether handlers are first polled where their task was read (until
    /// they block there; see [`INLINE_POLL_LIMIT`]).
    inline_first_poll: AtomicBool,
    /// First polls that took longer than [`INLINE_POLL_LIMIT`] within
    /// [`INLINE_POLL_WINDOW`] of the first of them.
    slow_first_polls: std::sync::Mutex<SlowPolls>,
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
    /// The server was dropped: cut its connections once accepting has
    /// stopped (see [`AcceptingStopped`]).
    dropped: AtomicBool,
    next_connection_id: AtomicU64,
}

impl Shared {
    /// Stops reading and closes every connection (the driver must then be
    /// woken).
    fn cut(&self) {
        self.stop_reading.cancel();
        self.abort.cancel();
    }

    /// The guard the accept loop drops after its listener.
    fn accepting_stopped_guard(self: &Arc<Self>, wake: DriverWake) -> AcceptingStopped {
        AcceptingStopped {
            shared: self.clone(),
            wake,
        }
    }

    fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Relaxed)
    }

    /// Admits a peer by its credentials, or counts its refusal (and logs
    /// it, at most once a second) and returns the notice that tells the
    /// peer why.
    fn admit_peer(&self, peer: std::io::Result<Peer>) -> Result<(), Notice> {
        let reason = match self.peers.check(peer) {
            Ok(()) => return Ok(()),
            Err(reason) => reason,
        };
        crate::telemetry::bump(&self.counters.rejected_peer);
        if let Some(rejected) = self.peer_log.admit(Instant::now()) {
            tracing::warn!(
                rejected_since_last_line = rejected,
                "peer rejected: it {reason}"
            );
        }
        Err(self.notice(&format!("this agent {reason}")))
    }

    /// Counts a connection closed without a slot (and logs it, at most once
    /// a second): `refusal` if it was refused on arrival, `None` if no slot
    /// freed while it waited. Returns the notice that tells the peer why.
    fn refused_for_limit(&self, refusal: Option<Refusal>) -> Notice {
        crate::telemetry::bump(&self.counters.rejected_limit);
        let accept_timeout_ms = self.accept_timeout.as_millis() as u64;
        let max_connections = self.max_connections;
        let (logged, why) = match refusal {
            Some(Refusal::PeerLimit { uid, limit }) => (
                format!("this peer holds max_connections_per_peer = {limit} connections already"),
                format!(
                    "uid {uid} holds max_connections_per_peer = {limit} connections already; \
                     close one, or raise the collector's limit"
                ),
            ),
            Some(Refusal::RoomFull) => (
                "every slot and every place in the waiting room is taken (max_connections \
                 reached)"
                    .to_owned(),
                format!(
                    "every connection slot and every place in the waiting room is taken \
                     (max_connections = {max_connections}); retry later"
                ),
            ),
            None => (
                "no connection slot freed in time (max_connections reached)".to_owned(),
                format!(
                    "no connection slot freed within accept_timeout_ms = {accept_timeout_ms} \
                     (max_connections = {max_connections} reached); retry later"
                ),
            ),
        };
        if let Some(rejected) = self.limit_log.admit(Instant::now()) {
            tracing::warn!(
                rejected_since_last_line = rejected,
                accept_timeout_ms,
                "{logged}; closing"
            );
        }
        self.notice(&why)
    }

    /// The frame that tells a peer why its connection is closed unserved: a
    /// result for no task (an empty `task_id`; see `src/policy/client.rs`).
    fn notice(&self, why: &str) -> Notice {
        let notice = crate::proto::DetectionResult {
            success: false,
            error_message: Some(why.to_owned()),
            ..Default::default()
        };
        let mut frame = bytes::BytesMut::new();
        // Small; max_frame_bytes is at least 1024.
        let _ = crate::frame::encode_message(&notice, self.limits.settings, &mut frame);
        Notice(frame.freeze())
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

/// The span every line about one connection is logged in.
fn connection_span(id: u64, peer: &std::io::Result<Peer>) -> tracing::Span {
    let credentials = peer.as_ref().ok().map(|peer| peer.credentials);
    tracing::info_span!(
        "connection",
        id,
        peer_uid = credentials.and_then(|c| c.uid),
        peer_pid = credentials.and_then(|c| c.pid),
    )
}

/// A handler started on a task: finished already, or still running.
#[allow(
    clippy::large_enum_variant,
    reason = "held for one poll; boxing the outcome would cost an allocation per task"
)]
enum Handling<F> {
    Finished(HandlerOutcome),
    Running(CatchUnwind<F>),
}

/// Starts the handler on `task`, with one poll where the task was read: a
/// handler that finishes at once (nothing to wait for) is answered without
/// the cost of a task of its own; one that must wait is handed back, to be
/// run as a task and polled with a real waker from then on. Either way a
/// panic is caught. Once a first poll has blocked for longer than
/// [`INLINE_POLL_LIMIT`] [`INLINE_POLL_STRIKES`] times, handlers are no
/// longer polled here.
fn start_handler<H: TaskHandler>(
    shared: &Shared,
    handler: &Arc<H>,
    task: Box<DetectionTask>,
) -> Handling<impl Future<Output = Reply> + Send + 'static> {
    let handler = handler.clone();
    // Kept for the warning, without an allocation per task.
    let task_id = shared
        .inline_first_poll
        .load(Relaxed)
        .then(|| IdForLog::new(&task.task_id));
    let mut running = CatchUnwind(Box::pin(async move { handler.handle(*task).await }));
    let Some(task_id) = task_id else {
        return Handling::Running(running);
    };
    let started = Instant::now();
    let polled = Pin::new(&mut running).poll(&mut Context::from_waker(Waker::noop()));
    let took = started.elapsed();
    if took > INLINE_POLL_LIMIT {
        let strikes = shared
            .slow_first_polls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .strike(started);
        if strikes < INLINE_POLL_STRIKES {
            tracing::debug!(
                task_id = ?task_id,
                blocked_ms = took.as_millis() as u64,
                strikes,
                "a handler's first poll took over 2 ms"
            );
        } else if shared.inline_first_poll.swap(false, Relaxed) {
            tracing::warn!(
                task_id = ?task_id,
                blocked_ms = took.as_millis() as u64,
                "handlers blocked their connection before their first await ({strikes} times over \
                 2 ms); from now on every handler runs as a task of its own (move blocking work \
                 to tokio::task::spawn_blocking)"
            );
        }
    }
    match polled {
        Poll::Ready(outcome) => Handling::Finished(outcome),
        Poll::Pending => Handling::Running(running),
    }
}

/// First polls that took too long, counted from the first of them until
/// [`INLINE_POLL_WINDOW`] has passed.
#[derive(Debug, Default)]
struct SlowPolls {
    count: u32,
    since: Option<Instant>,
}

impl SlowPolls {
    /// One more at `now`; how many there have been in the window.
    fn strike(&mut self, now: Instant) -> u32 {
        if self
            .since
            .is_none_or(|since| now.saturating_duration_since(since) > INLINE_POLL_WINDOW)
        {
            *self = SlowPolls {
                count: 0,
                since: Some(now),
            };
        }
        self.count += 1;
        self.count
    }
}

/// The start of a task id, copied for a log line that may never be
/// written: no allocation, at most [`IdForLog::KEPT`] bytes.
struct IdForLog {
    bytes: [u8; IdForLog::KEPT],
    len: usize,
    cut: bool,
}

impl IdForLog {
    const KEPT: usize = 64;

    fn new(id: &str) -> IdForLog {
        let len = id.len().min(Self::KEPT);
        let mut bytes = [0; Self::KEPT];
        bytes[..len].copy_from_slice(&id.as_bytes()[..len]);
        IdForLog {
            bytes,
            len,
            cut: id.len() > len,
        }
    }
}

impl std::fmt::Debug for IdForLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = String::from_utf8_lossy(&self.bytes[..self.len]);
        if self.cut {
            write!(f, "{:?}...", kept)
        } else {
            write!(f, "{:?}", kept)
        }
    }
}

/// A handler's future whose panic becomes an `Err` naming it, rather than
/// the end of whatever polls it: the one way both drivers catch a
/// handler's panic.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future<Output = Reply>> Future for CatchUnwind<F> {
    type Output = HandlerOutcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<HandlerOutcome> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(reply)) => Poll::Ready(Ok(reply)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panicked(&*panic))),
        }
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
pub(crate) type HandlerOutcome = Result<Reply, String>;

#[cfg(test)]
mod tests {
    use super::IdForLog;

    #[test]
    fn a_closure_handler_adds_nothing_to_the_size_of_its_future() {
        use super::TaskHandler;
        use crate::proto::{DetectionResult, DetectionTask};
        // The closure's future holds the task (hundreds of bytes); every task
        // is boxed in a future that holds this one, so a wrapper that held it
        // twice would double each task's allocation.
        let handler = |task: DetectionTask| async move {
            let task = task; // the whole task, not just the field used
            DetectionResult {
                task_id: task.task_id,
                ..Default::default()
            }
        };
        let closure_future = std::mem::size_of_val(&handler(DetectionTask::default()));
        assert!(closure_future >= std::mem::size_of::<DetectionTask>());
        assert_eq!(
            std::mem::size_of_val(&handler.handle(DetectionTask::default())),
            closure_future
        );
    }

    #[test]
    fn slow_first_polls_count_within_a_minute_of_the_first() {
        let mut slow = super::SlowPolls::default();
        let t0 = std::time::Instant::now();
        assert_eq!(slow.strike(t0), 1);
        assert_eq!(slow.strike(t0 + std::time::Duration::from_secs(30)), 2);
        assert_eq!(
            slow.strike(t0 + std::time::Duration::from_secs(61)),
            1,
            "a minute after the first, the count starts again"
        );
        assert_eq!(slow.strike(t0 + std::time::Duration::from_secs(62)), 2);
        assert_eq!(slow.strike(t0 + std::time::Duration::from_secs(63)), 3);
    }

    #[test]
    fn an_id_for_the_log_is_kept_escaped_and_cut_at_64_bytes() {
        assert_eq!(format!("{:?}", IdForLog::new("task-1")), "\"task-1\"");
        assert_eq!(
            format!("{:?}", IdForLog::new("line\nbreak")),
            "\"line\\nbreak\""
        );
        let long = "x".repeat(100);
        assert_eq!(
            format!("{:?}", IdForLog::new(&long)),
            format!("{:?}...", "x".repeat(64))
        );
    }
}
