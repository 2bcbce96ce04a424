//! The blocking driver of the server, for the `legacy` backend: an accept
//! thread, and one thread per served connection feeding its
//! [`ServerConnection`]. Handlers still run on the caller's Tokio runtime;
//! each tells its connection's thread when it is done.
//!
//! Threads: one accepting, and at most `max_connections` serving.
//! Connections waiting for a slot are held by the accept thread, not by
//! threads of their own.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::slots::Admitted;
use super::{
    ACCEPT_BACKOFF_MAX, ACCEPT_BACKOFF_MIN, DriverWake, HandlerOutcome, Handling, Shared, Started,
    TaskHandler, bind_error, panicked, start_handler,
};
use crate::backoff::Backoff;
use crate::config::TransportKind;
use crate::endpoint::Endpoint;
use crate::error::IpcError;
use crate::policy::admission::ArrivalId;
use crate::policy::earliest;
use crate::policy::server::{ServerConnection, ServerEvent, TaskTicket};
use crate::telemetry::{ActiveConnection, bump};
use crate::transport::PeerCredentials;
use crate::transport::legacy::{Interest, Listener, Stream, Waker};

/// The wakers of every thread this driver runs, so that a shutdown (whose
/// cancellation tokens threads blocked in the OS cannot watch) reaches them.
#[derive(Clone, Default)]
pub(super) struct Wake {
    threads: Arc<Mutex<HashMap<u64, Waker>>>,
}

impl Wake {
    /// Wakes every thread, which then looks at the cancellation tokens.
    pub(super) fn wake_all(&self) {
        for waker in self.lock().values() {
            waker.wake();
        }
    }

    fn register(&self, id: u64, waker: Waker) {
        self.lock().insert(id, waker);
    }

    fn unregister(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waker>> {
        self.threads
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The accept thread's entry in [`Wake`] (connections count from 1).
const ACCEPT_THREAD: u64 = 0;

/// Binds `endpoint` and starts the accept thread.
pub(super) fn start<H: TaskHandler>(
    endpoint: &Endpoint,
    shared: Arc<Shared>,
    handler: Arc<H>,
    tasks: TaskTracker,
) -> Result<Started, IpcError> {
    let failed = |source| bind_error(endpoint, TransportKind::Legacy, source);
    #[cfg(unix)]
    let (listener, bound) = {
        let (socket, bound) =
            crate::endpoint::unix::bind(endpoint.path(), shared.socket_group.as_ref())?;
        (Listener::wrap(socket).map_err(failed)?, bound)
    };
    #[cfg(windows)]
    let listener = Listener::bind(endpoint).map_err(failed)?;
    let wake = Wake::default();
    let waker = Waker::new().map_err(failed)?;
    wake.register(ACCEPT_THREAD, waker.clone());
    let acceptor = Acceptor {
        listener,
        #[cfg(unix)]
        socket: bound.watch(),
        waker,
        shared,
        handler,
        runtime: Handle::current(),
        wake: wake.clone(),
        tasks: tasks.clone(),
    };
    let token = tasks.token();
    let stopped = acceptor.shared.accepting_stopped.clone().drop_guard();
    std::thread::Builder::new()
        .name("daemoneye-ipc-accept".to_owned())
        .spawn(move || {
            // The acceptor, and its listener, are gone when run returns
            // (or unwinds); only then has accepting stopped.
            acceptor.run();
            drop(stopped);
            drop(token);
        })
        .map_err(failed)?;
    Ok(Started {
        #[cfg(unix)]
        endpoint: bound,
        wake: DriverWake::Threads(wake),
    })
}

/// What the accept thread owns.
struct Acceptor<H> {
    listener: Listener,
    /// To bind the socket again if its file goes while serving.
    #[cfg(unix)]
    socket: crate::endpoint::unix::SocketWatch,
    waker: Waker,
    shared: Arc<Shared>,
    handler: Arc<H>,
    runtime: Handle,
    wake: Wake,
    tasks: TaskTracker,
}

/// An accepted connection, with the waker its thread will use.
struct Accepted {
    stream: Stream,
    waker: Waker,
    id: u64,
    peer: PeerCredentials,
}

/// An accepted connection waiting for a slot.
struct Waiting {
    accepted: Accepted,
    deadline: Instant,
}

impl<H: TaskHandler> Acceptor<H> {
    fn run(mut self) {
        let (admitted_tx, admitted) = mpsc::channel::<ArrivalId>();
        let mut waiting: HashMap<ArrivalId, Waiting> = HashMap::new();
        let mut backoff = Backoff::new(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
        let mut retry_at: Option<Instant> = None;
        let mut next_check = Instant::now() + crate::endpoint::SOCKET_CHECK_INTERVAL;
        // The waker of the next connection's thread, made before accepting:
        // short of descriptors, it is the accept that waits (and backs off),
        // not a connection accepted and then dropped.
        let mut spare: Option<Waker> = None;
        while !self.shared.stop_accepting.is_cancelled() {
            // Waiters a freed slot went to.
            while let Ok(arrival) = admitted.try_recv() {
                if let Some(admitted) = waiting.remove(&arrival) {
                    self.serve(admitted.accepted);
                }
            }
            // Waiters whose time is up.
            let now = Instant::now();
            let expired: Vec<ArrivalId> = waiting
                .iter()
                .filter(|(_, waiter)| waiter.deadline <= now)
                .map(|(&arrival, _)| arrival)
                .collect();
            for arrival in expired {
                // Not withdrawn: admitted just now, and in the channel.
                if self.shared.slots.withdraw(arrival) {
                    let accepted = waiting.remove(&arrival).expect("listed above").accepted;
                    let _span = connection_span(accepted.id, &Ok(accepted.peer)).entered();
                    self.shared.refused_for_limit();
                }
            }
            if retry_at.is_some_and(|at| at <= now) {
                retry_at = None;
            }
            if next_check <= now {
                next_check = now + crate::endpoint::SOCKET_CHECK_INTERVAL;
                self.rebind_if_lost();
            }
            if retry_at.is_none() {
                let accepted = match spare.take() {
                    Some(waker) => self.listener.accept().map(|stream| (stream, waker)),
                    None => Waker::new().and_then(|waker| {
                        spare = Some(waker);
                        Err(std::io::ErrorKind::Interrupted.into())
                    }),
                };
                match accepted {
                    Ok((stream, waker)) => {
                        backoff.reset();
                        self.arrive(stream, waker, &admitted_tx, &mut waiting);
                        continue;
                    }
                    // A spare waker was just made: accept now.
                    Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(error) => {
                        // Typically EMFILE/ENFILE: retrying at once would spin.
                        bump(&self.shared.counters.accept_errors);
                        let delay = backoff.next_delay();
                        tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "accept failed");
                        retry_at = Some(Instant::now() + delay);
                    }
                }
            }
            let deadline = earliest(
                waiting
                    .values()
                    .map(|waiter| Some(waiter.deadline))
                    .chain([retry_at, Some(next_check)]),
            );
            if let Err(error) = self
                .listener
                .wait(retry_at.is_none(), &self.waker, deadline)
            {
                tracing::warn!(%error, "waiting for connections failed");
                retry_at = Some(Instant::now() + backoff.next_delay());
            }
        }
        for (arrival, _) in waiting {
            if !self.shared.slots.withdraw(arrival) {
                self.shared.slots.release(Instant::now());
            }
        }
        self.wake.unregister(ACCEPT_THREAD);
        tracing::debug!("stopped accepting");
    }

    /// Binds the socket again if its file went while serving (Unix).
    fn rebind_if_lost(&mut self) {
        #[cfg(unix)]
        match self.socket.rebind_if_lost() {
            Ok(Some(socket)) => match Listener::wrap(socket) {
                Ok(listener) => self.listener = listener,
                Err(error) => tracing::error!(%error, "cannot listen on the socket bound again"),
            },
            Ok(None) => {}
            Err(error) => {
                tracing::error!(%error, "cannot bind the socket again; new clients cannot connect")
            }
        }
    }

    /// A new connection: checked, then served, held for a slot, or refused.
    fn arrive(
        &mut self,
        stream: Stream,
        waker: Waker,
        admitted: &mpsc::Sender<ArrivalId>,
        waiting: &mut HashMap<ArrivalId, Waiting>,
    ) {
        bump(&self.shared.counters.accepted);
        let id = self.shared.next_connection_id();
        let peer = stream.peer_credentials();
        let _span = connection_span(id, &peer).entered();
        // For the span of the serving thread; Windows admits peers whose
        // credentials it cannot read (the pipe's descriptor decides).
        let credentials = peer.as_ref().ok().copied().unwrap_or_default();
        if !self.shared.admit_peer(peer) {
            return;
        }
        let handoff = {
            let admitted = admitted.clone();
            let waker = self.waker.clone();
            move |arrival| {
                let delivered = admitted.send(arrival).is_ok();
                waker.wake();
                delivered
            }
        };
        let accepted = Accepted {
            stream,
            waker,
            id,
            peer: credentials,
        };
        match self.shared.slots.arrive(handoff, Instant::now()) {
            Admitted::Now => self.serve(accepted),
            Admitted::Later {
                id: arrival,
                deadline,
            } => {
                tracing::debug!("all slots taken; waiting for one");
                waiting.insert(arrival, Waiting { accepted, deadline });
            }
            Admitted::Refused => self.shared.refused_for_limit(),
        }
    }

    /// Starts the thread that serves an admitted connection (holding its
    /// slot until it ends).
    fn serve(&self, accepted: Accepted) {
        let Accepted {
            stream,
            waker,
            id,
            peer,
        } = accepted;
        self.wake.register(id, waker.clone());
        let worker = Worker {
            stream,
            waker,
            shared: self.shared.clone(),
            handler: self.handler.clone(),
            runtime: self.runtime.clone(),
            _token: self.tasks.token(),
        };
        let wake = self.wake.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("daemoneye-ipc-conn-{id}"))
            .spawn(move || {
                let _span = connection_span(id, &Ok(peer)).entered();
                worker.run();
                wake.unregister(id);
            });
        if let Err(error) = spawned {
            let _span = connection_span(id, &Ok(peer)).entered();
            tracing::warn!(%error, "cannot start a thread for the connection; closing it");
            self.wake.unregister(id);
            self.shared.slots.release(Instant::now());
        }
    }
}

fn connection_span(id: u64, peer: &std::io::Result<PeerCredentials>) -> tracing::Span {
    tracing::info_span!(
        "connection",
        id,
        peer_uid = peer.as_ref().ok().and_then(|p| p.uid),
        peer_pid = peer.as_ref().ok().and_then(|p| p.pid),
    )
}

/// What a connection's thread owns.
struct Worker<H> {
    stream: Stream,
    waker: Waker,
    shared: Arc<Shared>,
    handler: Arc<H>,
    runtime: Handle,
    /// Counts the thread as a task of the server until it ends.
    _token: TaskTrackerToken,
}

impl<H: TaskHandler> Worker<H> {
    fn run(mut self) {
        // Handlers are first polled on this thread (one that is done at once
        // needs no task): they may spawn, so they need the runtime's context.
        let runtime = self.runtime.clone();
        let _context = runtime.enter();
        let shared = self.shared.clone();
        let active = ActiveConnection::enter(&shared.counters);
        tracing::debug!("serving");
        let outcome = self.serve();
        drop(active);
        shared.slots.release(Instant::now());
        shared.connection_ended(outcome);
    }

    /// Serves until the peer leaves, a frame is bad, a deadline passes, or
    /// the server stops.
    fn serve(&mut self) -> Result<(), IpcError> {
        let shared = self.shared.clone();
        let mut core = ServerConnection::new(
            shared.limits,
            shared.counters.clone(),
            shared.budget.clone(),
            shared.encodings.clone(),
            Instant::now(),
        );
        let (finished, done) = mpsc::channel::<(TaskTicket, HandlerOutcome)>();
        let mut running: HashMap<TaskTicket, AbortHandle> = HashMap::new();
        let mut stopping = false;
        let outcome = loop {
            if shared.abort.is_cancelled() {
                break Ok(());
            }
            if !stopping && shared.stop_reading.is_cancelled() {
                stopping = true;
                core.stop_reading(Instant::now());
            }
            while let Ok((ticket, outcome)) = done.try_recv() {
                running.remove(&ticket);
                core.task_finished(ticket, outcome, Instant::now());
            }
            while let Some(event) = core.poll_event() {
                match event {
                    ServerEvent::StartTask { ticket, task } => {
                        match start_handler(&self.handler, task) {
                            Handling::Finished(outcome) => {
                                core.task_finished(ticket, outcome, Instant::now());
                            }
                            Handling::Running(future) => {
                                let handle = self.spawn_handler(ticket, future, &finished);
                                running.insert(ticket, handle);
                            }
                        }
                    }
                    ServerEvent::CancelTask { ticket } => {
                        if let Some(handle) = running.remove(&ticket) {
                            handle.abort();
                        }
                    }
                }
            }
            if let Some(outcome) = core.poll_close() {
                break outcome;
            }
            if self.drive_io(&mut core) {
                continue;
            }
            let interest = Interest {
                read: core.wants_read(),
                write: !core.pending_output().is_empty(),
            };
            if let Err(error) = self.stream.wait(interest, &self.waker, core.poll_timeout()) {
                core.on_io_error(error);
                continue;
            }
            core.handle_timeout(Instant::now());
        };
        for handle in running.into_values() {
            handle.abort();
        }
        outcome
    }

    /// Writes and reads what can be without blocking; true if either made
    /// progress (or failed, which the core records).
    fn drive_io(&mut self, core: &mut ServerConnection) -> bool {
        let mut progressed = false;
        if !core.pending_output().is_empty() {
            match self.stream.write_from(core.pending_output()) {
                Ok(written) => {
                    core.on_written(written, Instant::now());
                    progressed = true;
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(error) => {
                    core.on_io_error(error);
                    return true;
                }
            }
        }
        if core.wants_read() {
            match self.stream.read_into(core.read_buffer()) {
                Ok(0) => core.on_eof(Instant::now()),
                Ok(read) => core.on_read(read, Instant::now()),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return progressed,
                Err(error) => core.on_io_error(error),
            }
            return true;
        }
        progressed
    }

    /// Runs a handler that has to wait on the caller's runtime; when it is
    /// done (or panics) it tells this thread.
    fn spawn_handler(
        &self,
        ticket: TaskTicket,
        future: Pin<Box<impl Future<Output = super::Reply> + Send + 'static>>,
        finished: &mpsc::Sender<(TaskTicket, HandlerOutcome)>,
    ) -> AbortHandle {
        let finished = finished.clone();
        let waker = self.waker.clone();
        self.runtime
            .spawn(async move {
                let outcome = CatchUnwind(future).await;
                // The thread may be gone (the connection closed): fine.
                let _ = finished.send((ticket, outcome));
                waker.wake();
            })
            .abort_handle()
    }
}

/// A future whose panic becomes an `Err` naming it, rather than the end of
/// the task that polls it.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future<Output = super::Reply>> Future for CatchUnwind<F> {
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
