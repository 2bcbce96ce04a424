//! Windows pipe endpoints: refusing to start beside a live server.

use std::io;

use crate::endpoint::Endpoint;
use crate::error::IpcError;

/// Refuses the endpoint if a server already answers on it.
///
/// The pipe's first instance is also created with
/// `FILE_FLAG_FIRST_PIPE_INSTANCE`, which closes the race between this probe
/// and our own bind on Windows; the probe gives the clear error first, and
/// holds where that flag is not enforced (Wine 8 ignores it).
pub(crate) fn refuse_if_served(endpoint: &Endpoint) -> Result<(), IpcError> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(endpoint.pipe_name())
    {
        // No pipe by that name: free.
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        // Connected, all instances busy, or a pipe we may not open: taken.
        _ => Err(IpcError::EndpointInUse {
            endpoint: endpoint.to_string(),
        }),
    }
}
