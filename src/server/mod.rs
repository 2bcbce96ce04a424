//! [`IpcServer`]: the collector's side. Binds the endpoint, accepts agents,
//! reads [`DetectionTask`]s, runs the handler, writes [`DetectionResult`]s.
//!
//! Everything here is the same for every backend: the endpoint hardening,
//! the connection limit, peer checks, deadlines, telemetry and shutdown. The
//! backends only move bytes (`src/transport/`).

mod connection;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::{IpcConfig, TransportKind};
use crate::endpoint::Endpoint;
use crate::error::IpcError;
use crate::peer::PeerPolicy;
use crate::proto::{DetectionResult, DetectionTask};
use crate::telemetry::{ActiveConnection, Counters, ServerStats, bump};
use crate::transport::{Connection, Listener};

/// Tasks one connection may have in flight before the server stops reading
/// from it (backpressure), unless [`ServerBuilder::max_in_flight_per_connection`]
/// says otherwise.
pub const DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION: usize = 32;

/// How long a stale-socket probe waits for an answer before deciding a
/// server is there but busy.
#[cfg(unix)]
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Backoff between failed accepts (fd exhaustion, for instance).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Answers tasks. Implemented for every
/// `Fn(DetectionTask) -> impl Future<Output = R>` where `R` is a
/// [`DetectionResult`] or an `Arc<DetectionResult>` (see [`Reply`]), so an
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
/// A handler must not block: the server polls it first on the task that
/// serves its connection (a handler that is done at once is answered without
/// a task of its own), so blocking there would stall that connection. Put
/// blocking or CPU-heavy work on `tokio::task::spawn_blocking`, as
/// `daemoneye-ipc serve` does.
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

/// What a handler answers with.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A result of this task's own.
    Owned(DetectionResult),
    /// A result shared with other replies (a cached process table, say),
    /// written without being copied: the frame carries this task's id,
    /// then the shared result's encoding, which protobuf merges into one
    /// message. Leave its `task_id` empty.
    Shared(Arc<DetectionResult>),
}

impl From<DetectionResult> for Reply {
    fn from(result: DetectionResult) -> Reply {
        Reply::Owned(result)
    }
}

impl From<Arc<DetectionResult>> for Reply {
    fn from(result: Arc<DetectionResult>) -> Reply {
        Reply::Shared(result)
    }
}

/// Options beyond [`IpcConfig`].
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    config: IpcConfig,
    allowed_uids: Vec<u32>,
    max_in_flight_per_connection: usize,
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

    /// Validates the config, secures and binds the endpoint, and starts
    /// accepting. Must be called within a Tokio runtime.
    pub async fn bind<H: TaskHandler>(self, handler: H) -> Result<IpcServer, IpcError> {
        let ServerBuilder {
            config,
            allowed_uids,
            max_in_flight_per_connection,
        } = self;
        config.validate()?;
        let endpoint = Endpoint::parse(&config.endpoint_path)?;
        let transport = config.transport;

        #[cfg(unix)]
        crate::endpoint::unix::prepare(endpoint.path(), PROBE_TIMEOUT).await?;
        #[cfg(windows)]
        crate::endpoint::windows::refuse_if_served(&endpoint)?;
        let listener = Listener::bind(transport, &endpoint)
            .map_err(|source| bind_error(&endpoint, transport, source))?;
        #[cfg(unix)]
        let socket_file = crate::endpoint::unix::verify_bound(endpoint.path())?;

        let shared = Arc::new(Shared {
            settings: config.frame_settings(),
            read_timeout: config.read_timeout(),
            write_timeout: config.write_timeout(),
            accept_timeout: config.accept_timeout(),
            max_in_flight: max_in_flight_per_connection,
            slots: Arc::new(Semaphore::new(config.max_connections)),
            waiting_room: Arc::new(Semaphore::new(config.max_connections)),
            peers: PeerPolicy::new(allowed_uids),
            counters: Counters::default(),
            stop_reading: CancellationToken::new(),
            abort: CancellationToken::new(),
            next_connection_id: AtomicU64::new(1),
        });
        let tasks = TaskTracker::new();
        tracing::info!(
            transport = %transport,
            endpoint = %endpoint,
            max_connections = config.max_connections,
            max_frame_bytes = config.max_frame_bytes,
            crc32 = %config.crc32_variant,
            "listening"
        );
        tasks.spawn(accept_loop(
            listener,
            shared.clone(),
            Arc::new(handler),
            tasks.clone(),
        ));
        Ok(IpcServer {
            endpoint,
            transport,
            shared,
            tasks,
            #[cfg(unix)]
            socket_file: Some(socket_file),
        })
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
    /// Removed on drop, or as soon as a graceful shutdown starts.
    #[cfg(unix)]
    socket_file: Option<crate::endpoint::unix::SocketFile>,
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
        self.shared.counters.snapshot(self.transport.name())
    }

    /// Stops accepting and reading new tasks, lets tasks in flight finish
    /// and their results go out for up to `grace`, then cuts whatever is
    /// left.
    ///
    /// The socket file is removed at once, with the listener: a replacement
    /// server may bind the endpoint while this one drains, and this one
    /// never removes the replacement's socket.
    pub async fn shutdown(mut self, grace: Duration) -> ShutdownReport {
        tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down");
        self.shared.stop_reading.cancel();
        self.release_endpoint();
        self.tasks.close();
        let drained = tokio::time::timeout(grace, self.tasks.wait()).await.is_ok();
        if !drained {
            tracing::warn!("grace period over with tasks in flight; closing their connections");
            self.shared.abort.cancel();
            self.tasks.wait().await;
        }
        let stats = self.stats();
        tracing::info!(drained, "shut down");
        ShutdownReport { drained, stats }
    }

    /// Removes the socket file now. (A Windows pipe name is released with
    /// the listener's last instance.)
    fn release_endpoint(&mut self) {
        #[cfg(unix)]
        drop(self.socket_file.take());
    }
}

impl Drop for IpcServer {
    fn drop(&mut self) {
        self.shared.stop_reading.cancel();
        self.shared.abort.cancel();
    }
}

/// State every connection task shares.
#[derive(Debug)]
struct Shared {
    settings: crate::frame::FrameSettings,
    read_timeout: Duration,
    write_timeout: Duration,
    accept_timeout: Duration,
    max_in_flight: usize,
    /// One permit per connection served at once.
    slots: Arc<Semaphore>,
    /// One permit per connection waiting for a slot: the queue is bounded
    /// too, so a flood of connections cannot pile up.
    waiting_room: Arc<Semaphore>,
    peers: PeerPolicy,
    counters: Counters,
    /// Graceful shutdown: stop accepting and reading, finish what is in flight.
    stop_reading: CancellationToken,
    /// Hard stop: drop everything now.
    abort: CancellationToken,
    next_connection_id: AtomicU64,
}

async fn accept_loop<H: TaskHandler>(
    mut listener: Listener,
    shared: Arc<Shared>,
    handler: Arc<H>,
    tasks: TaskTracker,
) {
    let mut backoff = Backoff::new(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
    loop {
        let accepted = tokio::select! {
            _ = shared.stop_reading.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(connection) => {
                backoff.reset();
                bump(&shared.counters.accepted);
                let id = shared.next_connection_id.fetch_add(1, Relaxed);
                tasks.spawn(serve_connection(
                    connection,
                    id,
                    shared.clone(),
                    handler.clone(),
                ));
            }
            Err(error) => {
                // Typically EMFILE/ENFILE: retrying at once would spin.
                bump(&shared.counters.accept_errors);
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "accept failed");
                tokio::select! {
                    _ = shared.stop_reading.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    tracing::debug!("stopped accepting");
}

async fn serve_connection<H: TaskHandler>(
    connection: Connection,
    id: u64,
    shared: Arc<Shared>,
    handler: Arc<H>,
) {
    let peer = connection.peer_credentials();
    let span = tracing::info_span!(
        "connection",
        id,
        peer_uid = peer.as_ref().ok().and_then(|p| p.uid),
        peer_pid = peer.as_ref().ok().and_then(|p| p.pid),
    );
    async move {
        if let Err(reason) = shared.peers.check(peer) {
            bump(&shared.counters.rejected_peer);
            tracing::warn!("peer rejected: it {reason}");
            return;
        }
        let Some(_slot) = wait_for_slot(&shared).await else {
            bump(&shared.counters.rejected_limit);
            tracing::warn!(
                accept_timeout_ms = shared.accept_timeout.as_millis() as u64,
                "no connection slot freed in time (max_connections reached); closing"
            );
            return;
        };
        let _active = ActiveConnection::enter(&shared.counters);
        tracing::debug!("serving");
        match connection::serve(connection, &shared, handler).await {
            Ok(()) => tracing::debug!("closed"),
            Err(error) => {
                if shared.counters.count_connection_error(&error) {
                    tracing::warn!(%error, "closing connection");
                } else {
                    tracing::info!(%error, "connection ended");
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// A serving slot, waited for up to `accept_timeout`; `None` if none freed
/// (or the waiting room is full, or the server is stopping).
async fn wait_for_slot(shared: &Shared) -> Option<OwnedSemaphorePermit> {
    if let Ok(slot) = shared.slots.clone().try_acquire_owned() {
        return Some(slot);
    }
    let _waiting = shared.waiting_room.clone().try_acquire_owned().ok()?;
    tracing::debug!("all slots taken; waiting for one");
    tokio::select! {
        _ = shared.stop_reading.cancelled() => None,
        slot = tokio::time::timeout(shared.accept_timeout, shared.slots.clone().acquire_owned()) => {
            slot.ok()?.ok()
        }
    }
}
