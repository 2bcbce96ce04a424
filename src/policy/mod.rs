//! The rules of a connection, as state machines that know no sockets, no
//! clocks and no runtime: the policy core.
//!
//! Every decision about a connection is made here, once, and driven by two
//! I/O models: the async driver (the `interprocess` and `tokio` backends) and
//! the blocking driver (the `legacy` backend, on threads of its own). A
//! driver feeds events in, each with the [`Instant`](std::time::Instant) it
//! happened at, and does what the core asks:
//!
//! ```text
//!  driver                                core
//!  ------                                ----
//!  bytes arrived      --on_read(n, now)-->  decode frames, start tasks
//!  task finished      --task_finished-->    encode the result
//!  bytes written      --on_written(n)-->    advance the output
//!  woke at deadline   --handle_timeout-->   close if a limit passed
//!  budget granted     --on_granted(n)--->   read on
//!                     <--poll_event()----   start or cancel a task
//!                     <--pending_output()-  bytes to write (every ready frame)
//!                     <--read_window()----  how much to read, if at all
//!                     <--budget_request()-  bytes to reserve before reading on
//!                     <--take_released()--  bytes to give back to the budget
//!                     <--poll_timeout()---  when to wake next
//!                     <--poll_close()-----  close, and why
//! ```
//!
//! What connections share (the acceptor, the budget) is a state machine of
//! its own here too; the server keeps each behind one lock
//! (`src/server/slots.rs`, `src/server/budget.rs`) and passes its
//! decisions on.
//!
//! `quinn-proto` is the model: the protocol decides, the driver does I/O and
//! keeps time. Because time only ever comes in as an argument, every timing
//! rule (frame and idle deadlines, the write deadline, the waiting room) is
//! tested exactly with made-up instants, without sleeping.
//!
//! * [`server`]: one served connection: frame and idle deadlines, the
//!   in-flight limit and the backpressure it implies, results encoded as
//!   their handlers finish, drain on shutdown.
//! * [`client`]: one client connection: the pending table that correlates
//!   results with callers by `task_id`, tasks given up on, the in-flight
//!   limit, retirement of a connection that stopped answering.
//! * [`acceptor`]: connection slots and the bounded waiting room in front
//!   of them; the fate of every waiting connection.
//! * [`budget`]: the bytes a server holds for tasks in flight, across its
//!   connections, reserved before the work that needs them starts.
//! * [`encodings`]: the encoding of a shared result, made once for the
//!   whole server.
//! * [`inbound`] and [`outbound`]: the frame streams each side reads and
//!   writes, with their deadlines and buffer limits.

pub(crate) mod acceptor;
pub(crate) mod budget;
pub(crate) mod client;
pub(crate) mod encodings;
pub(crate) mod inbound;
pub(crate) mod outbound;
pub(crate) mod server;

use std::time::{Duration, Instant};

/// Buffer capacity kept between frames. A frame larger than this grows a
/// buffer for itself; once it has gone, the buffer drops back to this size,
/// so one large message does not pin megabytes for as long as the
/// connection lives.
pub(crate) const RETAINED_CAPACITY: usize = 256 * 1024;

/// The earliest of some optional instants.
pub(crate) fn earliest(instants: impl IntoIterator<Item = Option<Instant>>) -> Option<Instant> {
    instants.into_iter().flatten().min()
}

/// A duration in whole milliseconds, for error messages and logs.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
