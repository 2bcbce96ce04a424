//! The blocking driver of the server, for the `legacy` backend: an accept
//! thread, and one thread per served connection feeding its
//! [`ServerConnection`]. Handlers still run on the caller's Tokio runtime;
//! each tells its connection's thread when it is done.
//!
//! Threads: one accepting, and at most `max_connections` serving (each with
//! a stack of [`LEGACY_THREAD_STACK_BYTES`]), taken from the threads the
//! process keeps for connections ([`crate::drive::threads`]). Connections
//! waiting for a slot are held by the accept thread, not by threads of
//! their own; the acceptor in the policy core decides their fate and when
//! to look again.
//!
//! [`LEGACY_THREAD_STACK_BYTES`]: crate::config::LEGACY_THREAD_STACK_BYTES

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::connection::{Handlers, Served};
use super::{
    ACCEPT_BACKOFF_MAX, ACCEPT_BACKOFF_MIN, DriverWake, HandlerOutcome, Handling, NOTICE_WAIT,
    Notice, Shared, Started, TaskHandler, bind_error, connection_span, start_handler,
};
use crate::backoff::Backoff;
use crate::config::TransportKind;
use crate::drive::blocking_io::{drive_io, interest};
use crate::drive::threads::CONNECTION_THREADS;
use crate::endpoint::Endpoint;
use crate::error::IpcError;
use crate::peer::Peer;
use crate::policy::acceptor::{Arrival, ArrivalId, Fate};
use crate::policy::earliest;
use crate::policy::server::TaskTicket;
use crate::proto::DetectionTask;
use crate::telemetry::{ActiveConnection, bump};
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
    let stopped = acceptor
        .shared
        .accepting_stopped_guard(DriverWake::Threads(wake.clone()));
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
    peer: Peer,
}

impl<H: TaskHandler> Acceptor<H> {
    fn run(mut self) {
        // The acceptor's decisions about waiting connections, passed on
        // under its lock; `parked` only holds their streams meanwhile.
        let (tell, fates) = mpsc::channel::<(ArrivalId, Fate)>();
        let mut parked: HashMap<ArrivalId, Accepted> = HashMap::new();
        let mut backoff = Backoff::new(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
        let mut retry_at: Option<Instant> = None;
        let mut next_check = Instant::now() + crate::endpoint::SOCKET_CHECK_INTERVAL;
        // The waker of the next connection's thread, made before accepting:
        // short of descriptors, it is the accept that waits (and backs off),
        // not a connection accepted and then dropped.
        let mut spare: Option<Waker> = None;
        while !self.shared.stop_accepting.is_cancelled() {
            let now = Instant::now();
            self.shared.slots.handle_timeout(|| now);
            self.take_fates(&fates, &mut parked);
            if retry_at.is_some_and(|at| at <= now) {
                retry_at = None;
            }
            if next_check <= now {
                next_check = now + crate::endpoint::SOCKET_CHECK_INTERVAL;
                self.rebind_if_lost();
            }
            if retry_at.is_none() {
                let accepted = match spare.take() {
                    // Kept when nothing was accepted: most accepts find
                    // nothing (each connection's is followed by one that
                    // does), and a waker made and closed for each was two
                    // system calls.
                    Some(waker) => match self.listener.accept() {
                        Ok(stream) => Ok((stream, waker)),
                        Err(error) => {
                            spare = Some(waker);
                            Err(error)
                        }
                    },
                    None => Waker::new().and_then(|waker| {
                        spare = Some(waker);
                        Err(std::io::ErrorKind::Interrupted.into())
                    }),
                };
                match accepted {
                    Ok((stream, waker)) => {
                        backoff.reset();
                        self.arrive(stream, waker, &tell, &mut parked);
                        continue;
                    }
                    // A spare waker was just made, or the accept was
                    // interrupted by a signal: accept now.
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
            // Every deadline here is in the future: the acceptor expired
            // its due waiters above.
            let deadline = earliest([self.shared.slots.poll_timeout(), retry_at, Some(next_check)]);
            if let Err(error) = self
                .listener
                .wait(retry_at.is_none(), &self.waker, deadline)
            {
                tracing::warn!(%error, "waiting for connections failed");
                retry_at = Some(Instant::now() + backoff.next_delay());
            }
        }
        for &arrival in parked.keys() {
            self.shared.slots.withdraw(arrival, Instant::now);
        }
        // Withdrawn ones hear Expired; any admitted meanwhile give their
        // slot back (the server is stopping).
        while let Ok((arrival, fate)) = fates.try_recv() {
            if fate == Fate::Admitted {
                self.shared.slots.release(arrival, Instant::now);
            }
        }
        self.wake.unregister(ACCEPT_THREAD);
        tracing::debug!("stopped accepting");
    }

    /// Serves the parked connections that were admitted, and closes those
    /// whose wait expired.
    fn take_fates(
        &self,
        fates: &mpsc::Receiver<(ArrivalId, Fate)>,
        parked: &mut HashMap<ArrivalId, Accepted>,
    ) {
        while let Ok((arrival, fate)) = fates.try_recv() {
            let Some(accepted) = parked.remove(&arrival) else {
                continue;
            };
            match fate {
                Fate::Admitted => self.serve(arrival, accepted),
                Fate::Expired => {
                    let _span = connection_span(accepted.id, &Ok(accepted.peer.clone())).entered();
                    let notice = self.shared.refused_for_limit(None);
                    self.tell(accepted.stream, notice);
                }
            }
        }
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

    /// A new connection: checked, then served, parked for a slot, or
    /// refused.
    fn arrive(
        &mut self,
        stream: Stream,
        waker: Waker,
        tell: &mpsc::Sender<(ArrivalId, Fate)>,
        parked: &mut HashMap<ArrivalId, Accepted>,
    ) {
        bump(&self.shared.counters.accepted);
        let id = self.shared.next_connection_id();
        let peer = stream.peer();
        let _span = connection_span(id, &peer).entered();
        // For the span of the serving thread; Windows admits peers whose
        // credentials it cannot read (the pipe's descriptor decides).
        let known = peer.as_ref().ok().cloned().unwrap_or_default();
        if let Err(notice) = self.shared.admit_peer(peer) {
            return self.tell(stream, notice);
        }
        let handoff = {
            let tell = tell.clone();
            let waker = self.waker.clone();
            move |arrival, fate| {
                let heard = tell.send((arrival, fate)).is_ok();
                waker.wake();
                heard
            }
        };
        let accepted = Accepted {
            stream,
            waker,
            id,
            peer: known,
        };
        let uid = accepted.peer.credentials.uid;
        let (arrival, admitted) = self.shared.slots.arrive(uid, handoff, Instant::now);
        match admitted {
            Arrival::Admitted => self.serve(arrival, accepted),
            Arrival::Waiting { .. } => {
                tracing::debug!("all slots taken; waiting for one");
                parked.insert(arrival, accepted);
            }
            Arrival::Refused(refusal) => {
                let notice = self.shared.refused_for_limit(Some(refusal));
                self.tell(accepted.stream, notice);
            }
        }
    }

    /// Writes `notice` before `stream` is dropped unserved (waiting at most
    /// [`NOTICE_WAIT`] for the write to be taken).
    fn tell(&self, mut stream: Stream, notice: Notice) {
        let deadline = Instant::now() + NOTICE_WAIT;
        let write = Interest {
            read: false,
            write: true,
        };
        let mut left = &notice.0[..];
        while !left.is_empty() && Instant::now() < deadline {
            match stream.write_from(left) {
                Ok(written) => left = &left[written..],
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    if stream.wait(write, &self.waker, Some(deadline)).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }

    /// Starts the thread that serves an admitted connection (holding its
    /// slot until it ends).
    fn serve(&self, slot: ArrivalId, accepted: Accepted) {
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
            slot: HeldSlot {
                shared: self.shared.clone(),
                id: slot,
            },
            shared: self.shared.clone(),
            handler: self.handler.clone(),
            runtime: self.runtime.clone(),
            _token: self.tasks.token(),
        };
        let wake = self.wake.clone();
        let span = connection_span(id, &Ok(peer));
        let thread_span = span.clone();
        let spawned = CONNECTION_THREADS.run(move || {
            let _span = thread_span.entered();
            // Also if the thread unwinds: a shutdown must not wait on a
            // thread that is gone.
            let _registered = Registered { wake, id };
            worker.run();
        });
        if let Err(error) = spawned {
            // The job was dropped, and with it the worker, whose slot is
            // released on drop.
            let _span = span.entered();
            tracing::warn!(%error, "cannot start a thread for the connection; closing it");
            self.wake.unregister(id);
        }
    }
}

/// A connection thread's entry among the threads a shutdown wakes, removed
/// when the thread ends, however it ends.
struct Registered {
    wake: Wake,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.wake.unregister(self.id);
    }
}

/// A slot held by a connection's thread; released when dropped, so also if
/// the thread unwinds (or never starts) rather than leaked for the
/// server's life.
struct HeldSlot {
    shared: Arc<Shared>,
    id: ArrivalId,
}

impl Drop for HeldSlot {
    fn drop(&mut self) {
        self.shared.slots.release(self.id, Instant::now);
    }
}

/// What a connection's thread owns.
struct Worker<H> {
    stream: Stream,
    waker: Waker,
    /// The slot it holds, released when it ends.
    slot: HeldSlot,
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
        drop(self.slot);
        shared.connection_ended(outcome);
    }

    /// Serves until the peer leaves, a frame is bad, a deadline passes, or
    /// the server stops.
    fn serve(&mut self) -> Result<(), IpcError> {
        let shared = self.shared.clone();
        let wake = {
            let waker = self.waker.clone();
            Box::new(move || waker.wake())
        };
        let mut served = Served::new(
            shared.limits,
            shared.counters.clone(),
            shared.encodings.clone(),
            &shared.budget,
            wake,
            Instant::now(),
        );
        let (finished, done) = mpsc::channel::<(TaskTicket, HandlerOutcome)>();
        let mut handlers = ThreadHandlers {
            shared: &shared,
            handler: &self.handler,
            runtime: &self.runtime,
            waker: &self.waker,
            finished,
            running: HashMap::new(),
        };
        let mut stopping = false;
        let outcome = loop {
            if shared.abort.is_cancelled() {
                break Ok(());
            }
            let core = &mut served.core;
            if !stopping && shared.stop_reading.is_cancelled() {
                stopping = true;
                core.stop_reading(Instant::now());
            }
            while let Ok((ticket, outcome)) = done.try_recv() {
                handlers.running.remove(&ticket);
                core.task_finished(ticket, outcome, Instant::now());
            }
            if let Some(outcome) = served.step(&mut handlers, Instant::now()) {
                break outcome;
            }
            let core = &mut served.core;
            if drive_io(&mut self.stream, core) {
                continue;
            }
            // Woken by the budget too: the next step collects the grant.
            if let Err(error) = self
                .stream
                .wait(interest(core), &self.waker, core.poll_timeout())
            {
                core.on_io_error(error);
                continue;
            }
            core.handle_timeout(Instant::now());
        };
        for handle in handlers.running.into_values() {
            handle.abort();
        }
        outcome
    }
}

/// A connection's handlers: those that have to wait run on the caller's
/// runtime and tell the connection's thread when they are done.
struct ThreadHandlers<'a, H> {
    shared: &'a Shared,
    handler: &'a Arc<H>,
    runtime: &'a Handle,
    waker: &'a Waker,
    finished: mpsc::Sender<(TaskTicket, HandlerOutcome)>,
    running: HashMap<TaskTicket, AbortHandle>,
}

impl<H: TaskHandler> Handlers for ThreadHandlers<'_, H> {
    fn start(&mut self, ticket: TaskTicket, task: Box<DetectionTask>) -> Option<HandlerOutcome> {
        match start_handler(self.shared, self.handler, task) {
            Handling::Finished(outcome) => Some(outcome),
            Handling::Running(future) => {
                let finished = self.finished.clone();
                let waker = self.waker.clone();
                let handle = self
                    .runtime
                    .spawn(async move {
                        let outcome = future.await;
                        // The thread may be gone (the connection closed): fine.
                        let _ = finished.send((ticket, outcome));
                        waker.wake();
                    })
                    .abort_handle();
                self.running.insert(ticket, handle);
                None
            }
        }
    }

    fn cancel(&mut self, ticket: TaskTicket) {
        if let Some(handle) = self.running.remove(&ticket) {
            handle.abort();
        }
    }
}
