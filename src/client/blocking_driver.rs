//! The blocking driver of a client connection, for the `legacy` backend:
//! one thread that writes every queued frame, reads results into the policy
//! core, and hands them to their callers. Callers stay async; they wake the
//! thread through its [`Waker`].

use std::sync::Arc;
use std::time::Instant;

use super::{IoWake, Link, LinkHandle, Waiter};
use crate::policy::client::ClientConnection;
use crate::transport::legacy::{Interest, Stream, Waker};

/// Starts the thread that drives `stream`.
pub(super) fn start(stream: Stream, core: ClientConnection<Waiter>) -> std::io::Result<LinkHandle> {
    let waker = Waker::new()?;
    let io = IoWake::Thread {
        waker: waker.clone(),
        writer: stream.writer(),
    };
    let link = Arc::new(Link::new(core, io));
    let driven = link.clone();
    std::thread::Builder::new()
        .name("daemoneye-ipc-client".to_owned())
        .spawn(move || run(stream, &driven, &waker))?;
    Ok(LinkHandle { link })
}

fn run(mut stream: Stream, link: &Link, waker: &Waker) {
    while !link.finished() {
        let (progressed, interest, deadline) = {
            let mut core = link.lock();
            let progressed = drive_io(&mut stream, &mut core);
            let interest = Interest {
                read: core.wants_read(),
                write: !core.pending_output().is_empty(),
            };
            (progressed, interest, core.poll_timeout())
        };
        link.settle();
        if progressed {
            continue;
        }
        if let Err(error) = stream.wait(interest, waker, deadline) {
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

/// Writes and reads what can be without blocking (the calls return at
/// once, so holding the core's lock over them is brief); true if either
/// made progress or failed.
fn drive_io(stream: &mut Stream, core: &mut ClientConnection<Waiter>) -> bool {
    let mut progressed = false;
    if !core.pending_output().is_empty() {
        match stream.write_from(core.pending_output()) {
            Ok(written) => {
                core.on_written(written, Instant::now());
                progressed = true;
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(error) => {
                core.on_io_error(&error);
                return true;
            }
        }
    }
    if core.wants_read() {
        match stream.read_into(core.read_buffer()) {
            Ok(0) => core.on_eof(Instant::now()),
            Ok(read) => core.on_read(read, Instant::now()),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return progressed,
            Err(error) => core.on_io_error(&error),
        }
        return true;
    }
    progressed
}
