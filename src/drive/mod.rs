//! The driving loops' shared step: move bytes between a stream and a policy
//! core, once per I/O model.
//!
//! A core ([`crate::policy::server::ServerConnection`] or
//! [`crate::policy::client::ClientConnection`]) says what to write and how
//! much to read; [`async_io::drive_io`] (the `interprocess` and `tokio`
//! backends) and [`blocking_io::drive_io`] (`legacy`) do it and report
//! back. The server's and the client's drivers wrap these in their own
//! loops (handlers and slots on one side, callers on the other), but the
//! bytes move the same way on both sides of every backend.

#[cfg(async_backend)]
pub(crate) mod async_io;
#[cfg(feature = "ipc-legacy")]
pub(crate) mod blocking_io;
#[cfg(feature = "ipc-legacy")]
pub(crate) mod threads;
#[cfg(async_backend)]
pub(crate) mod wake_gate;

use std::io;
use std::time::Instant;

use bytes::BytesMut;

/// A policy core seen from the bytes it moves.
pub(crate) trait StreamCore {
    /// Bytes to write, in order.
    fn pending_output(&self) -> &[u8];
    /// The first `count` bytes of [`pending_output`](Self::pending_output)
    /// were written at `now`.
    fn on_written(&mut self, count: usize, now: Instant);
    /// How many bytes to read now; 0 to read nothing.
    fn read_window(&self) -> usize;
    /// Where to read them: into the spare capacity at the end.
    fn read_buffer(&mut self) -> &mut BytesMut;
    /// `count` bytes were read into [`read_buffer`](Self::read_buffer).
    fn on_read(&mut self, count: usize, now: Instant);
    /// The peer closed its side.
    fn on_eof(&mut self, now: Instant);
    /// Reading failed: the connection is over.
    fn on_io_error(&mut self, error: io::Error);
    /// Writing failed: the peer has gone (what it sent before may still be
    /// read).
    fn on_write_error(&mut self, error: io::Error) {
        self.on_io_error(error);
    }
}

impl StreamCore for crate::policy::server::ServerConnection {
    fn pending_output(&self) -> &[u8] {
        self.pending_output()
    }

    fn on_written(&mut self, count: usize, now: Instant) {
        self.on_written(count, now);
    }

    fn read_window(&self) -> usize {
        if self.wants_read() {
            self.read_window()
        } else {
            0
        }
    }

    fn read_buffer(&mut self) -> &mut BytesMut {
        self.read_buffer()
    }

    fn on_read(&mut self, count: usize, now: Instant) {
        self.on_read(count, now);
    }

    fn on_eof(&mut self, now: Instant) {
        self.on_eof(now);
    }

    fn on_io_error(&mut self, error: io::Error) {
        self.on_io_error(error);
    }
}

impl<W> StreamCore for crate::policy::client::ClientConnection<W> {
    fn pending_output(&self) -> &[u8] {
        self.pending_output()
    }

    fn on_written(&mut self, count: usize, now: Instant) {
        self.on_written(count, now);
    }

    fn read_window(&self) -> usize {
        // A client reads all the server sends: the server bounds it.
        if self.wants_read() { usize::MAX } else { 0 }
    }

    fn read_buffer(&mut self) -> &mut BytesMut {
        self.read_buffer()
    }

    fn on_read(&mut self, count: usize, now: Instant) {
        self.on_read(count, now);
    }

    fn on_eof(&mut self, now: Instant) {
        self.on_eof(now);
    }

    fn on_io_error(&mut self, error: io::Error) {
        self.on_io_error(&error);
    }

    fn on_write_error(&mut self, error: io::Error) {
        self.on_write_error(&error);
    }
}
