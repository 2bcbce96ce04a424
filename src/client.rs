//! [`IpcClient`]: the agent's side. Connects (retrying while the collector
//! is not there yet), sends [`DetectionTask`]s and matches the results by
//! `task_id`.
//!
//! One connection carries every concurrent [`send`](IpcClient::send). Each
//! connection has two tasks: a writer that takes tasks from a queue and
//! writes one frame each (so a caller that gives up never leaves half a
//! frame on the wire), and a reader that hands each result to the caller
//! waiting for its id. When the connection drops, every caller still waiting
//! gets [`IpcError::ConnectionLost`] at once, and the next `send` connects
//! again.
//!
//! At most [`max_in_flight`](ClientBuilder::max_in_flight) tasks are
//! outstanding on a connection; further sends wait for one to finish. The
//! server stops reading a connection at its own limit, so a client that sent
//! more would find its writes stalled by the server's backpressure and take
//! that for a dead connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{IpcConfig, TransportKind};
use crate::endpoint::Endpoint;
use crate::error::IpcError;
use crate::framed_io::{FrameReader, FrameWriter};
use crate::peer::PeerPolicy;
use crate::proto::{DetectionResult, DetectionTask};
use crate::server::DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION;
use crate::transport::{self, Connection};

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
    connection: tokio::sync::Mutex<Option<Arc<ClientConnection>>>,
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
    /// [`send`](IpcClient::send) waits up to `read_timeout_ms` for one to
    /// finish, then fails with [`IpcError::InFlightLimit`]. A task given up
    /// on counts until its result arrives. Default
    /// [`DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION`], the server's default: keep
    /// it at or below the server's limit
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
                connection: tokio::sync::Mutex::new(None),
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
        let deadline = Instant::now() + self.inner.config.accept_timeout();
        self.current_connection(deadline).await.map(drop)
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
    /// Deadlines: connecting (including waiting for another caller's
    /// connect), `accept_timeout_ms`; a free in-flight slot, when
    /// [`max_in_flight`](ClientBuilder::max_in_flight) tasks are already
    /// outstanding, `read_timeout_ms`; writing the frame, `write_timeout_ms`;
    /// the result, `read_timeout_ms` after the frame is written. Refused: an
    /// empty `task_id`, or one still outstanding on this connection.
    ///
    /// Cancel-safe: dropping the future never corrupts the connection. The
    /// task may still reach the server and run; its id stays reserved until
    /// its result arrives or the connection ends, so a late result can never
    /// be taken for the answer to a later task with the same id.
    pub async fn send(&self, task: DetectionTask) -> Result<DetectionResult, IpcError> {
        if task.task_id.is_empty() {
            return Err(IpcError::EmptyTaskId);
        }
        let config = &self.inner.config;
        let connect_deadline = Instant::now() + config.accept_timeout();
        let task_id = task.task_id.clone();

        // A connection can die between being handed out and the
        // registration; nothing was queued on it yet, so one more try on a
        // fresh connection is safe. An in-flight permit and room in the
        // writer's queue are taken before the id is registered, so that
        // once registered the task is certain to be queued: a caller who
        // gives up while waiting leaves nothing behind.
        let mut attempts = 0;
        let (connection, registration, answer, slot) = loop {
            attempts += 1;
            let connection = self.current_connection(connect_deadline).await?;
            let permit = self.in_flight_permit(&connection, &task_id).await?;
            let registered = match connection.outbox.clone().reserve_owned().await {
                Ok(slot) => connection
                    .pending
                    .register(&task_id, permit)
                    .map(|(r, a)| (r, a, slot)),
                Err(_writer_gone) => Err(Registered::Closed),
            };
            match registered {
                Ok((registration, answer, slot)) => break (connection, registration, answer, slot),
                Err(Registered::Closed) if attempts < 2 => continue,
                Err(Registered::Closed) => {
                    return Err(self.lost(
                        &task_id,
                        "the connection closed as the task was being sent".to_owned(),
                    ));
                }
                Err(Registered::Duplicate) => return Err(IpcError::DuplicateTaskId { task_id }),
            }
        };
        let (sent, written) = oneshot::channel();
        slot.send(Outgoing { task, sent });

        // The writer bounds each frame by write_timeout_ms and fails the
        // connection past it, so this wait ends. If the task was not
        // written, the answer channel already holds the reason.
        let _ = written.await;
        let outcome = tokio::time::timeout(config.read_timeout(), answer).await;
        registration.settle();
        match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(_dropped)) => Err(self.lost(&task_id, connection.pending.closed_reason())),
            Err(_elapsed) => Err(IpcError::ResponseTimeout {
                endpoint: self.inner.endpoint.to_string(),
                task_id,
                waited_ms: config.read_timeout_ms,
            }),
        }
    }

    /// One of the connection's in-flight permits, waited for up to
    /// `read_timeout_ms`: the tasks holding them finish (or time out) by then
    /// unless the server is stuck.
    async fn in_flight_permit(
        &self,
        connection: &ClientConnection,
        task_id: &str,
    ) -> Result<OwnedSemaphorePermit, IpcError> {
        let config = &self.inner.config;
        let permits = connection.in_flight.clone();
        match tokio::time::timeout(config.read_timeout(), permits.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; treat it as the connection ending.
            Ok(Err(_closed)) => Err(self.lost(task_id, connection.pending.closed_reason())),
            Err(_elapsed) => Err(IpcError::InFlightLimit {
                endpoint: self.inner.endpoint.to_string(),
                task_id: task_id.to_owned(),
                in_flight: self.inner.max_in_flight,
                waited_ms: config.read_timeout_ms,
            }),
        }
    }

    /// The live connection, or a new one, by `deadline`.
    async fn current_connection(
        &self,
        deadline: Instant,
    ) -> Result<Arc<ClientConnection>, IpcError> {
        let config = &self.inner.config;
        let mut slot = tokio::time::timeout_at(deadline, self.inner.connection.lock())
            .await
            .map_err(|_| self.connect_timeout("another send was still connecting".to_owned()))?;
        // A connection idle for half the read timeout is about to be closed
        // by the server (its idle limit is read_timeout_ms too); a task sent
        // on it now could cross the server's close. Start afresh instead.
        let idle_limit = config.read_timeout() / 2;
        if let Some(connection) = slot.as_ref().filter(|c| c.pending.usable(idle_limit)) {
            return Ok(connection.clone());
        }
        let connection = Arc::new(self.open(deadline).await?);
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Connects, retrying with jittered backoff while the server is not
    /// there yet, until `deadline`; then checks who the server is.
    async fn open(&self, deadline: Instant) -> Result<ClientConnection, IpcError> {
        let config = &self.inner.config;
        let endpoint = &self.inner.endpoint;
        let mut backoff = Backoff::new(CONNECT_BACKOFF_MIN, CONNECT_BACKOFF_MAX);
        let connection = loop {
            let attempt =
                tokio::time::timeout_at(deadline, transport::connect(config.transport, endpoint))
                    .await;
            let last_error = match attempt {
                // Reading the server's credentials also proves the socket is
                // connected: interprocess can hand back an unconnected one
                // when the server's accept queue was full (ENOTCONN here).
                Ok(Ok(connection)) => match connection.peer_credentials() {
                    Err(error) if server_not_ready(&error) => error.to_string(),
                    credentials => {
                        let untrusted = |reason| IpcError::UntrustedServer {
                            endpoint: endpoint.to_string(),
                            reason: format!("it {reason}"),
                        };
                        self.inner.servers.check(credentials).map_err(untrusted)?;
                        #[cfg(windows)]
                        crate::peer::check_pipe_owner(connection.pipe_owner())
                            .map_err(untrusted)?;
                        break connection;
                    }
                },
                Ok(Err(error)) if server_not_ready(&error) => error.to_string(),
                Ok(Err(source)) => {
                    return Err(IpcError::Connect {
                        endpoint: endpoint.to_string(),
                        transport: config.transport.name(),
                        source,
                    });
                }
                Err(_elapsed) => "the connect attempt itself timed out".to_owned(),
            };
            let retry_at = Instant::now() + backoff.next_delay();
            if retry_at >= deadline {
                return Err(self.connect_timeout(last_error));
            }
            tokio::time::sleep_until(retry_at).await;
        };
        tracing::debug!(endpoint = %endpoint, transport = config.transport.name(), "connected");
        Ok(ClientConnection::start(
            connection,
            config,
            self.inner.max_in_flight,
            endpoint.to_string(),
        ))
    }

    fn lost(&self, task_id: &str, reason: String) -> IpcError {
        IpcError::ConnectionLost {
            endpoint: self.inner.endpoint.to_string(),
            task_id: task_id.to_owned(),
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

type Answer = oneshot::Receiver<Result<DetectionResult, IpcError>>;

/// A task for the writer, and who to tell once its frame is written.
#[derive(Debug)]
struct Outgoing {
    task: DetectionTask,
    sent: oneshot::Sender<()>,
}

/// One connection: the in-flight permits, the writer's queue, the table of
/// callers waiting for results, and the two tasks.
#[derive(Debug)]
struct ClientConnection {
    /// One permit per task outstanding; each pending entry holds one.
    in_flight: Arc<Semaphore>,
    outbox: mpsc::Sender<Outgoing>,
    pending: Arc<PendingTable>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl ClientConnection {
    fn start(
        connection: Connection,
        config: &IpcConfig,
        max_in_flight: usize,
        endpoint: String,
    ) -> ClientConnection {
        let settings = config.frame_settings();
        let (read_half, write_half) = tokio::io::split(connection);
        let pending = Arc::new(PendingTable {
            endpoint,
            inner: Mutex::new(Pending {
                entries: HashMap::new(),
                next_ticket: 0,
                closed: None,
                idle_since: Instant::now(),
            }),
            ended: CancellationToken::new(),
        });
        // Every queued task holds a permit, so the queue never needs more room.
        let (outbox, queue) = mpsc::channel(max_in_flight);
        let reader = FrameReader::new(settings, config.read_timeout());
        let writer = FrameWriter::new(settings, config.write_timeout());
        ClientConnection {
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            outbox,
            reader: tokio::spawn(read_results(read_half, reader, pending.clone())),
            writer: tokio::spawn(write_tasks(write_half, writer, queue, pending.clone())),
            pending,
        }
    }
}

impl Drop for ClientConnection {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// Writes queued tasks, one frame each, until the queue closes or the
/// connection ends.
async fn write_tasks(
    mut io: WriteHalf<Connection>,
    mut writer: FrameWriter<DetectionTask>,
    mut queue: mpsc::Receiver<Outgoing>,
    pending: Arc<PendingTable>,
) {
    let ended = pending.ended.clone();
    let ended = ended.cancelled();
    tokio::pin!(ended);
    loop {
        let Outgoing { task, sent } = tokio::select! {
            _ = &mut ended => return,
            outgoing = queue.recv() => match outgoing {
                Some(outgoing) => outgoing,
                None => return,
            },
        };
        match writer.send(&mut io, &[&task]).await {
            Ok(_) => {
                let _ = sent.send(());
            }
            // Nothing was written; only this task fails.
            Err(error @ IpcError::MessageTooLarge { .. }) => {
                pending.answer(&task.task_id, Err(error))
            }
            Err(error) => return pending.fail_all(&error.to_string()),
        }
    }
}

/// Hands each result to the caller waiting for its id, until the
/// connection ends; then fails everyone still waiting.
async fn read_results(
    mut io: ReadHalf<Connection>,
    mut reader: FrameReader<DetectionResult>,
    pending: Arc<PendingTable>,
) {
    let ended = pending.ended.clone();
    let ended = ended.cancelled();
    tokio::pin!(ended);
    let reason = loop {
        let next = tokio::select! {
            _ = &mut ended => return,
            next = reader.next(&mut io, None) => next,
        };
        match next {
            Ok(Some(result)) => {
                let task_id = result.task_id.clone();
                pending.answer(&task_id, Ok(result));
            }
            Ok(None) => break "the server closed the connection".to_owned(),
            Err(error) => break error.to_string(),
        }
    };
    tracing::debug!(%reason, "connection ended");
    pending.fail_all(&reason);
}

/// Callers waiting for results, by task id.
#[derive(Debug)]
struct PendingTable {
    endpoint: String,
    inner: Mutex<Pending>,
    /// Cancelled when the connection ends: stops the other task.
    ended: CancellationToken,
}

#[derive(Debug)]
struct Pending {
    entries: HashMap<String, Entry>,
    next_ticket: u64,
    /// Set once the connection is dead; no one may register after that.
    closed: Option<String>,
    /// When the last outstanding task was answered.
    idle_since: Instant,
}

#[derive(Debug)]
enum Entry {
    /// A caller waits. The ticket tells its registration from a later one
    /// for the same id.
    Waiting {
        ticket: u64,
        answer: oneshot::Sender<Result<DetectionResult, IpcError>>,
        permit: OwnedSemaphorePermit,
    },
    /// The caller gave up; the result, if it comes, is discarded. The task
    /// still counts as in flight on the server until then.
    Abandoned { _permit: OwnedSemaphorePermit },
}

enum Registered {
    Duplicate,
    Closed,
}

impl PendingTable {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Every critical section is a single map operation: a panic inside
        // one cannot leave the table inconsistent, so poisoning is ignored.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn register(
        self: &Arc<Self>,
        task_id: &str,
        permit: OwnedSemaphorePermit,
    ) -> Result<(Registration, Answer), Registered> {
        let mut pending = self.lock();
        if pending.closed.is_some() {
            return Err(Registered::Closed);
        }
        if pending.entries.contains_key(task_id) {
            return Err(Registered::Duplicate);
        }
        pending.next_ticket += 1;
        let ticket = pending.next_ticket;
        let (answer, receiver) = oneshot::channel();
        pending.entries.insert(
            task_id.to_owned(),
            Entry::Waiting {
                ticket,
                answer,
                permit,
            },
        );
        let registration = Registration {
            pending: self.clone(),
            task_id: task_id.to_owned(),
            ticket,
        };
        Ok((registration, receiver))
    }

    /// Delivers the outcome for `task_id` to its caller, if one still waits.
    fn answer(&self, task_id: &str, outcome: Result<DetectionResult, IpcError>) {
        let mut pending = self.lock();
        match pending.entries.remove(task_id) {
            Some(Entry::Waiting { answer, .. }) => {
                let _ = answer.send(outcome);
            }
            Some(Entry::Abandoned { .. }) => {
                tracing::debug!(%task_id, "discarded the result of a task given up on")
            }
            None => tracing::warn!(%task_id, "result for a task this client never sent"),
        }
        if pending.entries.is_empty() {
            pending.idle_since = Instant::now();
        }
    }

    /// Whether new tasks may go on this connection: alive, and not idle for
    /// `idle_limit` or more.
    fn usable(&self, idle_limit: Duration) -> bool {
        let pending = self.lock();
        // A task given up on still runs on the server, whose idle clock
        // does not run while it has tasks in flight.
        let busy = !pending.entries.is_empty();
        pending.closed.is_none() && (busy || pending.idle_since.elapsed() < idle_limit)
    }

    fn closed_reason(&self) -> String {
        self.lock()
            .closed
            .clone()
            .unwrap_or_else(|| "the connection ended".to_owned())
    }

    /// Marks the connection dead, stops both tasks and fails every waiting
    /// caller.
    fn fail_all(&self, reason: &str) {
        let entries = {
            let mut pending = self.lock();
            pending.closed.get_or_insert_with(|| reason.to_owned());
            std::mem::take(&mut pending.entries)
        };
        self.ended.cancel();
        for (task_id, entry) in entries {
            if let Entry::Waiting { answer, .. } = entry {
                let _ = answer.send(Err(IpcError::ConnectionLost {
                    endpoint: self.endpoint.clone(),
                    task_id,
                    reason: reason.to_owned(),
                }));
            }
        }
    }
}

/// A caller's entry in the pending table. If the caller is done without an
/// answer (timeout, cancellation), the entry stays as `Abandoned` so that
/// the id cannot be reused before the server's late answer is out of the way.
struct Registration {
    pending: Arc<PendingTable>,
    task_id: String,
    ticket: u64,
}

impl Registration {
    /// The caller is done waiting (answered or not).
    fn settle(self) {}

    fn is_ours(&self, entry: Option<&Entry>) -> bool {
        matches!(entry, Some(Entry::Waiting { ticket, .. }) if *ticket == self.ticket)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut pending = self.pending.lock();
        if self.is_ours(pending.entries.get(&self.task_id))
            && let Some(Entry::Waiting { permit, .. }) = pending.entries.remove(&self.task_id)
        {
            pending
                .entries
                .insert(self.task_id.clone(), Entry::Abandoned { _permit: permit });
        }
    }
}
