//! The backends, which only move bytes. Everything above them (framing,
//! limits, deadlines, peer checks, telemetry) is written once, in the policy
//! core and the two drivers.
//!
//! Two families, one per I/O model:
//!
//! * **Async** ([`Listener`], [`Connection`]): `interprocess` and `tokio`.
//!   A connection is an `AsyncRead + AsyncWrite` byte stream plus the
//!   peer's credentials; the async driver runs it on the caller's runtime.
//!   Dispatch is a closed `enum` over the compiled-in backends, so the hot
//!   path has no trait objects.
//! * **Blocking** ([`legacy`]): the OS's own primitives on threads of their
//!   own, sharing no socket code with the other two.
//!
//! The listening handle itself is made once per OS in
//! [`crate::endpoint`] (a Unix socket that is 0600 from the moment it
//! exists; a Windows pipe instance with the owner-only descriptor), and
//! each backend wraps it where its API allows (see `docs/decisions.md`).
//!
//! Behaviour to design around, checked in the backends' sources:
//!
//! * `interprocess`' tokio stream makes `flush` and `shutdown` no-ops (no
//!   half-close) and does not forward vectored writes, so the drivers write
//!   every ready frame from one contiguous buffer and no protocol step
//!   relies on half-close. See `docs/phase2-evaluation.md`.

#[cfg(feature = "ipc-interprocess")]
mod interprocess;
#[cfg(feature = "ipc-legacy")]
pub(crate) mod legacy;
#[cfg(feature = "ipc-tokio")]
mod tokio_native;

#[cfg(async_backend)]
use std::io;
#[cfg(async_backend)]
use std::pin::Pin;
#[cfg(async_backend)]
use std::task::{Context, Poll};

#[cfg(async_backend)]
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[cfg(async_backend)]
use crate::config::TransportKind;
#[cfg(async_backend)]
use crate::endpoint::Endpoint;
#[cfg(windows)]
pub(crate) use crate::win32::PipeOwner;

/// Who is on the other end of a connection, as far as the OS tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerCredentials {
    /// Effective uid of the peer process (Unix).
    pub uid: Option<u32>,
    /// Effective gid of the peer process (Unix).
    pub gid: Option<u32>,
    /// Process id of the peer, where the OS reports it.
    pub pid: Option<u32>,
}

#[cfg(async_backend)]
/// A bound listener of one of the compiled-in async backends.
#[derive(Debug)]
pub(crate) enum Listener {
    #[cfg(feature = "ipc-interprocess")]
    Interprocess(interprocess::Listener),
    #[cfg(feature = "ipc-tokio")]
    Tokio(tokio_native::Listener),
}

#[cfg(async_backend)]
impl Listener {
    /// Unix: wraps the listening socket [`crate::endpoint::unix::bind`]
    /// made. Must be called within a Tokio runtime.
    #[cfg(unix)]
    pub(crate) fn wrap(
        kind: TransportKind,
        socket: std::os::unix::net::UnixListener,
    ) -> io::Result<Listener> {
        match kind {
            #[cfg(feature = "ipc-interprocess")]
            TransportKind::Interprocess => {
                interprocess::Listener::wrap(socket).map(Listener::Interprocess)
            }
            #[cfg(feature = "ipc-tokio")]
            TransportKind::Tokio => tokio_native::Listener::wrap(socket).map(Listener::Tokio),
            #[allow(unreachable_patterns)] // Reached only when a backend is compiled out.
            other => Err(not_compiled(other)),
        }
    }

    /// Windows: creates the pipe's first instance (see the backends for how
    /// each gets the owner-only descriptor).
    #[cfg(windows)]
    pub(crate) fn bind(kind: TransportKind, endpoint: &Endpoint) -> io::Result<Listener> {
        match kind {
            #[cfg(feature = "ipc-interprocess")]
            TransportKind::Interprocess => {
                interprocess::Listener::bind(endpoint).map(Listener::Interprocess)
            }
            #[cfg(feature = "ipc-tokio")]
            TransportKind::Tokio => tokio_native::Listener::bind(endpoint).map(Listener::Tokio),
            #[allow(unreachable_patterns)] // Reached only when a backend is compiled out.
            other => Err(not_compiled(other)),
        }
    }

    /// Waits for the next client.
    pub(crate) async fn accept(&mut self) -> io::Result<Connection> {
        match self {
            #[cfg(feature = "ipc-interprocess")]
            Listener::Interprocess(listener) => {
                listener.accept().await.map(Connection::Interprocess)
            }
            #[cfg(feature = "ipc-tokio")]
            Listener::Tokio(listener) => listener.accept().await.map(Connection::Tokio),
        }
    }
}

#[cfg(async_backend)]
/// Connects to `endpoint` with the async backend `kind`: one attempt, no
/// retry (the client retries above the seam).
pub(crate) async fn connect(kind: TransportKind, endpoint: &Endpoint) -> io::Result<Connection> {
    match kind {
        #[cfg(feature = "ipc-interprocess")]
        TransportKind::Interprocess => interprocess::connect(endpoint)
            .await
            .map(Connection::Interprocess),
        #[cfg(feature = "ipc-tokio")]
        TransportKind::Tokio => tokio_native::connect(endpoint).await.map(Connection::Tokio),
        #[allow(unreachable_patterns)] // Reached only when a backend is compiled out.
        other => Err(not_compiled(other)),
    }
}

#[cfg(async_backend)]
#[allow(dead_code)] // Unused when every backend is compiled in.
fn not_compiled(kind: TransportKind) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("transport {kind} is not an async backend compiled into this build"),
    )
}

#[cfg(async_backend)]
/// One byte stream, server or client side, of any async backend.
#[derive(Debug)]
pub(crate) enum Connection {
    #[cfg(feature = "ipc-interprocess")]
    Interprocess(interprocess::Stream),
    #[cfg(feature = "ipc-tokio")]
    Tokio(tokio_native::Stream),
}

#[cfg(async_backend)]
impl Connection {
    /// Closing after an error or a hard stop: unsent data may be dropped
    /// rather than kept for a peer that has stopped reading.
    pub(crate) fn discard_unsent(&self) {
        match self {
            #[cfg(feature = "ipc-interprocess")]
            Connection::Interprocess(stream) => interprocess::discard_unsent(stream),
            #[cfg(feature = "ipc-tokio")]
            Connection::Tokio(_) => {} // Tokio's pipes never linger.
        }
    }

    /// Windows, client side: who owns the pipe this connection reached.
    #[cfg(windows)]
    pub(crate) fn pipe_owner(&self) -> io::Result<PipeOwner> {
        let handle = match self {
            #[cfg(feature = "ipc-interprocess")]
            Connection::Interprocess(stream) => interprocess::pipe_handle(stream),
            #[cfg(feature = "ipc-tokio")]
            Connection::Tokio(stream) => std::os::windows::io::AsHandle::as_handle(stream),
        };
        crate::win32::pipe_owner(handle)
    }

    /// Writes as much of `data` as the socket takes now, without waiting:
    /// `WouldBlock` if it takes nothing.
    ///
    /// On Unix this is a system call whatever the runtime has seen of the
    /// socket, and registers no waker. Tokio knows nothing of a new
    /// socket's room until its reactor has turned once, so a write through
    /// [`AsyncWrite::poll_write`] on a connection just made returns
    /// `Pending`, and the client's first task would wait for that turn
    /// (an `epoll_wait` and a wake-up of the connection's task) before a
    /// byte went out. The runtime's idea of the socket's readiness is left
    /// as it was: still "writable" if it was (its next write learns
    /// otherwise from the kernel), and a socket this fills reports room
    /// again as an edge when the peer reads.
    pub(crate) fn write_now(&mut self, data: &[u8]) -> io::Result<usize> {
        #[cfg(unix)]
        {
            use rustix::net::SendFlags;
            let fd = match self {
                #[cfg(feature = "ipc-interprocess")]
                Connection::Interprocess(stream) => interprocess::fd(stream),
                #[cfg(feature = "ipc-tokio")]
                Connection::Tokio(stream) => std::os::fd::AsFd::as_fd(stream),
            };
            #[cfg(not(target_vendor = "apple"))]
            let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
            // No MSG_NOSIGNAL there. A write to a peer that has gone then
            // does what the stream's own writes (`write(2)`) already did:
            // nothing on a socket with SO_NOSIGPIPE (mio sets it on the
            // `tokio` backend's), else SIGPIPE, which a Rust program's
            // runtime ignores from the start.
            #[cfg(target_vendor = "apple")]
            let flags = SendFlags::DONTWAIT;
            loop {
                match rustix::net::send(fd, data, flags) {
                    Err(rustix::io::Errno::INTR) => continue,
                    other => return other.map_err(io::Error::from),
                }
            }
        }
        // Windows: the pipe's own write, polled once. It waits for nothing
        // either, but goes through Tokio's readiness: `WouldBlock` (it took
        // nothing) leaves a no-op waker registered, and the caller then
        // wakes the driver, whose next poll registers its own.
        #[cfg(windows)]
        {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            match Pin::new(self).poll_write(&mut cx, data) {
                Poll::Ready(outcome) => outcome,
                Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
            }
        }
    }

    /// Who is on the other end ([`crate::peer`] reads it, the same way for
    /// every backend).
    pub(crate) fn peer(&self) -> io::Result<crate::peer::Peer> {
        match self {
            #[cfg(feature = "ipc-interprocess")]
            Connection::Interprocess(stream) => interprocess::peer(stream),
            #[cfg(feature = "ipc-tokio")]
            Connection::Tokio(stream) => tokio_native::peer(stream),
        }
    }
}

#[cfg(async_backend)]
/// Forwards a poll method to whichever backend holds the connection.
macro_rules! dispatch {
    ($self:ident, $stream:ident => $call:expr) => {
        match $self.get_mut() {
            #[cfg(feature = "ipc-interprocess")]
            Connection::Interprocess($stream) => $call,
            #[cfg(feature = "ipc-tokio")]
            Connection::Tokio($stream) => $call,
        }
    };
}

#[cfg(async_backend)]
impl AsyncRead for Connection {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        dispatch!(self, stream => Pin::new(stream).poll_read(cx, buf))
    }
}

#[cfg(async_backend)]
impl AsyncWrite for Connection {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Windows: mio takes all it is given into a buffer of its own and
        // reports it written at once, before the peer has read any of it.
        // Handing it at most one pipe buffer at a time keeps "written"
        // honest, so a peer that stops reading trips the write deadline,
        // and bounds what a stalled connection holds in that copy.
        #[cfg(windows)]
        let buf = &buf[..buf.len().min(crate::win32::PIPE_BUFFER_BYTES as usize)];
        dispatch!(self, stream => Pin::new(stream).poll_write(cx, buf))
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        dispatch!(self, stream => Pin::new(stream).poll_flush(cx))
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        dispatch!(self, stream => Pin::new(stream).poll_shutdown(cx))
    }
}
