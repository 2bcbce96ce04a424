//! The async driver of a client connection, for the `interprocess` and
//! `tokio` backends: one Tokio task that reads results into the policy core
//! and hands them to their callers, and writes the frames callers queued:
//! all of them while several tasks are in flight, or what the socket did
//! not take at once from the caller of the only one ([`write_now`]).

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use tokio::sync::Notify;

use super::{IoWake, Link, LinkHandle, Waiter};
use crate::drive::wake_gate::WakeGate;
use crate::policy::client::ClientConnection;
use crate::transport::Connection;

/// Starts the task that drives `connection`.
pub(super) fn start(connection: Connection, core: ClientConnection<Waiter>) -> LinkHandle {
    let io = IoWake::Task {
        notify: Notify::new(),
        connection: Mutex::new(Some(connection)),
    };
    let link = Arc::new(Link::new(core, io));
    // Made here, not in the task: a runtime that shuts down before the task
    // first runs drops it unpolled, and its callers must hear of that too.
    let ending = Ending {
        link: link.clone(),
        reason: "the runtime that drove the connection shut down",
    };
    tokio::spawn(run(ending));
    LinkHandle { link }
}

/// A caller writes the frames queued in `core` itself, as far as the socket
/// takes them without waiting; the driver, woken for the rest, writes it
/// when the socket has room. On Unix the write does not go through the
/// runtime's readiness ([`Connection::write_now`]): on a connection just
/// made, the first task would otherwise wait for the reactor to turn.
pub(super) fn write_now(connection: &mut Connection, core: &mut ClientConnection<Waiter>) {
    while !core.pending_output().is_empty() {
        match connection.write_now(core.pending_output()) {
            Ok(0) => {
                core.on_write_error(&std::io::Error::from(std::io::ErrorKind::WriteZero));
                return;
            }
            Ok(written) => core.on_written(written, Instant::now()),
            // Full: the driver is woken and writes the rest.
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(error) => {
                core.on_write_error(&error);
                return;
            }
        }
    }
}

/// Ends the connection for its callers however the driving task ends: on
/// its own, or dropped because the runtime it ran on shut down (a client
/// used from another runtime then connects afresh instead of waiting on a
/// connection nothing drives).
struct Ending {
    link: Arc<Link>,
    reason: &'static str,
}

impl Drop for Ending {
    fn drop(&mut self) {
        let reason = {
            let mut core = self.link.lock();
            core.close(self.reason.to_owned());
            core.closed_reason().unwrap_or_default().to_owned()
        };
        self.link.settle();
        #[allow(irrefutable_let_patterns)] // Refutable when legacy is compiled in.
        if let IoWake::Task { connection, .. } = &self.link.io {
            let connection = lock(connection).take();
            if let Some(connection) = connection {
                // Tasks given up on may still be queued on the server: let
                // it drop them. Dropping the connection closes it, whoever
                // still holds the link.
                connection.discard_unsent();
            }
        }
        tracing::debug!(%reason, "connection ended");
    }
}

async fn run(mut ending: Ending) {
    let link = ending.link.clone();
    #[allow(irrefutable_let_patterns)] // Refutable when legacy is compiled in.
    let IoWake::Task { notify, connection } = &link.io else {
        unreachable!("started with a task waker")
    };
    // One timer for the connection's life, first set where the core says
    // and then moved only as [`ClientConnection::driver_timer`] says.
    let mut armed = link.lock().first_driver_wake();
    let timer = tokio::time::sleep_until(armed.unwrap_or_else(Instant::now).into());
    tokio::pin!(timer);
    // Callers' requests to write, polled only after one came (the gate
    // spares the `Notify`'s lock on the wake-ups the socket causes).
    let mut gate = WakeGate::new();
    let mut asked = pin!(notify.notified());
    while !link.finished() {
        // Callers wake us for a deadline before the one the timer is set for.
        let wanted = link.lock().driver_timer(armed);
        if let Some(at) = wanted
            && wanted != armed
        {
            timer.as_mut().reset(at.into());
        }
        armed = wanted;
        tokio::select! {
            () = poll_fn(|cx| drive_io(cx, connection, &link)) => {}
            () = poll_fn(|cx| {
                let Some(mut cx) = gate.open(cx) else {
                    return Poll::Pending;
                };
                ready!(asked.as_mut().poll(&mut cx));
                asked.set(notify.notified());
                // The new one must be polled next time to take part.
                gate.reopen();
                Poll::Ready(())
            }) => {}
            () = &mut timer, if armed.is_some() => {
                // Set again at the top of the loop, for whatever is due next.
                armed = None;
                link.lock().handle_timeout(Instant::now());
            }
        }
        link.settle();
    }
    // Ended by the core (its reason stands) or because nobody holds it.
    ending.reason = "the client was dropped";
}

fn lock(connection: &Mutex<Option<Connection>>) -> std::sync::MutexGuard<'_, Option<Connection>> {
    connection
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes every queued frame and reads whatever has arrived, holding the
/// core's lock only for the non-blocking polls; ready once either made
/// progress (or failed, which the core records).
fn drive_io(cx: &mut Context<'_>, connection: &Mutex<Option<Connection>>, link: &Link) -> Poll<()> {
    // The core's lock first, then the connection's, as callers take them.
    let mut core = link.lock();
    let mut connection = lock(connection);
    match connection.as_mut() {
        Some(connection) => crate::drive::async_io::drive_io(cx, connection, &mut *core),
        None => Poll::Pending,
    }
}
