//! The Phase 1 backend: `tokio::net::UnixListener`/`UnixStream` on Unix,
//! `tokio::net::windows::named_pipe` on Windows.

#[cfg(unix)]
pub(crate) use self::unix::{Listener, Stream, connect, peer_credentials};
#[cfg(windows)]
pub(crate) use self::windows::{Listener, Stream, connect, peer_credentials};

#[cfg(unix)]
mod unix {
    use std::io;
    use std::os::unix::net::UnixListener as StdUnixListener;

    use rustix::fs::Mode;
    use rustix::io::Errno;
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};

    use crate::endpoint::Endpoint;
    use crate::endpoint::unix::{SOCKET_MODE, with_owner_only_umask};
    use crate::transport::PeerCredentials;

    /// Accept queue length; the kernel caps it at `net.core.somaxconn`.
    const BACKLOG: i32 = 1024;

    #[derive(Debug)]
    pub(crate) struct Listener(tokio::net::UnixListener);

    pub(crate) type Stream = tokio::net::UnixStream;

    impl Listener {
        /// `UnixListener::bind` cannot set the mode before the file appears,
        /// so the socket is built by hand: socket, fchmod 0600, bind, listen,
        /// then handed to tokio.
        pub(crate) fn bind(endpoint: &Endpoint) -> io::Result<Listener> {
            let socket = new_socket()?;
            let address = SocketAddrUnix::new(endpoint.path())?;
            match rustix::fs::fchmod(&socket, Mode::from_raw_mode(SOCKET_MODE as _)) {
                Ok(()) => rustix::net::bind(&socket, &address)?,
                // No mode on unbound sockets here (macOS): restrictive umask.
                Err(Errno::INVAL) => {
                    with_owner_only_umask(|| Ok(rustix::net::bind(&socket, &address)?))?
                }
                Err(err) => return Err(err.into()),
            }
            rustix::net::listen(&socket, BACKLOG)?;
            let listener = StdUnixListener::from(socket);
            listener.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(listener).map(Listener)
        }

        pub(crate) async fn accept(&mut self) -> io::Result<Stream> {
            let (stream, _address) = self.0.accept().await?;
            Ok(stream)
        }
    }

    /// A close-on-exec Unix stream socket, atomically where the OS can.
    fn new_socket() -> io::Result<rustix::fd::OwnedFd> {
        #[cfg(not(target_vendor = "apple"))]
        {
            use rustix::net::SocketFlags;
            Ok(rustix::net::socket_with(
                AddressFamily::UNIX,
                SocketType::STREAM,
                SocketFlags::CLOEXEC,
                None,
            )?)
        }
        #[cfg(target_vendor = "apple")]
        {
            let socket = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None)?;
            rustix::io::fcntl_setfd(&socket, rustix::io::FdFlags::CLOEXEC)?;
            Ok(socket)
        }
    }

    pub(crate) async fn connect(endpoint: &Endpoint) -> io::Result<Stream> {
        Stream::connect(endpoint.path()).await
    }

    pub(crate) fn peer_credentials(stream: &Stream) -> io::Result<PeerCredentials> {
        let creds = stream.peer_cred()?;
        Ok(PeerCredentials {
            uid: Some(creds.uid()),
            pid: creds.pid().and_then(|pid| u32::try_from(pid).ok()),
        })
    }
}

#[cfg(windows)]
mod windows {
    use std::io;

    use tokio::net::windows::named_pipe::{
        ClientOptions, NamedPipeClient, NamedPipeServer, ServerOptions,
    };

    use crate::endpoint::{Endpoint, PIPE_SDDL};
    use crate::transport::PeerCredentials;
    use crate::transport::pipe_security::PipeSecurity;

    /// Always one instance waiting for the next client: the one `accept`
    /// awaits. The next is created before a connected one is handed off, so
    /// a client never finds the name missing between two accepts.
    #[derive(Debug)]
    pub(crate) struct Listener {
        name: String,
        security: PipeSecurity,
        waiting: NamedPipeServer,
    }

    #[derive(Debug)]
    pub(crate) enum Stream {
        Server(NamedPipeServer),
        Client(NamedPipeClient),
    }

    fn instance_options() -> ServerOptions {
        let mut options = ServerOptions::new();
        options.reject_remote_clients(true);
        options
    }

    impl Listener {
        pub(crate) fn bind(endpoint: &Endpoint) -> io::Result<Listener> {
            let security = PipeSecurity::from_sddl(PIPE_SDDL)?;
            let name = endpoint.pipe_name().to_owned();
            // first_pipe_instance: fail if another server already owns the name.
            let waiting = security.create(instance_options().first_pipe_instance(true), &name)?;
            Ok(Listener {
                name,
                security,
                waiting,
            })
        }

        pub(crate) async fn accept(&mut self) -> io::Result<Stream> {
            let connected = self.waiting.connect().await;
            // Replace the instance whether or not the connect worked: a failed
            // instance is not reused (no disconnect()+connect()).
            let next = self.security.create(&instance_options(), &self.name)?;
            let instance = std::mem::replace(&mut self.waiting, next);
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

    /// Tokio's pipes expose no peer identity; the security descriptor is
    /// what admits or refuses a client.
    pub(crate) fn peer_credentials(_stream: &Stream) -> io::Result<PeerCredentials> {
        Ok(PeerCredentials::default())
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

    #[cfg(test)]
    mod tests {
        #[test]
        fn pipe_instances_refuse_remote_clients() {
            let options = format!("{:?}", super::instance_options());
            assert!(options.contains("reject_remote_clients: true"), "{options}");
        }
    }
}
