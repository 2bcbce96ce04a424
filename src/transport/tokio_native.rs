//! The Phase 1 backend: `tokio::net::UnixListener`/`UnixStream` on Unix,
//! `tokio::net::windows::named_pipe` on Windows.

#[cfg(unix)]
pub(crate) use self::unix::{Listener, Stream, connect, peer};
#[cfg(windows)]
pub(crate) use self::windows::{Listener, Stream, connect, peer};

#[cfg(unix)]
mod unix {
    use std::io;
    use std::os::unix::net::UnixListener;

    use crate::endpoint::Endpoint;

    #[derive(Debug)]
    pub(crate) struct Listener(tokio::net::UnixListener);

    pub(crate) type Stream = tokio::net::UnixStream;

    impl Listener {
        /// Wraps the listening socket the endpoint made (0600 before it
        /// existed; `UnixListener::bind` could not have done that).
        pub(crate) fn wrap(socket: UnixListener) -> io::Result<Listener> {
            socket.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(socket).map(Listener)
        }

        pub(crate) async fn accept(&mut self) -> io::Result<Stream> {
            let (stream, _address) = self.0.accept().await?;
            Ok(stream)
        }
    }

    /// One attempt. Not `UnixStream::connect`, which then waits for the
    /// socket to be writable: a turn of the reactor (about 8 us of a new
    /// connection's round trip) that tells nothing here, since a Unix
    /// socket's non-blocking connect is complete when it returns. It fails
    /// instead, with `WouldBlock` when the server's backlog is full, and
    /// that is retried above the seam like a server not there yet.
    pub(crate) async fn connect(endpoint: &Endpoint) -> io::Result<Stream> {
        let socket = crate::endpoint::unix::new_socket(true)?;
        rustix::net::connect(&socket, &rustix::net::SocketAddrUnix::new(endpoint.path())?)?;
        Stream::from_std(std::os::unix::net::UnixStream::from(socket))
    }

    pub(crate) fn peer(stream: &Stream) -> io::Result<crate::peer::Peer> {
        crate::peer::of_socket(std::os::fd::AsFd::as_fd(stream))
    }
}

#[cfg(windows)]
mod windows {
    use std::io;

    use tokio::net::windows::named_pipe::{ClientOptions, NamedPipeClient, NamedPipeServer};

    use crate::endpoint::Endpoint;
    use crate::endpoint::windows::PipeInstances;

    /// The endpoint's pipe instances, each wrapped as tokio's server end;
    /// `accept` awaits the waiting one.
    #[derive(Debug)]
    pub(crate) struct Listener {
        instances: PipeInstances<NamedPipeServer>,
    }

    #[derive(Debug)]
    pub(crate) enum Stream {
        Server(NamedPipeServer),
        Client(NamedPipeClient),
    }

    impl Listener {
        pub(crate) fn bind(endpoint: &Endpoint) -> io::Result<Listener> {
            let instances = PipeInstances::first(endpoint, crate::win32::tokio_pipe_server)?;
            Ok(Listener { instances })
        }

        pub(crate) async fn accept(&mut self) -> io::Result<Stream> {
            let connected = self.instances.waiting().connect().await;
            let instance = self.instances.rotate(crate::win32::tokio_pipe_server)?;
            connected?;
            Ok(Stream::Server(instance))
        }
    }

    /// One attempt. `ERROR_PIPE_BUSY` (every instance taken) and `NotFound`
    /// (no server yet) are retried by the client above the seam.
    pub(crate) async fn connect(endpoint: &Endpoint) -> io::Result<Stream> {
        ClientOptions::new()
            .open(endpoint.pipe_name())
            .map(Stream::Client)
    }

    /// The client's pid; the security descriptor is what admits or refuses
    /// a client.
    pub(crate) fn peer(stream: &Stream) -> io::Result<crate::peer::Peer> {
        crate::peer::of_pipe(std::os::windows::io::AsHandle::as_handle(stream))
    }

    impl std::os::windows::io::AsHandle for Stream {
        fn as_handle(&self) -> std::os::windows::io::BorrowedHandle<'_> {
            match self {
                Stream::Server(pipe) => pipe.as_handle(),
                Stream::Client(pipe) => pipe.as_handle(),
            }
        }
    }

    impl tokio::io::AsyncRead for Stream {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            match self.get_mut() {
                Stream::Server(pipe) => std::pin::Pin::new(pipe).poll_read(cx, buf),
                Stream::Client(pipe) => std::pin::Pin::new(pipe).poll_read(cx, buf),
            }
        }
    }

    impl tokio::io::AsyncWrite for Stream {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            match self.get_mut() {
                Stream::Server(pipe) => std::pin::Pin::new(pipe).poll_write(cx, buf),
                Stream::Client(pipe) => std::pin::Pin::new(pipe).poll_write(cx, buf),
            }
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            match self.get_mut() {
                Stream::Server(pipe) => std::pin::Pin::new(pipe).poll_flush(cx),
                Stream::Client(pipe) => std::pin::Pin::new(pipe).poll_flush(cx),
            }
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            match self.get_mut() {
                Stream::Server(pipe) => std::pin::Pin::new(pipe).poll_shutdown(cx),
                Stream::Client(pipe) => std::pin::Pin::new(pipe).poll_shutdown(cx),
            }
        }
    }
}
