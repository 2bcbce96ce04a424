//! The async driver of a client connection, for the `interprocess` and
//! `tokio` backends: one Tokio task that reads results into the policy core
//! and hands them to their callers, and writes the frames callers queued:
//! all of them while several tasks are in flight, or what the socket did
//! not take at once from the caller of the only one ([`write_now`]).
//!
//! The caller of the only task in flight also reads its own answer
//! ([`read_own_answer`]): the socket wakes that caller, not the driver,
//! which would then have to wake the caller (two tasks run per round trip
//! instead of one). Tokio keeps one waker per direction of a socket, so
//! while a caller reads the driver does not; the caller hands reading back
//! when it is done or gone ([`hand_back_reading`]), and the driver takes
//! it over when a second task starts.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker, ready};
use std::time::Instant;

use tokio::sync::Notify;

use super::{IoWake, Link, LinkHandle, Waiter};
use crate::drive::wake_gate::WakeGate;
use crate::policy::client::{ClientConnection, Ticket};
use crate::transport::Connection;

/// The connection as the driver and its callers share it.
pub(super) struct Socket {
    connection: Connection,
    /// The task whose caller reads the socket now (its task was the only
    /// one in flight when it was written), if any: until it hands reading
    /// back, the driver only writes.
    reader: Option<Ticket>,
    /// The reading caller's waker, for an outcome it did not read itself
    /// (its deadline passed, the connection was closed): it does not wait on
    /// its channel, whose sender would wake it at each of its own reads.
    reader_waker: Option<Waker>,
    /// The driver task's waker, which a caller handing reading back
    /// registers for the socket's reads (so the driver need not run to do
    /// so). `None` until the driver first polled the socket, which it then
    /// still will.
    driver: Option<Waker>,
}

/// Starts the task that drives `connection`.
pub(super) fn start(connection: Connection, core: ClientConnection<Waiter>) -> LinkHandle {
    let io = IoWake::Task {
        notify: Notify::new(),
        socket: Mutex::new(Some(Socket {
            connection,
            reader: None,
            reader_waker: None,
            driver: None,
        })),
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
///
/// If it wrote the whole frame of `ticket`, the only task in flight, its
/// caller reads the answer itself: true.
pub(super) fn write_now(
    socket: &mut Socket,
    core: &mut ClientConnection<Waiter>,
    ticket: Ticket,
) -> bool {
    write_all_now(&mut socket.connection, core);
    let reads =
        core.pending_output().is_empty() && core.closed_reason().is_none() && core.in_flight() == 1;
    if reads {
        socket.reader = Some(ticket);
    }
    reads
}

fn write_all_now(connection: &mut Connection, core: &mut ClientConnection<Waiter>) {
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
        if let IoWake::Task { socket, .. } = &self.link.io {
            let socket = lock(socket).take();
            if let Some(socket) = socket {
                // Tasks given up on may still be queued on the server: let
                // it drop them. Dropping the connection closes it, whoever
                // still holds the link.
                socket.connection.discard_unsent();
            }
        }
        tracing::debug!(%reason, "connection ended");
    }
}

async fn run(mut ending: Ending) {
    let link = ending.link.clone();
    #[allow(irrefutable_let_patterns)] // Refutable when legacy is compiled in.
    let IoWake::Task { notify, socket } = &link.io else {
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
        #[cfg(test)]
        link.driver_rounds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Callers wake us for a deadline before the one the timer is set for.
        let wanted = link.lock().driver_timer(armed);
        if let Some(at) = wanted
            && wanted != armed
        {
            timer.as_mut().reset(at.into());
        }
        armed = wanted;
        tokio::select! {
            () = poll_fn(|cx| drive_io(cx, socket, &link)) => {}
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

fn lock(socket: &Mutex<Option<Socket>>) -> std::sync::MutexGuard<'_, Option<Socket>> {
    socket
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes every queued frame and reads whatever has arrived (unless a
/// caller reads), holding the core's lock only for the non-blocking polls;
/// ready once either made progress (or failed, which the core records).
fn drive_io(cx: &mut Context<'_>, socket: &Mutex<Option<Socket>>, link: &Link) -> Poll<()> {
    let mut revoked = None;
    let progress = {
        // The core's lock first, then the socket's, as callers take them.
        let mut core = link.lock();
        let mut socket = lock(socket);
        let Some(socket) = socket.as_mut() else {
            return Poll::Pending;
        };
        if !socket
            .driver
            .as_ref()
            .is_some_and(|driver| driver.will_wake(cx.waker()))
        {
            socket.driver = Some(cx.waker().clone());
        }
        if socket.reader.is_some() && core.in_flight() > 1 {
            // Other callers wait for answers too: read them here rather than
            // leave them to a caller whose future may not be polled for a
            // while (held in a `select!` across other work). It is woken to
            // wait on its channel like the others.
            socket.reader = None;
            revoked = socket.reader_waker.take();
        }
        let connection = &mut socket.connection;
        if socket.reader.is_some() {
            // Polling the read would take the socket's waker from the caller.
            match crate::drive::async_io::write(cx, connection, &mut *core) {
                Poll::Ready(Ok(false)) | Poll::Pending => Poll::Pending,
                Poll::Ready(_) => Poll::Ready(()),
            }
        } else {
            crate::drive::async_io::drive_io(cx, connection, &mut *core)
        }
    };
    if let Some(caller) = revoked {
        caller.wake();
    }
    progress
}

/// The caller of `ticket` reads what has arrived into the core, with its
/// waker registered for more and for outcomes others deliver: ready once
/// something was read (settle the link to deliver it). `None` if it is not
/// the reader (any more): the connection ended, or others' tasks came and
/// the driver took reading over.
pub(super) fn read_own_answer(
    cx: &mut Context<'_>,
    link: &Link,
    ticket: Ticket,
) -> Option<Poll<()>> {
    #[allow(irrefutable_let_patterns)] // Refutable when legacy is compiled in.
    let IoWake::Task { socket, .. } = &link.io else {
        return None;
    };
    let mut core = link.lock();
    let mut socket = lock(socket);
    let socket = socket
        .as_mut()
        .filter(|socket| socket.reader == Some(ticket))?;
    if !socket
        .reader_waker
        .as_ref()
        .is_some_and(|waker| waker.will_wake(cx.waker()))
    {
        socket.reader_waker = Some(cx.waker().clone());
    }
    Some(crate::drive::async_io::read(
        cx,
        &mut socket.connection,
        &mut *core,
    ))
}

/// Wakes the reading caller, if there is one: an outcome was delivered by
/// someone else. (Once: its next poll leaves its waker again.)
pub(super) fn wake_reader(socket: &Mutex<Option<Socket>>) {
    let waker = match lock(socket).as_mut() {
        Some(socket) if socket.reader.is_some() => socket.reader_waker.take(),
        _ => None,
    };
    // Woken with no lock held: a waker may run code of its own.
    if let Some(waker) = waker {
        waker.wake();
    }
}

/// The caller of `ticket` stops reading (it has its outcome, or is gone):
/// the driver reads from now on. Its waker is registered for the socket
/// here, so it need not run to do that, unless bytes have come already:
/// those are read into the core now, and the driver is woken to read on.
pub(super) fn hand_back_reading(link: &Link, ticket: Ticket) {
    #[allow(irrefutable_let_patterns)] // Refutable when legacy is compiled in.
    let IoWake::Task { socket, .. } = &link.io else {
        return;
    };
    let woken = {
        let mut core = link.lock();
        let mut socket = lock(socket);
        let Some(socket) = socket.as_mut() else {
            return;
        };
        if socket.reader != Some(ticket) {
            return;
        }
        socket.reader = None;
        socket.reader_waker = None;
        // Without a waker the driver has not polled the socket yet; it will.
        let Some(driver) = socket.driver.clone() else {
            return;
        };
        let mut cx = Context::from_waker(&driver);
        crate::drive::async_io::read(&mut cx, &mut socket.connection, &mut *core)
            .is_ready()
            .then_some(driver)
    };
    // With no lock held: a waker may run code of its own.
    if let Some(driver) = woken {
        driver.wake();
        link.settle();
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::future::Future;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use crate::config::{IpcConfig, TransportKind};
    use crate::proto::{DetectionResult, DetectionTask};
    use crate::{IpcClient, IpcServer};

    fn task(id: &str) -> DetectionTask {
        DetectionTask {
            task_id: id.to_owned(),
            ..Default::default()
        }
    }

    /// Runs `calls` on a current-thread runtime, with a client of each
    /// async backend and a server, on a runtime of its own, that answers
    /// every task at once but those whose id starts with "held", which it
    /// never answers. The read timeout is long past every wait here, so
    /// the driver's timer cannot stand in for a read the rules owe.
    fn with_each_backend<F: Future<Output = ()>>(calls: impl Fn(IpcClient, IpcServer) -> F) {
        let kinds = [
            #[cfg(feature = "ipc-interprocess")]
            TransportKind::Interprocess,
            #[cfg(feature = "ipc-tokio")]
            TransportKind::Tokio,
        ];
        for transport in kinds {
            let dir = tempfile::tempdir().unwrap();
            let config = IpcConfig {
                transport,
                endpoint_path: dir.path().join("s.sock").display().to_string(),
                read_timeout_ms: 300_000,
                ..IpcConfig::default()
            };
            let serving = tokio::runtime::Runtime::new().unwrap();
            let server = serving
                .block_on(IpcServer::bind(
                    config.clone(),
                    |task: DetectionTask| async move {
                        if task.task_id.starts_with("held") {
                            std::future::pending::<()>().await;
                        }
                        DetectionResult {
                            task_id: task.task_id,
                            success: true,
                            ..Default::default()
                        }
                    },
                ))
                .unwrap();
            let calling = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            calling.block_on(calls(IpcClient::new(config).unwrap(), server));
        }
    }

    async fn link(client: &IpcClient) -> std::sync::Arc<super::LinkHandle> {
        client.inner.link.lock().await.clone().unwrap()
    }

    /// Dropping the server closes the connection: an idle client learns of
    /// it only if someone reads the socket.
    async fn close_is_seen(client: &IpcClient, server: IpcServer, after: &str) {
        let link = link(client).await;
        drop(server);
        let deadline = Instant::now() + Duration::from_secs(20);
        while link.link.lock().closed_reason().is_none() {
            assert!(
                Instant::now() < deadline,
                "{}: nobody read the socket after {after}",
                client.transport()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A task alone in flight is answered to its caller by the socket: the
    /// driver's loop runs no round for it (it would, were it to read the
    /// answer and wake the caller). Reading is handed back to the driver
    /// after each: when the server goes, the idle connection learns of it
    /// with no task sent.
    #[test]
    fn a_lone_tasks_caller_reads_its_answer_and_hands_reading_back() {
        with_each_backend(|client, server| async move {
            client.send(task("first")).await.unwrap();
            let link = link(&client).await;
            let rounds = || link.link.driver_rounds.load(Ordering::Relaxed);
            let before = rounds();
            for i in 0..20 {
                let id = format!("lone-{i}");
                assert_eq!(client.send(task(&id)).await.unwrap().task_id, id);
            }
            assert_eq!(
                rounds(),
                before,
                "{}: the driver ran for tasks sent one at a time",
                client.transport()
            );
            close_is_seen(&client, server, "answers read by their callers").await;
        });
    }

    /// A caller dropped while it reads (the task not yet answered) hands
    /// reading back too.
    #[test]
    fn a_reading_caller_dropped_hands_reading_back() {
        with_each_backend(|client, server| async move {
            client.connect_now().await.unwrap();
            let given_up =
                tokio::time::timeout(Duration::from_millis(50), client.send(task("held"))).await;
            assert!(given_up.is_err(), "the server never answers it");
            close_is_seen(&client, server, "a reading caller was dropped").await;
        });
    }

    /// A second task's answer does not wait for the reading caller's future
    /// to be polled: the driver takes reading over once a second task is in
    /// flight. The reader's future is kept, unpolled, while the second is
    /// sent.
    #[test]
    fn a_second_tasks_answer_does_not_wait_for_the_reader() {
        with_each_backend(|client, server| async move {
            let _serving = server;
            client.connect_now().await.unwrap();
            let mut held = std::pin::pin!(client.send(task("held")));
            let first_poll = tokio::time::timeout(Duration::from_millis(50), &mut held).await;
            assert!(first_poll.is_err(), "the server never answers it");
            let second = tokio::time::timeout(Duration::from_secs(20), client.send(task("second")))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{}: the second task's answer was left to the first caller",
                        client.transport()
                    )
                });
            assert_eq!(second.unwrap().task_id, "second");
        });
    }
}
