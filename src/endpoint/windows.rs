//! Windows pipe endpoints: the one way a secured pipe instance is made, and
//! refusing to start beside a live server.

use std::io;
use std::os::windows::fs::OpenOptionsExt;
use std::os::windows::io::OwnedHandle;
use std::time::{Duration, Instant};

use windows_sys::Win32::Foundation::ERROR_PIPE_BUSY;

use crate::endpoint::{Endpoint, PIPE_SDDL};
use crate::error::IpcError;

/// `SecurityIdentification << 16` (winbase.h): a server may learn who we
/// are but not act as us. std adds `SECURITY_SQOS_PRESENT` itself.
pub(crate) const SECURITY_IDENTIFICATION: u32 = 0x0001_0000;

/// `FILE_FLAG_OVERLAPPED` (winbase.h).
pub(crate) const FILE_FLAG_OVERLAPPED: u32 = 0x4000_0000;

/// Creates one instance of the endpoint's pipe: the owner-only security
/// descriptor ([`PIPE_SDDL`]), remote clients refused, opened for
/// overlapped I/O. With `first`, fails if the name is taken. The `tokio`
/// and `legacy` backends wrap what this returns; `interprocess` creates its
/// own instances (see `docs/decisions.md`).
pub(crate) fn create_pipe_instance(endpoint: &Endpoint, first: bool) -> io::Result<OwnedHandle> {
    crate::win32::create_pipe_instance(endpoint.pipe_name(), first, PIPE_SDDL)
}

/// The pipe instances of a listener: always one waiting for the next client.
/// When that one connects (or fails), [`rotate`](Self::rotate) creates the
/// next before handing it over, so a client never finds the name missing
/// between two accepts, and a failed instance is never reused. `P` is how a
/// backend wraps an instance (tokio's `NamedPipeServer`, the legacy
/// backend's overlapped pipe).
#[derive(Debug)]
pub(crate) struct PipeInstances<P> {
    endpoint: Endpoint,
    waiting: P,
}

impl<P> PipeInstances<P> {
    /// Creates the pipe's first instance, failing if another server owns the
    /// name, and wraps it with `wrap`.
    pub(crate) fn first(
        endpoint: &Endpoint,
        wrap: impl FnOnce(OwnedHandle) -> io::Result<P>,
    ) -> io::Result<PipeInstances<P>> {
        Ok(PipeInstances {
            endpoint: endpoint.clone(),
            waiting: wrap(create_pipe_instance(endpoint, true)?)?,
        })
    }

    /// The instance waiting for a client.
    pub(crate) fn waiting(&mut self) -> &mut P {
        &mut self.waiting
    }

    /// Puts a new instance in the waiting one's place and returns the old.
    pub(crate) fn rotate(
        &mut self,
        wrap: impl FnOnce(OwnedHandle) -> io::Result<P>,
    ) -> io::Result<P> {
        let next = wrap(create_pipe_instance(&self.endpoint, false)?)?;
        Ok(std::mem::replace(&mut self.waiting, next))
    }
}

/// Opens the endpoint's pipe as a client: read and write, overlapped I/O,
/// at the identification impersonation level. Fails at once (no waiting)
/// if every instance is busy (`ERROR_PIPE_BUSY`) or there is no pipe.
pub(crate) fn open_pipe(endpoint: &Endpoint) -> io::Result<OwnedHandle> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(FILE_FLAG_OVERLAPPED)
        .security_qos_flags(SECURITY_IDENTIFICATION)
        .open(endpoint.pipe_name())?;
    Ok(OwnedHandle::from(file))
}

/// How long a pipe name whose every instance is busy may take to go away
/// before it counts as served. A server that has just stopped leaves its
/// name behind until each client notices and closes its end, which takes
/// milliseconds; a live server keeps an instance listening, or stays busy
/// because it is at its connection limit.
const RELEASE_GRACE: Duration = Duration::from_secs(1);

/// How often the name is probed within [`RELEASE_GRACE`].
const PROBE_INTERVAL: Duration = Duration::from_millis(10);

/// Waits, up to [`RELEASE_GRACE`], until no instance of the endpoint's
/// pipe takes a new client, once the server has dropped its listener. A
/// waiting instance dropped through mio (the `tokio` backend) is closed by
/// the completion port a moment later; until then a client may connect to
/// it, and a replacement's bind (which probes the name) would take it for a
/// running server. A connection made here is to that instance, whose
/// server side no one reads: it is let go at once, which also stops the
/// instance listening.
pub(crate) async fn until_not_listening(endpoint: &Endpoint) {
    let give_up = Instant::now() + RELEASE_GRACE;
    while Instant::now() < give_up {
        match open_pipe(endpoint) {
            Ok(instance_on_its_way_out) => drop(instance_on_its_way_out),
            // No pipe, or only instances busy with their clients.
            Err(_) => return,
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// Refuses the endpoint if a server already answers on it.
///
/// The pipe's first instance is also created with
/// `FILE_FLAG_FIRST_PIPE_INSTANCE`, which closes the race between this probe
/// and our own bind on Windows; the probe gives the clear error first, and
/// holds where that flag is not enforced (Wine 8 ignores it). The probe
/// opens the pipe like a client does, at the identification level, so a
/// squatter cannot act as the server that probes it.
pub(crate) async fn refuse_if_served(endpoint: &Endpoint) -> Result<(), IpcError> {
    let give_up = Instant::now() + RELEASE_GRACE;
    loop {
        match open_pipe(endpoint) {
            // No pipe by that name: free.
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            // Every instance busy: a server at its limit, or the name of one
            // that stopped, held until its last client lets go.
            Err(error)
                if error.raw_os_error() == Some(ERROR_PIPE_BUSY as i32)
                    && Instant::now() < give_up =>
            {
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
            // Connected, still busy, or a pipe we may not open: taken.
            _ => {
                return Err(IpcError::EndpointInUse {
                    endpoint: endpoint.to_string(),
                });
            }
        }
    }
}
