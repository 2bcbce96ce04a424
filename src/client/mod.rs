//! [`IpcClient`]: the agent's side. Connects (retrying while the collector
//! is not there yet), sends [`DetectionTask`]s and matches the results by
//! `task_id`.
//!
//! One connection carries every concurrent [`send`](IpcClient::send). The
//! rules of that connection (correlation by `task_id`, tasks given up on,
//! the in-flight limit, retirement of a connection that stopped answering)
//! are the policy core's (`src/policy/client.rs`); this module is the
//! callers' side of it, and a driver per I/O model moves the bytes: a Tokio
//! task for the `interprocess` and `tokio` backends (`async_driver.rs`), a
//! thread of its own for `legacy` (`blocking_driver.rs`).
//!
//! A caller registers its task with the core, which queues the frame. When
//! it is the connection's only task in flight the caller writes the frame
//! itself, at once; otherwise it wakes the driver, which writes every frame
//! queued by then with one system call. The driver reads results and hands
//! each to the caller waiting for it, which decodes it; on the async
//! backends the caller of the only task in flight reads the socket itself
//! until it has its answer or another task starts, woken by the socket
//! rather than by the driver (`async_driver.rs`). When the
//! connection drops, every caller still waiting gets
//! [`IpcError::ConnectionLost`] at once, and the next `send` connects again.
//!
//! At most [`max_in_flight`](ClientBuilder::max_in_flight) tasks are
//! outstanding on a connection; further sends wait for one to finish. The
//! server stops reading a connection at its own limit, so a client that sent
//! more would find its writes stalled by the server's backpressure and take
//! that for a dead connection.

#[cfg(async_backend)]
mod async_driver;
#[cfg(feature = "ipc-legacy")]
mod blocking_driver;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, oneshot};

use crate::backoff::Backoff;
use crate::config::{IpcConfig, TransportKind};
use crate::endpoint::Endpoint;
use crate::error::IpcError;
use crate::frame::codec::{decode_message, decode_shared_message};
use crate::peer::PeerPolicy;
use crate::policy::client::{ClientConnection, Outcome, Refusal, Ticket};
use crate::proto::{DetectionResult, DetectionTask};
use crate::server::DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION;

/// First and longest pause between connect attempts.
const CONNECT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const CONNECT_BACKOFF_MAX: Duration = Duration::from_millis(250);

/// A client for one endpoint. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct IpcClient {
    inner: Arc<ClientInner>,
}

#[derive(Debug)]
struct ClientInner {
    config: IpcConfig,
    endpoint: Endpoint,
    /// Who may serve us (Unix uids).
    servers: PeerPolicy,
    /// Tasks outstanding on one connection at most.
    max_in_flight: usize,
    /// The current connection, if any. Held across a connect so that
    /// concurrent callers share one attempt.
    link: tokio::sync::Mutex<Option<Arc<LinkHandle>>>,
}

/// Options beyond [`IpcConfig`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    config: IpcConfig,
    allowed_server_uids: Vec<u32>,
    max_in_flight: usize,
}

impl ClientBuilder {
    /// Unix: also trust servers running as these uids. A server running as
    /// our own effective uid or root is always trusted; any other is refused
    /// with [`IpcError::UntrustedServer`] before a task is sent. (Windows
    /// ignores this: a pipe is trusted if its owner is our own account,
    /// SYSTEM or Administrators, and refused the same way otherwise.)
    pub fn allow_server_uids(mut self, uids: impl IntoIterator<Item = u32>) -> Self {
        self.allowed_server_uids.extend(uids);
        self
    }

    /// Tasks outstanding on the connection at most (at least 1); a further
    /// [`send`](IpcClient::send) waits for one to finish, within its
    /// deadline, then fails with [`IpcError::InFlightLimit`]. A task given
    /// up on counts until its result arrives (or its connection is
    /// replaced). Default [`DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION`], the
    /// server's default: keep it at or below the server's limit
    /// ([`ServerBuilder::max_in_flight_per_connection`](crate::server::ServerBuilder::max_in_flight_per_connection)).
    pub fn max_in_flight(mut self, limit: usize) -> Self {
        self.max_in_flight = limit.max(1);
        self
    }

    /// Validates the config. Connects lazily, on the first send.
    pub fn build(self) -> Result<IpcClient, IpcError> {
        self.config.validate()?;
        let endpoint = Endpoint::parse(&self.config.endpoint_path)?;
        Ok(IpcClient {
            inner: Arc::new(ClientInner {
                config: self.config,
                endpoint,
                servers: PeerPolicy::new(self.allowed_server_uids),
                max_in_flight: self.max_in_flight,
                link: tokio::sync::Mutex::new(None),
            }),
        })
    }
}

impl IpcClient {
    /// A builder for options beyond [`IpcConfig`].
    pub fn builder(config: IpcConfig) -> ClientBuilder {
        ClientBuilder {
            config,
            allowed_server_uids: Vec::new(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION,
        }
    }

    /// A client for `config`'s endpoint and transport. Connects lazily, on
    /// the first [`send`](Self::send).
    pub fn new(config: IpcConfig) -> Result<IpcClient, IpcError> {
        IpcClient::builder(config).build()
    }

    /// A client that is already connected: fails like [`send`](Self::send)
    /// would if no trusted server answers within `accept_timeout_ms`.
    pub async fn connect(config: IpcConfig) -> Result<IpcClient, IpcError> {
        let client = IpcClient::new(config)?;
        client.connect_now().await?;
        Ok(client)
    }

    /// Connects now rather than on the next send (a no-op if connected).
    pub async fn connect_now(&self) -> Result<(), IpcError> {
        self.current_link(&mut None).await.map(drop)
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// The backend this client uses.
    pub fn transport(&self) -> TransportKind {
        self.inner.config.transport
    }

    /// Sends `task` and waits for its result.
    ///
    /// Deadlines: getting a connection (connecting, or waiting for another
    /// caller's connect) takes at most `accept_timeout_ms`. From then on one
    /// deadline, `read_timeout_ms`, covers everything else: waiting for a
    /// free in-flight slot when [`max_in_flight`](ClientBuilder::max_in_flight)
    /// tasks are outstanding ([`IpcError::InFlightLimit`]), writing the frame,
    /// and the answer ([`IpcError::ResponseTimeout`]). So `send` returns
    /// within `accept_timeout_ms + read_timeout_ms` at most, and within
    /// `read_timeout_ms` when connected. Refused at once: an empty
    /// `task_id`, or one still outstanding on this connection.
    ///
    /// Cancel-safe: dropping the future never corrupts the connection. The
    /// task may still reach the server and run; its id stays reserved until
    /// its result arrives or the connection ends, so a late result can never
    /// be taken for the answer to a later task with the same id. A
    /// connection holding a task past its deadline is replaced by the next
    /// `send`, so tasks the server never answers cannot use up its slots.
    ///
    /// A result whose fields do not decode ([`IpcError::MalformedResult`])
    /// fails this task only; the connection and other tasks carry on.
    // Not an `async fn`: that would keep `task` once more beside the
    // exchange that holds it, 512 bytes more in every call's future.
    pub fn send(
        &self,
        task: DetectionTask,
    ) -> impl Future<Output = Result<DetectionResult, IpcError>> + Send + '_ {
        self.exchange(task, |body| decode_message(&body))
    }

    /// Like [`send`](Self::send), with the result as a
    /// [view](crate::view::DetectionResult): its text fields are slices of
    /// the frame it arrived in, so decoding allocates and copies no text.
    /// For agents that read large results (a process table); the deadlines,
    /// errors and guarantees are `send`'s.
    pub fn send_view(
        &self,
        task: DetectionTask,
    ) -> impl Future<Output = Result<crate::view::DetectionResult, IpcError>> + Send + '_ {
        self.exchange(task, decode_shared_message)
    }

    /// Every in-flight slot stayed taken until `task`'s deadline: it was
    /// not sent.
    fn in_flight_limit(&self, task: &DetectionTask) -> IpcError {
        IpcError::InFlightLimit {
            endpoint: self.inner.endpoint.to_string(),
            task_id: task.task_id.clone(),
            in_flight: self.inner.max_in_flight,
            waited_ms: self.inner.config.read_timeout_ms,
        }
    }

    /// The caller's error for a result that did not decode: which task,
    /// which collector.
    fn malformed(&self, task_id: String, error: IpcError) -> IpcError {
        match error {
            IpcError::MalformedMessage {
                message_type,
                length,
                source,
            } => IpcError::MalformedResult {
                endpoint: self.inner.endpoint.to_string(),
                task_id,
                message_type,
                length,
                source,
            },
            other => other,
        }
    }

    /// Sends `task`, waits for the body of its result's frame and decodes
    /// it with `decode`.
    async fn exchange<T>(
        &self,
        task: DetectionTask,
        decode: fn(Bytes) -> Result<T, IpcError>,
    ) -> Result<T, IpcError> {
        if task.task_id.is_empty() {
            return Err(IpcError::EmptyTaskId);
        }
        let config = &self.inner.config;
        let (mut connect_deadline, mut deadline) = (None, None);

        // A connection can close between being handed out and the
        // registration, or after it but before a byte of the task was written
        // (a server that restarted, its end closed before the driver read
        // that it had): the task never reached the server, so one more try
        // on a fresh connection is safe.
        for attempt in 1.. {
            let link = self.current_link(&mut connect_deadline).await?;
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + config.read_timeout());
            match self.register(&link, &task, deadline).await? {
                Some(pending) => match self.answer(pending).await? {
                    Settled::Answered(task_id, body) => {
                        return decode(body).map_err(|error| self.malformed(task_id, error));
                    }
                    Settled::Unsent(_) if attempt < 2 => continue,
                    Settled::Unsent(reason) => {
                        return Err(self.lost(
                            task.task_id,
                            format!("{reason}, before a byte of the task was written, on two connections"),
                        ));
                    }
                },
                None if attempt < 2 => continue,
                None => {
                    let (refusal, reason) = {
                        let core = link.link.lock();
                        (
                            core.refusal().map(str::to_owned),
                            core.closed_reason().map(str::to_owned),
                        )
                    };
                    if let Some(refusal) = refusal {
                        return Err(self.refused(task.task_id, refusal));
                    }
                    return Err(self.lost(
                        task.task_id,
                        reason.unwrap_or_else(|| {
                            "the connection closed as the task was being sent".to_owned()
                        }),
                    ));
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Registers `task` on `link`, waiting for an in-flight slot until
    /// `deadline`; `None` if the connection closed first.
    async fn register(
        &self,
        link: &Arc<LinkHandle>,
        task: &DetectionTask,
        deadline: Instant,
    ) -> Result<Option<Pending>, IpcError> {
        // Registered for a freed slot only once one was found wanting: a
        // first look costs no waiter.
        let mut wants_slot = false;
        loop {
            let freed = link.link.slot_freed.notified();
            tokio::pin!(freed);
            if wants_slot {
                // Before looking again, so that a slot freed after this
                // look wakes us.
                link.link.slot_wanted.store(true, Ordering::SeqCst);
                freed.as_mut().enable();
            }
            let (waiter, answer) = oneshot::channel();
            let (begun, reads) = {
                let mut core = link.link.lock();
                let begun = core.begin(task, waiter, deadline, Instant::now());
                let reads = match begun {
                    Ok(ticket) => link.link.flush(&mut core, ticket),
                    Err(_) => false,
                };
                (begun, reads)
            };
            match begun {
                Ok(ticket) => {
                    return Ok(Some(Pending {
                        link: link.clone(),
                        ticket,
                        answer,
                        settled: false,
                        reads,
                    }));
                }
                Err((Refusal::Full, _)) if !wants_slot => wants_slot = true,
                Err((Refusal::Full, _)) => {
                    if tokio::time::timeout_at(deadline.into(), freed)
                        .await
                        .is_err()
                    {
                        return Err(self.in_flight_limit(task));
                    }
                }
                // Only after waiting for a slot (the deadline is fresh on
                // a first look): the wait used up the time.
                Err((Refusal::Late, _)) => return Err(self.in_flight_limit(task)),
                Err((Refusal::Closed, _)) => return Ok(None),
                Err((Refusal::Duplicate, _)) => {
                    return Err(IpcError::DuplicateTaskId {
                        task_id: task.task_id.clone(),
                    });
                }
                Err((Refusal::TooLarge(error), _)) => return Err(error),
            }
        }
    }

    /// Waits for the answer to a registered task: the connection tells its
    /// caller at the task's deadline if no answer came by then.
    async fn answer(&self, mut pending: Pending) -> Result<Settled, IpcError> {
        let delivered = std::future::poll_fn(|cx| pending.poll_answer(cx)).await;
        pending.settled = true;
        pending.stop_reading();
        let Some(Delivered { task_id, outcome }) = delivered else {
            // Every waiter is handed its outcome before it is let go, and the
            // link lives as long as this caller holds it: not reached.
            return Err(self.lost(String::new(), "the connection ended".to_owned()));
        };
        match outcome {
            Outcome::Answered(result) => Ok(Settled::Answered(task_id, result)),
            Outcome::Unsent(reason) => Ok(Settled::Unsent(reason)),
            Outcome::Lost(reason) => Err(self.lost(task_id, reason)),
            Outcome::Refused(reason) => Err(self.refused(task_id, reason)),
            Outcome::TimedOut => Err(IpcError::ResponseTimeout {
                endpoint: self.inner.endpoint.to_string(),
                task_id,
                waited_ms: self.inner.config.read_timeout_ms,
            }),
        }
    }

    /// The live connection, or a new one by the connect deadline: the one
    /// in `connect_deadline`, or `accept_timeout_ms` from when one is first
    /// needed (kept there for the caller's next attempt).
    async fn current_link(
        &self,
        connect_deadline: &mut Option<Instant>,
    ) -> Result<Arc<LinkHandle>, IpcError> {
        let config = &self.inner.config;
        let accept_timeout = config.accept_timeout();
        let mut deadline =
            || *connect_deadline.get_or_insert_with(|| Instant::now() + accept_timeout);
        // Uncontended (no other caller connecting), no deadline is needed.
        let mut current = match self.inner.link.try_lock() {
            Ok(current) => current,
            Err(_) => tokio::time::timeout_at(deadline().into(), self.inner.link.lock())
                .await
                .map_err(|_| {
                    self.connect_timeout("another send was still connecting".to_owned())
                })?,
        };
        // A connection idle for half the read timeout is about to be closed
        // by the server (its idle limit is read_timeout_ms too); a task sent
        // on it now could cross the server's close. Start afresh instead.
        let idle_limit = config.read_timeout() / 2;
        if let Some(link) = current.as_ref() {
            let usable = {
                let mut core = link.link.lock();
                let usable = core.usable(Instant::now(), idle_limit);
                if !usable {
                    core.retire();
                }
                usable
            };
            if usable {
                return Ok(link.clone());
            }
            link.link.settle();
        }
        // Boxed: connecting is rare, and inline its state would make every
        // call's future larger.
        let link = Arc::new(Box::pin(self.open(deadline())).await?);
        *current = Some(link.clone());
        Ok(link)
    }

    /// Connects, retrying with jittered backoff while the server is not
    /// there yet, until `deadline`; then checks who the server is and starts
    /// the connection's driver.
    async fn open(&self, deadline: Instant) -> Result<LinkHandle, IpcError> {
        let config = &self.inner.config;
        let endpoint = &self.inner.endpoint;
        let mut backoff = Backoff::new(CONNECT_BACKOFF_MIN, CONNECT_BACKOFF_MAX);
        let connected = loop {
            let last_error = match Connected::attempt(config.transport, endpoint, deadline).await {
                // Reading the server's credentials also proves the socket is
                // connected: interprocess can hand back an unconnected one
                // when the server's accept queue was full (ENOTCONN here).
                Ok(connected) => match connected.peer() {
                    Err(error) if server_not_ready(&error) => error.to_string(),
                    credentials => {
                        let untrusted = |reason| IpcError::UntrustedServer {
                            endpoint: endpoint.to_string(),
                            reason: format!("it {reason}"),
                        };
                        self.inner.servers.check(credentials).map_err(untrusted)?;
                        #[cfg(windows)]
                        crate::peer::check_pipe_owner(connected.pipe_owner()).map_err(untrusted)?;
                        break connected;
                    }
                },
                Err(error) if server_not_ready(&error) => error.to_string(),
                Err(error) if error.kind() == std::io::ErrorKind::TimedOut => {
                    "the connect attempt itself timed out".to_owned()
                }
                Err(source) => {
                    return Err(IpcError::Connect {
                        endpoint: endpoint.to_string(),
                        transport: config.transport.name(),
                        source,
                    });
                }
            };
            let retry_at = Instant::now() + backoff.next_delay();
            if retry_at >= deadline {
                return Err(self.connect_timeout(last_error));
            }
            tokio::time::sleep_until(retry_at.into()).await;
        };
        tracing::debug!(endpoint = %endpoint, transport = config.transport.name(), "connected");
        let core = ClientConnection::new(
            config.frame_settings(),
            config.read_timeout(),
            config.write_timeout(),
            self.inner.max_in_flight,
            Instant::now(),
        );
        connected.start(core).map_err(|source| IpcError::Connect {
            endpoint: endpoint.to_string(),
            transport: config.transport.name(),
            source,
        })
    }

    fn refused(&self, task_id: String, reason: String) -> IpcError {
        IpcError::Refused {
            endpoint: self.inner.endpoint.to_string(),
            task_id,
            reason,
        }
    }

    fn lost(&self, task_id: String, reason: String) -> IpcError {
        IpcError::ConnectionLost {
            endpoint: self.inner.endpoint.to_string(),
            task_id,
            reason,
        }
    }

    fn connect_timeout(&self, last_error: String) -> IpcError {
        IpcError::ConnectTimeout {
            endpoint: self.inner.endpoint.to_string(),
            transport: self.inner.config.transport.name(),
            waited_ms: self.inner.config.accept_timeout_ms,
            last_error,
        }
    }
}

/// Errors that mean "no server yet" rather than "this will never work".
fn server_not_ready(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    const ERROR_PIPE_BUSY: i32 = 231;
    matches!(
        error.kind(),
        NotFound | ConnectionRefused | WouldBlock | ConnectionReset | NotConnected
    ) || (cfg!(windows) && error.raw_os_error() == Some(ERROR_PIPE_BUSY))
}

/// A fresh connection of either I/O model, before its driver starts.
enum Connected {
    #[cfg(async_backend)]
    Async(crate::transport::Connection),
    #[cfg(feature = "ipc-legacy")]
    Blocking(crate::transport::legacy::Stream),
}

impl Connected {
    /// One connect attempt, bounded by `deadline` (`TimedOut` past it).
    async fn attempt(
        transport: TransportKind,
        endpoint: &Endpoint,
        deadline: Instant,
    ) -> std::io::Result<Connected> {
        match transport {
            #[cfg(feature = "ipc-legacy")]
            TransportKind::Legacy => {
                // Never blocks: a full accept queue or a busy pipe is an
                // error to retry, like any server not ready.
                let _ = deadline;
                crate::transport::legacy::connect(endpoint).map(Connected::Blocking)
            }
            #[cfg(async_backend)]
            _ => match tokio::time::timeout_at(
                deadline.into(),
                crate::transport::connect(transport, endpoint),
            )
            .await
            {
                Ok(connected) => connected.map(Connected::Async),
                Err(_elapsed) => Err(std::io::ErrorKind::TimedOut.into()),
            },
            #[allow(unreachable_patterns)] // Reached only in a legacy-only build.
            _ => unreachable!("IpcConfig::validate refuses a transport not compiled in"),
        }
    }

    fn peer(&self) -> std::io::Result<crate::peer::Peer> {
        match self {
            #[cfg(async_backend)]
            Connected::Async(connection) => connection.peer(),
            #[cfg(feature = "ipc-legacy")]
            Connected::Blocking(stream) => stream.peer(),
        }
    }

    #[cfg(windows)]
    fn pipe_owner(&self) -> std::io::Result<crate::transport::PipeOwner> {
        match self {
            #[cfg(async_backend)]
            Connected::Async(connection) => connection.pipe_owner(),
            #[cfg(feature = "ipc-legacy")]
            Connected::Blocking(stream) => stream.pipe_owner(),
        }
    }

    /// Starts the driver that moves this connection's bytes.
    fn start(self, core: ClientConnection<Waiter>) -> std::io::Result<LinkHandle> {
        match self {
            #[cfg(async_backend)]
            Connected::Async(connection) => Ok(async_driver::start(connection, core)),
            #[cfg(feature = "ipc-legacy")]
            Connected::Blocking(stream) => blocking_driver::start(stream, core),
        }
    }
}

/// How a caller is told what became of its task.
type Waiter = oneshot::Sender<Delivered>;

/// What a caller is told: its task's id, handed back, and the outcome.
struct Delivered {
    task_id: String,
    outcome: Outcome,
}

/// One connection as the callers and its driver share it.
pub(crate) struct Link {
    core: Mutex<ClientConnection<Waiter>>,
    /// A task was settled (answered, given up on and then answered, or the
    /// connection ended): callers waiting for an in-flight slot look again.
    slot_freed: Notify,
    /// A caller found no slot free and waits on `slot_freed`: only then is
    /// it signalled.
    slot_wanted: AtomicBool,
    /// Gets the driver's attention: new output, or the handle dropped.
    io: IoWake,
    /// Every [`LinkHandle`] is gone: the driver closes the connection.
    dropped: AtomicBool,
    /// Rounds of the async driver's loop, for tests of when it runs.
    #[cfg(all(test, async_backend))]
    driver_rounds: std::sync::atomic::AtomicUsize,
}

/// How callers get queued frames written: by the driver, or (see
/// [`Link::flush`]) by the caller itself, without waiting, with the core's
/// lock held so that writes never interleave.
enum IoWake {
    /// The async driver's task; `notify` wakes it. The connection is here,
    /// not in the task, so that callers can write to it; the task takes it
    /// out (closing it) when it ends.
    #[cfg(async_backend)]
    Task {
        notify: Notify,
        socket: Mutex<Option<async_driver::Socket>>,
    },
    /// The blocking driver's thread waits in the OS; the waker wakes it.
    /// A caller with the only task in flight writes through `writer`, where
    /// the backend has one.
    #[cfg(feature = "ipc-legacy")]
    Thread {
        waker: crate::transport::legacy::Waker,
        writer: Option<crate::transport::legacy::Writer>,
    },
}

impl Link {
    fn new(core: ClientConnection<Waiter>, io: IoWake) -> Link {
        Link {
            core: Mutex::new(core),
            slot_freed: Notify::new(),
            slot_wanted: AtomicBool::new(false),
            io,
            dropped: AtomicBool::new(false),
            #[cfg(all(test, async_backend))]
            driver_rounds: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ClientConnection<Waiter>> {
        // Every critical section leaves the core consistent before anything
        // that could panic; poisoning is ignored.
        self.core
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wake_io(&self) {
        match &self.io {
            #[cfg(async_backend)]
            IoWake::Task { notify, .. } => notify.notify_one(),
            #[cfg(feature = "ipc-legacy")]
            IoWake::Thread { waker, .. } => waker.wake(),
        }
    }

    /// Gets what the caller of `ticket` just queued written. The only task
    /// in flight is written by its caller, at once (as much as the socket
    /// takes): a round trip costs no hand-off to the driver. With others in
    /// flight the driver is woken instead, and writes every frame queued by
    /// then with one system call: pipelined callers share writes rather than
    /// making one each.
    ///
    /// True if the caller is to read its answer itself (async backends,
    /// the only task in flight, written whole): see [`async_driver`].
    fn flush(&self, core: &mut ClientConnection<Waiter>, ticket: Ticket) -> bool {
        // A deadline before the driver's timer: it must be woken to move
        // it, whoever writes.
        let retime = core.take_retime();
        if core.in_flight() > 1 {
            self.wake_io();
            return false;
        }
        let reads = match &self.io {
            #[cfg(async_backend)]
            IoWake::Task { socket, .. } => {
                let mut socket = socket
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                socket
                    .as_mut()
                    .is_some_and(|socket| async_driver::write_now(socket, core, ticket))
            }
            #[cfg(feature = "ipc-legacy")]
            IoWake::Thread {
                writer: Some(writer),
                ..
            } => {
                match writer.write_from(core.pending_output()) {
                    Ok(written) => core.on_written(written, Instant::now()),
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(error) => core.on_write_error(&error),
                }
                false
            }
            #[allow(unreachable_patterns)] // Reached where legacy has no writer.
            _ => false,
        };
        if retime || !core.pending_output().is_empty() || core.closed_reason().is_some() {
            self.wake_io();
        }
        let _ = ticket; // Unused where only legacy is compiled in.
        reads
    }

    /// Hands the core's outcomes to their callers, lets callers waiting for
    /// a slot look again, and, if the connection has ended, tells the
    /// driver. (Handing over only schedules the callers: none runs here, so
    /// doing it under the lock is safe with Tokio's wakers, which the
    /// channels' are.)
    fn settle(&self) {
        if self.settle_outcomes() {
            #[cfg(async_backend)]
            #[allow(irrefutable_let_patterns)] // Refutable when legacy is compiled in.
            if let IoWake::Task { socket, .. } = &self.io {
                async_driver::wake_reader(socket);
            }
        }
    }

    /// [`settle`](Self::settle), for a reading caller's own read: it looks
    /// for its outcome itself, so it is not woken. True if an outcome was
    /// handed over.
    fn settle_outcomes(&self) -> bool {
        let (settled, closed) = {
            let mut core = self.lock();
            let mut settled = false;
            for delivery in core.drain_deliveries() {
                settled = true;
                // A caller that stopped waiting has dropped its receiver.
                let _ = delivery.waiter.send(Delivered {
                    task_id: delivery.task_id,
                    outcome: delivery.outcome,
                });
            }
            let settled = core.take_slots_changed() || settled;
            (settled, core.closed_reason().is_some())
        };
        if (settled || closed) && self.slot_wanted.swap(false, Ordering::SeqCst) {
            self.slot_freed.notify_waiters();
        }
        if closed {
            self.wake_io();
        }
        settled
    }

    /// Whether the driver should stop: the connection ended, or nobody
    /// holds it any more.
    fn finished(&self) -> bool {
        self.dropped.load(Ordering::Acquire) || self.lock().closed_reason().is_some()
    }
}

/// What callers hold of a connection. When the last one goes (the client
/// replaced the connection, and no caller waits on it), the driver is told
/// to close it.
pub(crate) struct LinkHandle {
    link: Arc<Link>,
}

impl std::fmt::Debug for LinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkHandle").finish_non_exhaustive()
    }
}

impl Drop for LinkHandle {
    fn drop(&mut self) {
        self.link.dropped.store(true, Ordering::Release);
        self.link.wake_io();
    }
}

/// How a registered task ended, where its caller has more to do than
/// report an error.
enum Settled {
    /// The body of its result's frame, with its id.
    Answered(String, Bytes),
    /// The connection ended, for this reason, before a byte of the task was
    /// written: it may be sent again.
    Unsent(String),
}

/// A registered task whose caller waits. Dropped unsettled (the deadline
/// passed, or the caller was cancelled), it marks the task abandoned, so the
/// id stays reserved until the server's late answer is out of the way.
struct Pending {
    link: Arc<LinkHandle>,
    ticket: Ticket,
    answer: oneshot::Receiver<Delivered>,
    settled: bool,
    /// The caller reads the socket itself (see [`async_driver`]) until it
    /// hands reading back to the driver.
    reads: bool,
}

impl Pending {
    /// The task's outcome, once the driver (or, for a caller that reads,
    /// this caller's own read) delivered it; `None` if it was let go
    /// undelivered (not reached: see [`IpcClient::answer`]).
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivered>> {
        #[cfg(async_backend)]
        while self.reads {
            // Read first: that also registers this caller's waker for an
            // outcome someone else delivers, so one delivered after the
            // look at the channel below still wakes it.
            let read = match async_driver::read_own_answer(cx, &self.link.link, self.ticket) {
                Some(read) => read,
                None => break,
            };
            if read.is_ready() {
                // Delivered to whoever it was for, without waking this
                // caller, who looks for its own below.
                self.link.link.settle_outcomes();
            }
            // Not waited on: see `async_driver::Socket::reader_waker`.
            match self.answer.try_recv() {
                Ok(delivered) => return Poll::Ready(Some(delivered)),
                Err(oneshot::error::TryRecvError::Closed) => return Poll::Ready(None),
                Err(oneshot::error::TryRecvError::Empty) if read.is_pending() => {
                    return Poll::Pending;
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
        }
        std::pin::Pin::new(&mut self.answer)
            .poll(cx)
            .map(Result::ok)
    }

    /// The caller no longer reads: the driver does.
    fn stop_reading(&mut self) {
        if std::mem::take(&mut self.reads) {
            #[cfg(async_backend)]
            async_driver::hand_back_reading(&self.link.link, self.ticket);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.settled {
            self.link.link.lock().abandon(self.ticket);
            self.link.link.settle();
        }
        self.stop_reading();
    }
}

#[cfg(test)]
mod tests {
    use crate::proto::DetectionTask;

    #[test]
    fn a_calls_future_holds_its_task_once_and_leaves_connecting_out() {
        let client = super::IpcClient::new(crate::IpcConfig::default()).unwrap();
        let task = std::mem::size_of::<DetectionTask>();
        // Every caller's future, wherever it is kept (a spawned task boxes
        // it): the task, the wait for a slot and for the answer. Connecting
        // is boxed on its own when it happens; the task is kept once. (On
        // x86_64 it is 1512 bytes; with connecting inline 2016, with the
        // task kept twice 2528.)
        let send = std::mem::size_of_val(&client.send(DetectionTask::default()));
        let view = std::mem::size_of_val(&client.send_view(DetectionTask::default()));
        for (call, size) in [("send", send), ("send_view", view)] {
            assert!(
                size < 2 * task + 768,
                "{call}'s future is {size} bytes, the task {task}"
            );
        }
    }
}
