//! The Phase 2 backend: `interprocess::local_socket`, one code path for Unix
//! domain sockets and Windows named pipes. The platform differences are the
//! name (a file path, or a pipe path) and the security option (a mode before
//! bind, or a security descriptor).

use std::io;

use interprocess::local_socket::tokio::prelude::*;
use interprocess::local_socket::{GenericFilePath, ListenerOptions, Name};

use super::PeerCredentials;
use crate::endpoint::Endpoint;

pub(crate) use interprocess::local_socket::tokio::Stream;

#[derive(Debug)]
pub(crate) struct Listener(interprocess::local_socket::tokio::Listener);

fn name(endpoint: &Endpoint) -> io::Result<Name<'_>> {
    #[cfg(unix)]
    {
        endpoint.path().to_fs_name::<GenericFilePath>()
    }
    #[cfg(windows)]
    {
        endpoint.pipe_name().to_fs_name::<GenericFilePath>()
    }
}

impl Listener {
    pub(crate) fn bind(endpoint: &Endpoint) -> io::Result<Listener> {
        // The socket file's lifetime is managed above the seam (removed on
        // shutdown, stale ones probed before removal), the same for every
        // backend, so interprocess must not unlink anything itself.
        let options = || -> io::Result<ListenerOptions<'_>> {
            Ok(ListenerOptions::new()
                .name(name(endpoint)?)
                .reclaim_name(false))
        };
        #[cfg(unix)]
        let listener = {
            use interprocess::os::unix::local_socket::ListenerOptionsExt;
            // fchmod before bind: the file is 0600 from the moment it exists.
            match options()?
                .mode(crate::endpoint::unix::SOCKET_MODE as _)
                .create_tokio()
            {
                Err(err) if err.kind() == io::ErrorKind::Unsupported => {
                    // Platforms without mode-before-bind (macOS): bind under a
                    // restrictive umask instead.
                    crate::endpoint::unix::with_owner_only_umask(|| options()?.create_tokio())
                }
                other => other,
            }
        }?;
        #[cfg(windows)]
        let listener = {
            use interprocess::os::windows::local_socket::ListenerOptionsExt;
            use interprocess::os::windows::security_descriptor::SecurityDescriptor;
            let sddl = widestring::U16CString::from_str(crate::endpoint::PIPE_SDDL)
                .expect("the SDDL constant has no NUL");
            // interprocess creates the first instance with
            // FILE_FLAG_FIRST_PIPE_INSTANCE and PIPE_REJECT_REMOTE_CLIENTS.
            options()?
                .security_descriptor(SecurityDescriptor::deserialize(&sddl)?)
                .create_tokio()?
        };
        Ok(Listener(listener))
    }

    pub(crate) async fn accept(&mut self) -> io::Result<Stream> {
        self.0.accept().await
    }
}

pub(crate) async fn connect(endpoint: &Endpoint) -> io::Result<Stream> {
    Stream::connect(name(endpoint)?).await
}

pub(crate) fn peer_credentials(stream: &Stream) -> io::Result<PeerCredentials> {
    let creds = stream.peer_creds()?;
    // interprocess' Pid is pid_t (i32) on Unix and already u32 on Windows.
    #[allow(clippy::useless_conversion)]
    let pid = creds.pid().and_then(|pid| u32::try_from(pid).ok());
    Ok(PeerCredentials {
        #[cfg(unix)]
        uid: creds.euid(),
        #[cfg(windows)]
        uid: None,
        pid,
    })
}
