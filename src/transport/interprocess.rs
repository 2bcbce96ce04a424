//! The Phase 2 backend: `interprocess::local_socket`, one code path for Unix
//! domain sockets and Windows named pipes. The platform differences are the
//! name (a file path, or a pipe path) and how the listener is made (on Unix
//! it wraps the endpoint's socket; on Windows it creates its pipe instances
//! with the same security descriptor).

use std::io;

use interprocess::local_socket::tokio::prelude::*;
#[cfg(unix)]
use interprocess::local_socket::{GenericFilePath, Name};

use crate::endpoint::Endpoint;

pub(crate) use interprocess::local_socket::tokio::Stream;

#[derive(Debug)]
pub(crate) struct Listener(interprocess::local_socket::tokio::Listener);

impl Listener {
    /// Wraps the listening socket the endpoint made (0600 before it
    /// existed). Made from a descriptor, interprocess has no name to
    /// reclaim: the socket file stays the endpoint's to remove.
    #[cfg(unix)]
    pub(crate) fn wrap(socket: std::os::unix::net::UnixListener) -> io::Result<Listener> {
        use interprocess::os::unix::uds_local_socket::tokio::Listener as UdsListener;
        let listener = UdsListener::try_from(std::os::fd::OwnedFd::from(socket))?;
        Ok(Listener(listener.into()))
    }

    /// Creates the pipe's first instance. interprocess creates every
    /// further instance itself, so it cannot wrap the endpoint's pipe
    /// handle; it gets the same descriptor from the same SDDL instead (see
    /// [`pipe_listener_options`]).
    #[cfg(windows)]
    pub(crate) fn bind(endpoint: &Endpoint) -> io::Result<Listener> {
        bind_pipe(endpoint).map(Listener)
    }

    pub(crate) async fn accept(&mut self) -> io::Result<Stream> {
        self.0.accept().await
    }
}

#[cfg(unix)]
fn name(endpoint: &Endpoint) -> io::Result<Name<'_>> {
    endpoint.path().to_fs_name::<GenericFilePath>()
}

/// A named pipe, created through interprocess' named-pipe options beneath
/// `local_socket` (the listener and its streams are still `local_socket`
/// types) to set what `ListenerOptions` cannot; see
/// [`pipe_listener_options`].
#[cfg(windows)]
fn bind_pipe(endpoint: &Endpoint) -> io::Result<interprocess::local_socket::tokio::Listener> {
    use interprocess::os::windows::named_pipe::local_socket::tokio::Listener as PipeLocalListener;
    use interprocess::os::windows::named_pipe::pipe_mode;
    let pipe = pipe_listener_options(endpoint)?.create_tokio_duplex::<pipe_mode::Bytes>()?;
    Ok(interprocess::local_socket::tokio::Listener::from(
        PipeLocalListener::from(pipe),
    ))
}

#[cfg(unix)]
pub(crate) async fn connect(endpoint: &Endpoint) -> io::Result<Stream> {
    Stream::connect(name(endpoint)?).await
}

/// What `local_socket::ListenerOptions` cannot set: 64 KiB pipe buffers
/// instead of 512 bytes, which would cut every large frame into hundreds of
/// pieces; and, explicitly rather than by default, refusal of remote clients.
/// The first instance is created with `FILE_FLAG_FIRST_PIPE_INSTANCE`, so a
/// second server on the name fails.
#[cfg(windows)]
fn pipe_listener_options(
    endpoint: &Endpoint,
) -> io::Result<interprocess::os::windows::named_pipe::PipeListenerOptions<'_>> {
    use interprocess::os::windows::named_pipe::PipeListenerOptions;
    use interprocess::os::windows::security_descriptor::SecurityDescriptor;
    let sddl = widestring::U16CString::from_str(crate::endpoint::PIPE_SDDL)
        .expect("the SDDL constant has no NUL");
    Ok(PipeListenerOptions::new()
        .path(endpoint.pipe_name())
        .accept_remote(false)
        .input_buffer_size_hint(PIPE_BUFFER_BYTES)
        .output_buffer_size_hint(PIPE_BUFFER_BYTES)
        .security_descriptor(Some(SecurityDescriptor::deserialize(&sddl)?)))
}

#[cfg(windows)]
use crate::win32::PIPE_BUFFER_BYTES;

/// Opens the pipe ourselves rather than through `Stream::connect`, for two
/// reasons: the handle must carry `SECURITY_SQOS_PRESENT |
/// SECURITY_IDENTIFICATION`, so that a server squatting the name cannot
/// impersonate the agent (interprocess passes no QoS flags, which means full
/// impersonation); and a busy pipe must fail at once with `ERROR_PIPE_BUSY`
/// for our retry loop, where interprocess would wait on a blocking thread
/// that no deadline can stop.
#[cfg(windows)]
pub(crate) async fn connect(endpoint: &Endpoint) -> io::Result<Stream> {
    let pipe = interprocess::os::windows::named_pipe::local_socket::tokio::Stream::try_from(
        crate::endpoint::windows::open_pipe(endpoint)?,
    )
    .map_err(io::Error::from)?;
    Ok(Stream::from(pipe))
}

/// The socket beneath the stream.
#[cfg(unix)]
pub(crate) fn fd(stream: &Stream) -> std::os::fd::BorrowedFd<'_> {
    match stream {
        Stream::UdSocket(socket) => std::os::fd::AsFd::as_fd(socket.inner()),
    }
}

/// Windows: lets a closing pipe drop what the peer has not read, instead of
/// handing it to interprocess' linger pool, where a peer that stopped reading
/// would pin a blocking thread for as long as it keeps its end open.
pub(crate) fn discard_unsent(stream: &Stream) {
    #[cfg(windows)]
    #[allow(irrefutable_let_patterns)] // NamedPipe is the only variant on Windows.
    if let Stream::NamedPipe(pipe) = stream {
        pipe.inner().assume_flushed();
    }
    #[cfg(unix)]
    let _ = stream;
}

/// The pipe handle under a Windows stream.
#[cfg(windows)]
pub(crate) fn pipe_handle(stream: &Stream) -> std::os::windows::io::BorrowedHandle<'_> {
    use std::os::windows::io::AsHandle;
    match stream {
        Stream::NamedPipe(pipe) => pipe.inner().as_handle(),
    }
}

/// Who is on the other end, read from the socket or pipe beneath (not
/// through interprocess' own peer credentials, which take a peer in another
/// PID namespace for a reset connection).
pub(crate) fn peer(stream: &Stream) -> io::Result<crate::peer::Peer> {
    #[cfg(unix)]
    {
        crate::peer::of_socket(fd(stream))
    }
    #[cfg(windows)]
    {
        crate::peer::of_pipe(pipe_handle(stream))
    }
}

#[cfg(all(test, windows))]
mod tests {
    use super::*;

    #[test]
    fn pipes_refuse_remote_clients_and_get_large_buffers() {
        let endpoint = Endpoint::parse("daemoneye-test-options").unwrap();
        let options = pipe_listener_options(&endpoint).unwrap();
        assert!(
            !options.accept_remote,
            "PIPE_REJECT_REMOTE_CLIENTS must be set"
        );
        assert_eq!(options.input_buffer_size_hint, 64 * 1024);
        assert_eq!(options.output_buffer_size_hint, 64 * 1024);
        assert!(options.security_descriptor.is_some());
    }
}
