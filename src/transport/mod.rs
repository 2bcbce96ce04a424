//! The seam between the backends, which only move bytes, and everything above
//! them (framing, limits, deadlines, peer checks, telemetry), which is written
//! once in [`server`](crate::server) and [`client`](crate::client).
//!
//! A backend provides three things: bind a listener on an [`Endpoint`],
//! accept a [`Connection`], connect a client [`Connection`]. A connection is
//! an `AsyncRead + AsyncWrite` byte stream plus the peer's credentials.
//! Dispatch is a closed `enum` over the compiled-in backends, so the hot path
//! has no trait objects.
//!
//! Adding a backend touches this folder and the feature list, nothing else.
//!
//! Behaviour to design around, checked in the backends' sources:
//!
//! * `interprocess`' tokio stream makes `flush` and `shutdown` no-ops (no
//!   half-close) and does not forward vectored writes, so every frame is
//!   written as one contiguous buffer and no protocol step relies on
//!   half-close. See `docs/phase2-evaluation.md`.

#[cfg(feature = "ipc-interprocess")]
mod interprocess;
#[cfg(windows)]
mod pipe_security;
#[cfg(feature = "ipc-tokio")]
mod tokio_native;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::TransportKind;
use crate::endpoint::Endpoint;
#[cfg(windows)]
pub(crate) use pipe_security::PipeOwner;

/// Who is on the other end of a connection, as far as the OS tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerCredentials {
    /// Effective uid of the peer process (Unix).
    pub uid: Option<u32>,
    /// Process id of the peer, where the OS reports it.
    pub pid: Option<u32>,
}

/// A bound listener of one of the compiled-in backends.
#[derive(Debug)]
pub(crate) enum Listener {
    #[cfg(feature = "ipc-interprocess")]
    Interprocess(interprocess::Listener),
    #[cfg(feature = "ipc-tokio")]
    Tokio(tokio_native::Listener),
}

impl Listener {
    /// Binds `endpoint` with `kind`. On Unix the caller has prepared the path
    /// (see [`crate::endpoint`]); the socket file is created 0600 before it
    /// becomes visible. On Windows the pipe admits only its owner, SYSTEM and
    /// Administrators, and refuses remote clients.
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

/// Connects to `endpoint` with `kind`: one attempt, no retry (the client
/// retries above the seam).
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

fn not_compiled(kind: TransportKind) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("transport {kind} is not compiled into this build"),
    )
}

/// One byte stream, server or client side, of any backend.
#[derive(Debug)]
pub(crate) enum Connection {
    #[cfg(feature = "ipc-interprocess")]
    Interprocess(interprocess::Stream),
    #[cfg(feature = "ipc-tokio")]
    Tokio(tokio_native::Stream),
}

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
        pipe_security::pipe_owner(handle)
    }

    /// The peer's credentials. Fields the OS does not report are `None`.
    pub(crate) fn peer_credentials(&self) -> io::Result<PeerCredentials> {
        match self {
            #[cfg(feature = "ipc-interprocess")]
            Connection::Interprocess(stream) => interprocess::peer_credentials(stream),
            #[cfg(feature = "ipc-tokio")]
            Connection::Tokio(stream) => tokio_native::peer_credentials(stream),
        }
    }
}

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

impl AsyncWrite for Connection {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
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
