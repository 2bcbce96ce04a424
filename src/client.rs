//! [`IpcClient`]: the agent's side. Connects (retrying while the collector
//! is not there yet), sends [`DetectionTask`]s and matches the results by
//! `task_id`.
//!
//! One connection carries every concurrent [`send`](IpcClient::send): each
//! caller registers its `task_id`, writes its frame, and waits; a single
//! reader task hands each result to the caller waiting for that id. When the
//! connection drops, every caller still waiting gets
//! [`IpcError::ConnectionLost`] at once, and the next `send` reconnects.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::{IpcConfig, TransportKind};
use crate::endpoint::Endpoint;
use crate::error::IpcError;
use crate::framed_io::{FrameReader, FrameWriter};
use crate::proto::{DetectionResult, DetectionTask};
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
    /// The current connection, if any. Held across a connect so that
    /// concurrent callers share one attempt.
    connection: tokio::sync::Mutex<Option<Arc<ClientConnection>>>,
}

impl IpcClient {
    /// A client for `config`'s endpoint and transport. Connects lazily, on
    /// the first [`send`](Self::send).
    pub fn new(config: IpcConfig) -> Result<IpcClient, IpcError> {
        config.validate()?;
        let endpoint = Endpoint::parse(&config.endpoint_path)?;
        Ok(IpcClient {
            inner: Arc::new(ClientInner {
                config,
                endpoint,
                connection: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// A client that is already connected: fails like [`send`](Self::send)
    /// would if no server answers within `accept_timeout_ms`.
    pub async fn connect(config: IpcConfig) -> Result<IpcClient, IpcError> {
        let client = IpcClient::new(config)?;
        client.current_connection().await?;
        Ok(client)
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
    /// Deadlines: connecting, `accept_timeout_ms`; writing the frame,
    /// `write_timeout_ms`; the result, `read_timeout_ms` after the write.
    /// Refused: an empty `task_id`, or one already in flight on this client.
    /// Cancel-safe: dropping the future withdraws the task's registration
    /// (the server may still run it).
    pub async fn send(&self, task: DetectionTask) -> Result<DetectionResult, IpcError> {
        if task.task_id.is_empty() {
            return Err(IpcError::EmptyTaskId);
        }
        let (connection, registration, answer) = self.register(&task.task_id).await?;

        if let Err(error) = connection.write(&task).await {
            if matches!(error, IpcError::MessageTooLarge { .. }) {
                return Err(error); // Nothing was written; the connection is fine.
            }
            let reason = error.to_string();
            connection.fail_all(&reason);
            return Err(self.lost(&task.task_id, reason));
        }

        let read_timeout = self.inner.config.read_timeout();
        let outcome = tokio::time::timeout(read_timeout, answer).await;
        drop(registration);
        match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(_closed)) => {
                Err(self.lost(&task.task_id, "the connection's reader stopped".to_owned()))
            }
            Err(_elapsed) => Err(IpcError::ResponseTimeout {
                endpoint: self.inner.endpoint.to_string(),
                task_id: task.task_id,
                waited_ms: read_timeout.as_millis() as u64,
            }),
        }
    }

    /// Registers `task_id` on a live connection (connecting if needed).
    async fn register(
        &self,
        task_id: &str,
    ) -> Result<(Arc<ClientConnection>, Registration, Answer), IpcError> {
        // A connection can die between being handed out and the registration;
        // nothing was sent on it yet, so one retry on a fresh connection is safe.
        for _ in 0..2 {
            let connection = self.current_connection().await?;
            let (sender, answer) = oneshot::channel();
            let mut pending = connection.pending.lock();
            if pending.closed.is_some() {
                continue;
            }
            if pending.waiting.contains_key(task_id) {
                return Err(IpcError::DuplicateTaskId {
                    task_id: task_id.to_owned(),
                });
            }
            pending.next_ticket += 1;
            let ticket = pending.next_ticket;
            pending.waiting.insert(task_id.to_owned(), (ticket, sender));
            drop(pending);
            let registration = Registration {
                pending: connection.pending.clone(),
                task_id: task_id.to_owned(),
                ticket,
            };
            return Ok((connection, registration, answer));
        }
        Err(self.lost(
            task_id,
            "the connection closed as the task was being registered".to_owned(),
        ))
    }

    /// The live connection, or a new one.
    async fn current_connection(&self) -> Result<Arc<ClientConnection>, IpcError> {
        let mut slot = self.inner.connection.lock().await;
        if let Some(connection) = slot.as_ref().filter(|c| c.pending.lock().closed.is_none()) {
            return Ok(connection.clone());
        }
        let connection = Arc::new(self.open().await?);
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Connects, retrying with jittered backoff while the server is not
    /// there yet, until `accept_timeout_ms` has passed.
    async fn open(&self) -> Result<ClientConnection, IpcError> {
        let config = &self.inner.config;
        let endpoint = &self.inner.endpoint;
        let deadline = Instant::now() + config.accept_timeout();
        let mut backoff = Backoff::new(CONNECT_BACKOFF_MIN, CONNECT_BACKOFF_MAX);
        let connection = loop {
            let last_error = match tokio::time::timeout_at(
                deadline,
                transport::connect(config.transport, endpoint),
            )
            .await
            {
                Ok(Ok(connection)) => break connection,
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
                return Err(IpcError::ConnectTimeout {
                    endpoint: endpoint.to_string(),
                    transport: config.transport.name(),
                    waited_ms: config.accept_timeout_ms,
                    last_error,
                });
            }
            tokio::time::sleep_until(retry_at).await;
        };
        tracing::debug!(endpoint = %endpoint, transport = config.transport.name(), "connected");
        Ok(ClientConnection::start(
            connection,
            config,
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
}

/// Errors that mean "no server yet" rather than "this will never work".
fn server_not_ready(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    const ERROR_PIPE_BUSY: i32 = 231;
    matches!(
        error.kind(),
        NotFound | ConnectionRefused | WouldBlock | ConnectionReset
    ) || (cfg!(windows) && error.raw_os_error() == Some(ERROR_PIPE_BUSY))
}

type Answer = oneshot::Receiver<Result<DetectionResult, IpcError>>;

/// One connection: the shared write half, and the table of callers waiting
/// for results, fed by the reader task.
#[derive(Debug)]
struct ClientConnection {
    writer: tokio::sync::Mutex<FrameWriter<WriteHalf<Connection>, DetectionTask>>,
    pending: Arc<PendingTable>,
    reader: JoinHandle<()>,
}

impl ClientConnection {
    fn start(connection: Connection, config: &IpcConfig, endpoint: String) -> ClientConnection {
        let settings = config.frame_settings();
        let (read_half, write_half) = tokio::io::split(connection);
        let pending = Arc::new(PendingTable {
            endpoint,
            inner: Mutex::new(Pending::default()),
        });
        let reader = FrameReader::new(read_half, settings, config.read_timeout());
        ClientConnection {
            writer: tokio::sync::Mutex::new(FrameWriter::new(
                write_half,
                settings,
                config.write_timeout(),
            )),
            reader: tokio::spawn(read_results(reader, pending.clone())),
            pending,
        }
    }

    async fn write(&self, task: &DetectionTask) -> Result<usize, IpcError> {
        self.writer.lock().await.send(task).await
    }

    fn fail_all(&self, reason: &str) {
        self.pending.fail_all(reason);
    }
}

impl Drop for ClientConnection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Hands each result to the caller waiting for its id, until the
/// connection ends; then fails everyone still waiting.
async fn read_results(
    mut reader: FrameReader<ReadHalf<Connection>, DetectionResult>,
    pending: Arc<PendingTable>,
) {
    let reason = loop {
        match reader.next(None).await {
            Ok(Some(result)) => {
                let waiting = pending.lock().waiting.remove(&result.task_id);
                match waiting {
                    Some((_ticket, sender)) => {
                        let _ = sender.send(Ok(result));
                    }
                    None => {
                        tracing::debug!(task_id = %result.task_id, "result for a task no one waits for any more")
                    }
                }
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
}

#[derive(Debug, Default)]
struct Pending {
    /// Each entry carries the ticket of the registration that made it, so a
    /// caller withdrawing late cannot remove a newer caller's entry for the
    /// same (by then reused) id.
    waiting: HashMap<String, (u64, oneshot::Sender<Result<DetectionResult, IpcError>>)>,
    next_ticket: u64,
    /// Set once the connection is dead; no one may register after that.
    closed: Option<String>,
}

impl PendingTable {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (single inserts and removes), so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks the connection dead and fails every waiting caller.
    fn fail_all(&self, reason: &str) {
        let waiting = {
            let mut pending = self.lock();
            pending.closed.get_or_insert_with(|| reason.to_owned());
            std::mem::take(&mut pending.waiting)
        };
        for (task_id, (_ticket, sender)) in waiting {
            let _ = sender.send(Err(IpcError::ConnectionLost {
                endpoint: self.endpoint.clone(),
                task_id,
                reason: reason.to_owned(),
            }));
        }
    }
}

/// A caller's entry in the pending table, withdrawn when the caller is done
/// or gives up (timeout, cancellation).
struct Registration {
    pending: Arc<PendingTable>,
    task_id: String,
    ticket: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut pending = self.pending.lock();
        if pending
            .waiting
            .get(&self.task_id)
            .is_some_and(|(ticket, _)| *ticket == self.ticket)
        {
            pending.waiting.remove(&self.task_id);
        }
    }
}
