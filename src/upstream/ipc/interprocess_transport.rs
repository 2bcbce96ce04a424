//! `daemoneye_lib::ipc::interprocess_transport`: DaemonEye's server and
//! client, as this crate's [`IpcServer`] and [`IpcClient`].
//!
//! The names and signatures are DaemonEye's; what happens underneath is
//! this crate's: a second server on a live endpoint is refused instead of
//! taking the socket over, a client keeps its connection between tasks,
//! `graceful_shutdown` lets tasks in flight finish, a panicking handler is
//! answered with an error. `docs/upstream-compat.md` lists every
//! difference.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::IpcConfig;
use super::codec::{IpcError, IpcResult};
use crate::proto::{DetectionResult, DetectionTask};
use crate::{IpcClient, IpcServer};

/// A handler as DaemonEye stores it.
type Handler = Arc<
    dyn Fn(DetectionTask) -> Pin<Box<dyn Future<Output = IpcResult<DetectionResult>> + Send>>
        + Send
        + Sync,
>;

/// The collector's side: serves [`DetectionTask`]s with a handler.
///
/// [`start`](Self::start) binds and returns once the endpoint accepts
/// connections; each connection is served on the Tokio runtime `start` was
/// called on (the `legacy` backend moves bytes on threads of its own).
pub struct InterprocessServer {
    config: IpcConfig,
    handler: Option<Handler>,
    server: Option<IpcServer>,
}

impl InterprocessServer {
    /// A server for `config`, not yet listening.
    pub fn new(config: IpcConfig) -> Self {
        InterprocessServer {
            config,
            handler: None,
            server: None,
        }
    }

    /// Sets (or replaces) the handler the next [`start`](Self::start)
    /// serves with. A handler's `Err` is answered with
    /// `success = false` and the error's text, and its connection carries
    /// on.
    pub fn set_handler<F, Fut>(&mut self, handler: F)
    where
        F: Fn(DetectionTask) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = IpcResult<DetectionResult>> + Send + 'static,
    {
        self.handler = Some(Arc::new(move |task| Box::pin(handler(task))));
    }

    /// Binds the endpoint and starts serving; returns once connections are
    /// accepted. A server this one started before is stopped first.
    ///
    /// Fails with [`IpcError::Encode`] ("No message handler set") without a
    /// handler; with [`IpcError::Io`] naming the problem if the settings
    /// are refused, the endpoint is unsafe or another server holds it.
    pub async fn start(&mut self) -> IpcResult<()> {
        let Some(handler) = self.handler.clone() else {
            return Err(IpcError::Encode("No message handler set".to_owned()));
        };
        if let Some(previous) = self.server.take() {
            previous.shutdown(Duration::ZERO).await;
        }
        let config = self.config.native(true)?;
        let answer = move |task: DetectionTask| {
            let task_id = task.task_id.clone();
            let answer = handler(task);
            async move {
                answer.await.unwrap_or_else(|error| DetectionResult {
                    task_id,
                    success: false,
                    error_message: Some(error.to_string()),
                    ..Default::default()
                })
            }
        };
        self.server = Some(IpcServer::bind(config, answer).await?);
        Ok(())
    }

    /// Stops accepting and removes the socket at once, lets the tasks in
    /// flight be answered (for as long as a handler may take: five sixths
    /// of `read_timeout_ms`), then closes every connection. Always `Ok`.
    pub async fn graceful_shutdown(&mut self) -> IpcResult<()> {
        if let Some(server) = self.server.take() {
            let grace = Duration::from_millis(crate::config::answerable_within(
                self.config.read_timeout_ms,
            ));
            server.shutdown(grace).await;
        }
        Ok(())
    }

    /// Stops now: the socket goes and every connection is cut, without
    /// waiting for tasks in flight.
    pub fn stop(&mut self) {
        // Dropping the server cancels its listener and connections; the
        // socket file goes with the listener.
        self.server = None;
    }
}

/// The agent's side: sends [`DetectionTask`]s, one at a time.
///
/// Unlike DaemonEye's, which connects for every task, the connection is
/// kept between tasks and opened again when needed, trying for
/// `accept_timeout_ms` while a restarted collector comes back.
pub struct InterprocessClient {
    config: IpcConfig,
    client: Option<IpcClient>,
}

impl InterprocessClient {
    /// A client for `config`; connects on the first
    /// [`send_task`](Self::send_task).
    pub fn new(config: IpcConfig) -> Self {
        InterprocessClient {
            config,
            client: None,
        }
    }

    /// Sends `task` and waits for its result (`write_timeout_ms` to write,
    /// `read_timeout_ms` for the answer). A result with `success = false`
    /// is `Ok`; the client is usable after any error.
    ///
    /// A task over `max_frame_bytes` is [`IpcError::TooLarge`], and nothing
    /// is sent. A task needs a `task_id`, which is how its result is
    /// matched to it: an empty one is refused ([`IpcError::Io`], invalid
    /// input).
    pub async fn send_task(&mut self, task: DetectionTask) -> IpcResult<DetectionResult> {
        let client = match &self.client {
            Some(client) => client,
            None => {
                let client = IpcClient::new(self.config.native(false)?)?;
                self.client.insert(client)
            }
        };
        Ok(client.send(task).await?)
    }
}
