//! The async driver of a client connection, for the `interprocess` and
//! `tokio` backends: one Tokio task that writes every queued frame, reads
//! results into the policy core, and hands them to their callers.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::AsyncWrite;
use tokio::sync::Notify;

use super::{IoWake, Link, LinkHandle, Waiter};
use crate::policy::client::ClientConnection;
use crate::transport::Connection;

/// Starts the task that drives `connection`.
pub(super) fn start(connection: Connection, core: ClientConnection<Waiter>) -> LinkHandle {
    let link = Arc::new(Link::new(core, IoWake::Task(Notify::new())));
    tokio::spawn(run(connection, link.clone()));
    LinkHandle { link }
}

/// Ends the connection for its callers however the driving task ends: on
/// its own, or dropped because the runtime it ran on shut down (a client
/// used from another runtime then connects afresh instead of waiting on a
/// connection nothing drives).
struct Ending<'a> {
    link: &'a Link,
    reason: &'static str,
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        let reason = {
            let mut core = self.link.lock();
            core.close(self.reason.to_owned());
            core.closed_reason().unwrap_or_default().to_owned()
        };
        self.link.settle();
        tracing::debug!(%reason, "connection ended");
    }
}

async fn run(mut connection: Connection, link: Arc<Link>) {
    #[allow(irrefutable_let_patterns)] // Refutable when legacy is compiled in.
    let IoWake::Task(wake) = &link.io else {
        unreachable!("started with a task waker")
    };
    let mut ending = Ending {
        link: &link,
        reason: "the runtime that drove the connection shut down",
    };
    while !link.finished() {
        let deadline = link.lock().poll_timeout();
        tokio::select! {
            () = poll_fn(|cx| drive_io(cx, &mut connection, &link)) => {}
            () = wake.notified() => {}
            () = sleep_until(deadline), if deadline.is_some() => {
                link.lock().handle_timeout(Instant::now());
            }
        }
        link.settle();
    }
    // Ended by the core (its reason stands) or because nobody holds it.
    ending.reason = "the client was dropped";
    drop(ending);
    // Tasks given up on may still be queued on the server: let it drop them.
    connection.discard_unsent();
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// Writes every queued frame and reads whatever has arrived, holding the
/// core's lock only for the non-blocking polls; ready once either made
/// progress (or failed, which the core records).
fn drive_io(cx: &mut Context<'_>, connection: &mut Connection, link: &Link) -> Poll<()> {
    let mut core = link.lock();
    let mut progressed = false;
    while !core.pending_output().is_empty() {
        match Pin::new(&mut *connection).poll_write(cx, core.pending_output()) {
            Poll::Ready(Ok(0)) => {
                core.on_io_error(&std::io::ErrorKind::WriteZero.into());
                return Poll::Ready(());
            }
            Poll::Ready(Ok(written)) => {
                core.on_written(written, Instant::now());
                progressed = true;
            }
            Poll::Ready(Err(error)) => {
                core.on_io_error(&error);
                return Poll::Ready(());
            }
            Poll::Pending => break,
        }
    }
    if core.wants_read() {
        match tokio_util::io::poll_read_buf(Pin::new(&mut *connection), cx, core.read_buffer()) {
            Poll::Ready(Ok(0)) => core.on_eof(Instant::now()),
            Poll::Ready(Ok(read)) => core.on_read(read, Instant::now()),
            Poll::Ready(Err(error)) => core.on_io_error(&error),
            Poll::Pending if !progressed => return Poll::Pending,
            Poll::Pending => {}
        }
        return Poll::Ready(());
    }
    if progressed {
        Poll::Ready(())
    } else {
        Poll::Pending
    }
}
