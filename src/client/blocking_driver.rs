//! The blocking driver of a client connection, for the `legacy` backend:
//! one thread that writes every queued frame, reads results into the policy
//! core, and hands them to their callers. Callers stay async; they wake the
//! thread through its [`Waker`]. The thread is one the process keeps for
//! connections ([`crate::drive::threads`]), taken up by the next one when
//! this one ends.

use std::sync::Arc;
use std::time::Instant;

use super::{IoWake, Link, LinkHandle, Waiter};
use crate::drive::blocking_io::{drive_io, interest};
use crate::drive::threads::CONNECTION_THREADS;
use crate::policy::client::ClientConnection;
use crate::transport::legacy::{Stream, Waker};

/// Starts the thread that drives `stream`.
pub(super) fn start(stream: Stream, core: ClientConnection<Waiter>) -> std::io::Result<LinkHandle> {
    let waker = Waker::new()?;
    let io = IoWake::Thread {
        waker: waker.clone(),
        writer: stream.writer(),
    };
    let link = Arc::new(Link::new(core, io));
    let driven = link.clone();
    CONNECTION_THREADS.run(move || run(stream, &driven, &waker))?;
    Ok(LinkHandle { link })
}

fn run(mut stream: Stream, link: &Link, waker: &Waker) {
    // When the wait is to end at the latest, first where the core says and
    // then as [`ClientConnection::driver_timer`] says: kept while the
    // connection is idle, so that the next task's caller normally writes it
    // without waking this thread to move it.
    let mut armed = link.lock().first_driver_wake();
    while !link.finished() {
        let (progressed, interest) = {
            let mut core = link.lock();
            // The calls return at once, so holding the core's lock over
            // them is brief.
            let progressed = drive_io(&mut stream, &mut *core);
            // Callers' deadlines are kept here: they are checked whether or
            // not this round moved bytes, so that steady traffic cannot
            // hold back a caller's timeout.
            let now = Instant::now();
            core.handle_timeout(now);
            if armed.is_some_and(|at| at <= now) {
                armed = None; // Passed, and handled: set again below.
            }
            // Callers wake us for a deadline before this one.
            armed = core.driver_timer(armed);
            (progressed, interest(&*core))
        };
        link.settle();
        if progressed {
            continue;
        }
        if let Err(error) = stream.wait(interest, waker, armed) {
            link.lock().on_io_error(&error);
        }
        link.lock().handle_timeout(Instant::now());
        link.settle();
    }
    let reason = {
        let mut core = link.lock();
        core.close("the client was dropped".to_owned());
        core.closed_reason().unwrap_or_default().to_owned()
    };
    link.settle();
    tracing::debug!(%reason, "connection ended");
}
