//! The async driver of the server, for the `interprocess` and `tokio`
//! backends: an accept loop and one Tokio task per connection, each feeding
//! its connection's [`ServerConnection`] and doing what it says.

use std::collections::HashMap;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::AsyncWrite;
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, Id as TokioTaskId, JoinSet};
use tokio_util::sync::DropGuard;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::slots::Admitted;
use super::{
    ACCEPT_BACKOFF_MAX, ACCEPT_BACKOFF_MIN, DriverWake, HandlerOutcome, Handling, Shared, Started,
    TaskHandler, bind_error, panicked, start_handler,
};
use crate::backoff::Backoff;
use crate::config::TransportKind;
use crate::endpoint::Endpoint;
use crate::error::IpcError;
use crate::policy::server::{ServerConnection, ServerEvent, TaskTicket};
use crate::telemetry::{ActiveConnection, bump};
use crate::transport::{Connection, Listener};

/// Binds `endpoint` with `transport` and spawns the accept loop on `tasks`.
pub(super) fn start<H: TaskHandler>(
    transport: TransportKind,
    endpoint: &Endpoint,
    shared: Arc<Shared>,
    handler: Arc<H>,
    tasks: TaskTracker,
) -> Result<Started, IpcError> {
    #[cfg(unix)]
    let (listener, bound) = {
        let (socket, bound) =
            crate::endpoint::unix::bind(endpoint.path(), shared.socket_group.as_ref())?;
        let listener = Listener::wrap(transport, socket)
            .map_err(|source| bind_error(endpoint, transport, source))?;
        (listener, bound)
    };
    #[cfg(windows)]
    let listener = Listener::bind(transport, endpoint)
        .map_err(|source| bind_error(endpoint, transport, source))?;
    let watch = Watch {
        transport,
        #[cfg(unix)]
        socket: bound.watch(),
    };
    let stopped = shared.accepting_stopped.clone().drop_guard();
    tasks.spawn(accept_loop(
        listener,
        stopped,
        watch,
        shared,
        handler,
        tasks.clone(),
    ));
    Ok(Started {
        #[cfg(unix)]
        endpoint: bound,
        wake: DriverWake::Tokens,
    })
}

/// What the accept loop needs to bind its socket again (Unix) if the file
/// goes while it serves.
struct Watch {
    #[cfg_attr(windows, allow(dead_code))]
    transport: TransportKind,
    #[cfg(unix)]
    socket: crate::endpoint::unix::SocketWatch,
}

impl Watch {
    /// A new listener if the socket file was lost and bound again.
    fn rebind_if_lost(&self) -> Option<Listener> {
        #[cfg(unix)]
        {
            let socket = match self.socket.rebind_if_lost() {
                Ok(socket) => socket?,
                Err(error) => {
                    tracing::error!(%error, "cannot bind the socket again; new clients cannot connect");
                    return None;
                }
            };
            match Listener::wrap(self.transport, socket) {
                Ok(listener) => Some(listener),
                Err(error) => {
                    tracing::error!(%error, "cannot listen on the socket bound again");
                    None
                }
            }
        }
        #[cfg(windows)]
        None
    }
}

/// Accepts until shutdown; `stopped` fires when it and its listener are gone.
async fn accept_loop<H: TaskHandler>(
    listener: Listener,
    stopped: DropGuard,
    watch: Watch,
    shared: Arc<Shared>,
    handler: Arc<H>,
    tasks: TaskTracker,
) {
    // Bound before the listener, so dropped after it.
    let _stopped = stopped;
    let mut listener = listener;
    let mut backoff = Backoff::new(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
    let mut checks = tokio::time::interval(crate::endpoint::SOCKET_CHECK_INTERVAL);
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let accepted = tokio::select! {
            _ = shared.stop_accepting.cancelled() => break,
            accepted = listener.accept() => accepted,
            _ = checks.tick() => {
                if let Some(rebound) = watch.rebind_if_lost() {
                    listener = rebound;
                }
                continue;
            }
        };
        match accepted {
            Ok(connection) => {
                backoff.reset();
                bump(&shared.counters.accepted);
                let id = shared.next_connection_id();
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
                    _ = shared.stop_accepting.cancelled() => break,
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
        if !shared.admit_peer(peer) {
            return;
        }
        let Some(_slot) = wait_for_slot(&shared).await else {
            shared.refused_for_limit();
            return;
        };
        let _active = ActiveConnection::enter(&shared.counters);
        tracing::debug!("serving");
        let outcome = serve(connection, &shared, handler).await;
        shared.connection_ended(outcome);
    }
    .instrument(span)
    .await
}

/// A slot held; released when dropped.
struct Slot<'a>(&'a Shared);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.slots.release(Instant::now());
    }
}

/// A serving slot, waited for up to `accept_timeout`; `None` if none freed
/// (or the waiting room is full, or the server is stopping).
async fn wait_for_slot(shared: &Shared) -> Option<Slot<'_>> {
    let (admit, mut admitted) = oneshot::channel();
    let (id, deadline) = match shared
        .slots
        .arrive(move |_| admit.send(()).is_ok(), Instant::now())
    {
        Admitted::Now => return Some(Slot(shared)),
        Admitted::Refused => return None,
        Admitted::Later { id, deadline } => (id, deadline),
    };
    tracing::debug!("all slots taken; waiting for one");
    let got_one = tokio::select! {
        _ = shared.stop_reading.cancelled() => false,
        got = tokio::time::timeout_at(deadline.into(), &mut admitted) => matches!(got, Ok(Ok(()))),
    };
    // The receiver is still alive here, so a slot handed over between the
    // wait ending and the withdrawal is ours: withdrawing says so.
    // (Lazily: a `Slot` built and dropped would release a slot not held.)
    (got_one || !shared.slots.withdraw(id)).then(|| Slot(shared))
}

/// Serves `connection` until the peer leaves, a frame is bad, a deadline
/// passes, or the server stops.
async fn serve<H: TaskHandler>(
    mut connection: Connection,
    shared: &Shared,
    handler: Arc<H>,
) -> Result<(), IpcError> {
    let mut core = ServerConnection::new(
        shared.limits,
        shared.counters.clone(),
        shared.budget.clone(),
        shared.encodings.clone(),
        Instant::now(),
    );
    let mut handlers = Handlers::default();
    let abort = shared.abort.cancelled();
    let stop_reading = shared.stop_reading.cancelled();
    tokio::pin!(abort, stop_reading);
    let mut stopping = false;

    let outcome = loop {
        while let Some(event) = core.poll_event() {
            match event {
                ServerEvent::StartTask { ticket, task } => {
                    if let Some(outcome) = handlers.start(ticket, task, &handler) {
                        core.task_finished(ticket, outcome, Instant::now());
                    }
                }
                ServerEvent::CancelTask { ticket } => handlers.cancel(ticket),
            }
        }
        if let Some(outcome) = core.poll_close() {
            break outcome;
        }
        let deadline = core.poll_timeout();
        tokio::select! {
            biased;
            _ = &mut abort => break Ok(()),
            Some((ticket, outcome)) = handlers.next_done() => {
                core.task_finished(ticket, outcome, Instant::now());
            }
            _ = &mut stop_reading, if !stopping => {
                stopping = true;
                core.stop_reading(Instant::now());
            }
            () = poll_fn(|cx| drive_io(cx, &mut connection, &mut core)) => {}
            () = sleep_until(deadline), if deadline.is_some() => core.handle_timeout(Instant::now()),
        }
    };
    if outcome.is_err() || shared.abort.is_cancelled() {
        // Whatever we had not delivered is moot: do not hold the connection
        // open on the peer's account (Windows pipes otherwise wait for it).
        connection.discard_unsent();
    }
    outcome
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// Writes whatever output the core has and reads if it wants to; ready once
/// either made progress (or failed, which the core records).
fn drive_io(
    cx: &mut Context<'_>,
    connection: &mut Connection,
    core: &mut ServerConnection,
) -> Poll<()> {
    let mut progressed = false;
    while !core.pending_output().is_empty() {
        match Pin::new(&mut *connection).poll_write(cx, core.pending_output()) {
            Poll::Ready(Ok(0)) => {
                core.on_io_error(std::io::ErrorKind::WriteZero.into());
                return Poll::Ready(());
            }
            Poll::Ready(Ok(written)) => {
                core.on_written(written, Instant::now());
                progressed = true;
            }
            Poll::Ready(Err(error)) => {
                core.on_io_error(error);
                return Poll::Ready(());
            }
            Poll::Pending => break,
        }
    }
    if core.wants_read() {
        match tokio_util::io::poll_read_buf(Pin::new(&mut *connection), cx, core.read_buffer()) {
            Poll::Ready(Ok(0)) => core.on_eof(Instant::now()),
            Poll::Ready(Ok(read)) => core.on_read(read, Instant::now()),
            Poll::Ready(Err(error)) => core.on_io_error(error),
            Poll::Pending => {
                return if progressed {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                };
            }
        }
        return Poll::Ready(());
    }
    if progressed {
        Poll::Ready(())
    } else {
        Poll::Pending
    }
}

/// The handlers running for one connection, each a Tokio task.
#[derive(Default)]
struct Handlers {
    running: JoinSet<(TaskTicket, super::Reply)>,
    /// To answer for a handler that panicked.
    tickets: HashMap<TokioTaskId, TaskTicket>,
    /// To stop a handler past its deadline.
    aborts: HashMap<TaskTicket, AbortHandle>,
}

impl Handlers {
    /// Starts the handler; returns its outcome at once if it needed no
    /// task of its own.
    fn start<H: TaskHandler>(
        &mut self,
        ticket: TaskTicket,
        task: crate::proto::DetectionTask,
        handler: &Arc<H>,
    ) -> Option<HandlerOutcome> {
        match start_handler(handler, task) {
            Handling::Finished(outcome) => Some(outcome),
            Handling::Running(future) => {
                let abort = self
                    .running
                    .spawn(async move { (ticket, future.await) }.in_current_span());
                self.tickets.insert(abort.id(), ticket);
                self.aborts.insert(ticket, abort);
                None
            }
        }
    }

    /// Drops the handler's future.
    fn cancel(&mut self, ticket: TaskTicket) {
        if let Some(abort) = self.aborts.remove(&ticket) {
            abort.abort();
        }
    }

    /// The next handler to finish; `None` at once if none is running.
    async fn next_done(&mut self) -> Option<(TaskTicket, HandlerOutcome)> {
        loop {
            let (id, done) = match self.running.join_next_with_id().await? {
                Ok((id, (ticket, reply))) => (id, Some((ticket, Ok(reply)))),
                // Cancelled: the core has answered for it already.
                Err(error) if error.is_cancelled() => (error.id(), None),
                Err(error) => {
                    let id = error.id();
                    let ticket = self.tickets.get(&id).copied();
                    let reason = match error.try_into_panic() {
                        Ok(panic) => panicked(&*panic),
                        Err(error) => error.to_string(),
                    };
                    (id, ticket.map(|ticket| (ticket, Err(reason))))
                }
            };
            if let Some(ticket) = self.tickets.remove(&id) {
                self.aborts.remove(&ticket);
            }
            if let Some(done) = done {
                return Some(done);
            }
        }
    }
}
