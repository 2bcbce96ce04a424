//! The `legacy` backend: the rollback path. It moves bytes with the
//! operating system's own primitives, on threads of its own, and shares no
//! socket code with the other two backends (on Unix `interprocess` wraps
//! tokio's stream, so those two share tokio's socket path; this one does
//! not touch tokio's I/O, mio or interprocess at all).
//!
//! * Unix ([`unix`]): `std::os::unix::net` sockets in non-blocking mode,
//!   `poll(2)` (through rustix) to wait for readiness, a deadline, or a
//!   wake-up from another thread (an eventfd, or a pipe where there is
//!   none); the peer's credentials come from [`crate::peer`], as for every
//!   backend.
//! * Windows (`windows`): named pipes opened for overlapped I/O through
//!   the Win32 API, each operation waited on with an event, a deadline,
//!   and a wake-up event; busy pipes are an error the client retries.
//!
//! Both offer the same small surface to the blocking drivers
//! ([`crate::server`], [`crate::client`]): [`Stream::read_into`] and
//! [`Stream::write_from`] never block (they return `WouldBlock` when
//! nothing can be done yet), and [`Stream::wait`] blocks until one of them
//! can make progress, the [`Waker`] is woken, or a deadline passes.

#[cfg(unix)]
mod unix;
#[cfg(windows)]
mod windows;

#[cfg(unix)]
pub(crate) use self::unix::{Listener, Stream, Waker, Writer, connect};
#[cfg(windows)]
pub(crate) use self::windows::{Listener, Stream, Waker, Writer, connect};

/// What a driver wants from a stream while it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Interest {
    /// Wake when bytes (or the end of the stream) arrive.
    pub(crate) read: bool,
    /// Wake when there is room to write.
    pub(crate) write: bool,
}
