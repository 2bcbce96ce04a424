//! The async driver of the server, for the `interprocess` and `tokio`
//! backends: an accept loop and one Tokio task per connection, each feeding
//! its connection's [`ServerConnection`] and doing what it says.

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::sync::futures::Notified;
use tokio::sync::{Notify, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::connection::{Handlers, Served};
use super::{
    ACCEPT_BACKOFF_MAX, ACCEPT_BACKOFF_MIN, AcceptingStopped, DriverWake, HandlerOutcome, Handling,
    NOTICE_WAIT, Notice, Shared, Started, TaskHandler, bind_error, connection_span, start_handler,
};
use crate::backoff::Backoff;
use crate::config::TransportKind;
use crate::drive::async_io::drive_io;
use crate::drive::wake_gate::WakeGate;
use crate::endpoint::Endpoint;
use crate::error::IpcError;
use crate::policy::acceptor::{Arrival, ArrivalId, Fate};
use crate::policy::server::TaskTicket;
use crate::proto::DetectionTask;
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
    let stopped = shared.accepting_stopped_guard(DriverWake::Tokens);
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
    stopped: AcceptingStopped,
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
    let peer = connection.peer();
    let span = connection_span(id, &peer);
    let uid = peer.as_ref().ok().and_then(|peer| peer.credentials.uid);
    async move {
        let mut connection = connection;
        if let Err(notice) = shared.admit_peer(peer) {
            return tell(&mut connection, notice).await;
        }
        let _slot = match wait_for_slot(&shared, uid).await {
            Ok(slot) => slot,
            Err(notice) => return tell(&mut connection, notice).await,
        };
        let _active = ActiveConnection::enter(&shared.counters);
        tracing::debug!("serving");
        let outcome = serve(connection, &shared, handler).await;
        shared.connection_ended(outcome);
    }
    .instrument(span)
    .await
}

/// Writes `notice` before the connection is dropped unserved (at most
/// [`NOTICE_WAIT`]: nothing waits on a peer that does not read).
async fn tell(connection: &mut Connection, notice: Notice) {
    use tokio::io::AsyncWriteExt;
    let _ = tokio::time::timeout(NOTICE_WAIT, connection.write_all(&notice.0)).await;
}

/// A slot held; released when dropped.
struct Slot<'a> {
    shared: &'a Shared,
    id: ArrivalId,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.shared.slots.release(self.id, Instant::now);
    }
}

/// A place in the waiting room. Dropped while still there (the connection's
/// task was cut), it withdraws, and gives back a slot handed over meanwhile.
struct Waiting<'a> {
    shared: &'a Shared,
    id: ArrivalId,
    fate: oneshot::Receiver<Fate>,
    /// The fate has been heard: nothing for Drop to settle.
    heard: bool,
}

impl<'a> Waiting<'a> {
    /// What the acceptor decided: the slot, or why not.
    fn decided(mut self, fate: Fate) -> Result<Slot<'a>, Notice> {
        self.heard = true;
        if fate != Fate::Admitted {
            return Err(self.shared.refused_for_limit(None));
        }
        Ok(Slot {
            shared: self.shared,
            id: self.id,
        })
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.heard {
            return;
        }
        self.shared.slots.withdraw(self.id, Instant::now);
        if let Ok(Fate::Admitted) = self.fate.try_recv() {
            self.shared.slots.release(self.id, Instant::now);
        }
    }
}

/// A serving slot, waited for up to `accept_timeout`; the notice that says
/// why not (counted and logged) if the connection is refused on arrival, no
/// slot frees in time, or the server stops.
async fn wait_for_slot(shared: &Shared, uid: Option<u32>) -> Result<Slot<'_>, Notice> {
    let (tell, fate) = oneshot::channel();
    let (id, arrival) =
        shared
            .slots
            .arrive(uid, move |_, fate| tell.send(fate).is_ok(), Instant::now);
    let deadline = match arrival {
        Arrival::Admitted => return Ok(Slot { shared, id }),
        Arrival::Refused(refusal) => return Err(shared.refused_for_limit(Some(refusal))),
        Arrival::Waiting { deadline } => deadline,
    };
    tracing::debug!("all slots taken; waiting for one");
    let mut waiting = Waiting {
        shared,
        id,
        fate,
        heard: false,
    };
    loop {
        // The acceptor tells the fate; the timer and a shutdown only make
        // it decide (under its lock), so the fate heard is the one decided.
        tokio::select! {
            biased;
            fate = &mut waiting.fate => {
                return waiting.decided(fate.unwrap_or(Fate::Expired));
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                shared.slots.handle_timeout(|| Instant::now().max(deadline));
            }
            () = shared.stop_reading.cancelled() => {
                shared.slots.withdraw(id, Instant::now);
            }
        }
    }
}

/// Serves `connection` until the peer leaves, a frame is bad, a deadline
/// passes, or the server stops.
async fn serve<H: TaskHandler>(
    mut connection: Connection,
    shared: &Shared,
    handler: Arc<H>,
) -> Result<(), IpcError> {
    let granted = Arc::new(Notify::new());
    let wake = {
        let granted = granted.clone();
        Box::new(move || granted.notify_one())
    };
    let mut served = Served::new(
        shared.limits,
        shared.counters.clone(),
        shared.encodings.clone(),
        &shared.budget,
        wake,
        Instant::now(),
    );
    let mut handlers = AsyncHandlers {
        shared,
        handler,
        running: JoinSet::new(),
        aborts: HashMap::new(),
    };
    let mut signals = Signals {
        gate: WakeGate::new(),
        abort: pin!(shared.abort.cancelled()),
        stop_reading: pin!(shared.stop_reading.cancelled()),
        stopping: false,
        granted: &granted,
        grant: pin!(granted.notified()),
    };
    // One timer for the connection's life, moved only when the core's next
    // deadline comes before the one it is set for (an idle deadline moves
    // later with every task; a timer that fires early finds nothing due and
    // is set again).
    let mut timer = pin!(tokio::time::sleep_until(tokio::time::Instant::now()));
    let mut armed: Option<Instant> = None;

    let outcome = loop {
        if let Some(outcome) = served.step(&mut handlers, Instant::now()) {
            break outcome;
        }
        let core = &mut served.core;
        if let Some(deadline) = core.poll_timeout()
            && armed.is_none_or(|armed| deadline < armed)
        {
            timer.as_mut().reset(deadline.into());
            armed = Some(deadline);
        }
        tokio::select! {
            biased;
            signal = poll_fn(|cx| signals.poll(cx)) => match signal {
                Signal::Abort => break Ok(()),
                Signal::StopReading => core.stop_reading(Instant::now()),
                Signal::Granted => {}
            },
            Some((ticket, outcome)) = handlers.next_done() => {
                core.task_finished(ticket, outcome, Instant::now());
            }
            () = poll_fn(|cx| drive_io(cx, &mut connection, core)) => {}
            () = &mut timer, if armed.is_some() => {
                armed = None;
                core.handle_timeout(Instant::now());
            }
        }
    };
    let told_peer = served.core.told_peer();
    if (outcome.is_err() && !told_peer) || shared.abort.is_cancelled() {
        // Whatever we had not delivered is moot: do not hold the connection
        // open on the peer's account (Windows pipes otherwise wait for it).
        // A notice the peer was sent on purpose is not: it must arrive.
        connection.discard_unsent();
    }
    outcome
}

/// Why a connection's loop was woken other than by its socket, a handler
/// or its timer.
enum Signal {
    /// The server stops now.
    Abort,
    /// The server stops taking tasks: answer those in flight, then close.
    StopReading,
    /// The budget granted room this connection was waiting for.
    Granted,
}

/// The connection's quiet wake-up sources, behind one [`WakeGate`]: the
/// shutdown signals fire once in a connection's life and a grant only after
/// a pause for budget, so they are not polled on the socket's wake-ups in
/// between.
struct Signals<'p, 'n, A, S> {
    gate: WakeGate,
    abort: Pin<&'p mut A>,
    stop_reading: Pin<&'p mut S>,
    /// `stop_reading` has fired.
    stopping: bool,
    granted: &'n Notify,
    grant: Pin<&'p mut Notified<'n>>,
}

impl<A, S> Signals<'_, '_, A, S>
where
    A: Future<Output = ()>,
    S: Future<Output = ()>,
{
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Signal> {
        let Some(mut cx) = self.gate.open(cx) else {
            return Poll::Pending;
        };
        let signal = if self.abort.as_mut().poll(&mut cx).is_ready() {
            Signal::Abort
        } else if !self.stopping && self.stop_reading.as_mut().poll(&mut cx).is_ready() {
            self.stopping = true;
            Signal::StopReading
        } else if self.grant.as_mut().poll(&mut cx).is_ready() {
            self.grant.set(self.granted.notified());
            Signal::Granted
        } else {
            return Poll::Pending;
        };
        // The sources after the one that fired were not polled this time.
        self.gate.reopen();
        Poll::Ready(signal)
    }
}

/// The handlers running for one connection, each a Tokio task (those that
/// had to wait; the others were answered at once).
struct AsyncHandlers<'a, H> {
    shared: &'a Shared,
    handler: Arc<H>,
    running: JoinSet<(TaskTicket, HandlerOutcome)>,
    /// To stop a handler past its deadline.
    aborts: HashMap<TaskTicket, AbortHandle>,
}

impl<H: TaskHandler> Handlers for AsyncHandlers<'_, H> {
    fn start(&mut self, ticket: TaskTicket, task: Box<DetectionTask>) -> Option<HandlerOutcome> {
        match start_handler(self.shared, &self.handler, task) {
            Handling::Finished(outcome) => Some(outcome),
            Handling::Running(future) => {
                let abort = self
                    .running
                    .spawn(async move { (ticket, future.await) }.in_current_span());
                self.aborts.insert(ticket, abort);
                None
            }
        }
    }

    fn cancel(&mut self, ticket: TaskTicket) {
        if let Some(abort) = self.aborts.remove(&ticket) {
            abort.abort();
        }
    }
}

impl<H> AsyncHandlers<'_, H> {
    /// The next handler to finish; `None` at once if none is running.
    /// (A handler's panic is its outcome, caught where it is polled; a
    /// handler cancelled past its deadline has been answered already.)
    async fn next_done(&mut self) -> Option<(TaskTicket, HandlerOutcome)> {
        loop {
            match self.running.join_next().await? {
                Ok((ticket, outcome)) => {
                    self.aborts.remove(&ticket);
                    return Some((ticket, outcome));
                }
                Err(_cancelled) => continue,
            }
        }
    }
}
