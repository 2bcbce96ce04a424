//! Endpoint names and the filesystem hardening around them.
//!
//! An [`Endpoint`] is the validated form of `ipc.endpoint_path`:
//!
//! * Unix: an absolute socket path. Abstract-namespace names (`@name`) are
//!   refused: they carry no file permissions. Before binding, the server
//!   creates the parent directory 0700 if it is missing, or refuses it (and
//!   unsafe parents of it) if another user could write to it; it removes a
//!   stale socket left by a crash (only after probing that no server answers),
//!   and refuses symlinks and non-socket files. After binding it checks the
//!   socket came out owner-only and removes it when the server goes away.
//! * Windows: a local named pipe, `\\.\pipe\NAME`; the prefix is optional on
//!   input ([`pipe_name`]). The pipe's security descriptor admits only its
//!   owner, SYSTEM and Administrators ([`PIPE_SDDL`]).
//!
//! Every backend binds the same [`Endpoint`] with the same protections.

pub mod pipe_name;
#[cfg(unix)]
pub(crate) mod unix;
#[cfg(windows)]
pub(crate) mod windows;

use std::fmt;
#[cfg(unix)]
use std::path::{Path, PathBuf};

use crate::error::IpcError;

/// How often a server looks at its socket file, to bind it again if it was
/// removed while serving (Unix; a pipe name has no file to lose): often
/// enough that it is back within a second, at the cost of a `stat` each
/// time.
pub(crate) const SOCKET_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// Unix: the group whose members may connect, from `ipc.socket_group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SocketGroup {
    /// The group's id.
    pub(crate) gid: u32,
    /// How it was named, for messages.
    pub(crate) name: String,
}

impl SocketGroup {
    /// Resolves a group name or a numeric gid; an error says why not, to
    /// follow "invalid ipc.socket_group = ...: ".
    pub(crate) fn resolve(spec: &str) -> Result<SocketGroup, String> {
        #[cfg(unix)]
        {
            let spec = spec.trim();
            let found = match spec.parse::<u32>() {
                Ok(gid) => nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)),
                Err(_) => nix::unistd::Group::from_name(spec),
            };
            match found {
                Ok(Some(group)) => Ok(SocketGroup {
                    gid: group.gid.as_raw(),
                    name: group.name,
                }),
                // A gid with no name in the group database is still a gid.
                Ok(None) => match spec.parse::<u32>() {
                    Ok(gid) => Ok(SocketGroup {
                        gid,
                        name: gid.to_string(),
                    }),
                    Err(_) => Err(format!(
                        "no group named {spec:?} on this system; give an existing group's name or \
                         numeric gid"
                    )),
                },
                Err(error) => Err(format!("looking up the group failed: {error}")),
            }
        }
        #[cfg(windows)]
        {
            let _ = spec;
            Err(
                "socket groups are for Unix sockets; a Windows pipe admits its owner, SYSTEM \
                 and Administrators"
                    .to_owned(),
            )
        }
    }
}

/// The security descriptor of every pipe the server creates, in SDDL:
/// a protected DACL (`P`, nothing inherited) granting full access (`GA`) to
/// the pipe's owner (`OW`), LocalSystem (`SY`) and the built-in
/// Administrators (`BA`), and nothing to anyone else.
pub const PIPE_SDDL: &str = "D:P(A;;GA;;;OW)(A;;GA;;;SY)(A;;GA;;;BA)";

/// A validated endpoint: a Unix socket path or a local Windows pipe name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    #[cfg(unix)]
    path: PathBuf,
    #[cfg(windows)]
    pipe: String,
}

impl Endpoint {
    /// Validates `ipc.endpoint_path` for this platform.
    ///
    /// Unix: refuses abstract names and over-long paths; a relative path is
    /// made absolute against the current directory. Windows: accepts
    /// `NAME` or `\\.\pipe\NAME`, refuses remote and non-pipe paths.
    pub fn parse(endpoint_path: &str) -> Result<Endpoint, IpcError> {
        #[cfg(unix)]
        {
            unix::parse(endpoint_path).map(|path| Endpoint { path })
        }
        #[cfg(windows)]
        {
            pipe_name::normalize(endpoint_path).map(|pipe| Endpoint { pipe })
        }
    }

    /// The socket path.
    #[cfg(unix)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The full pipe name, `\\.\pipe\...`.
    #[cfg(windows)]
    pub fn pipe_name(&self) -> &str {
        &self.pipe
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        #[cfg(unix)]
        {
            write!(f, "{}", self.path.display())
        }
        #[cfg(windows)]
        {
            f.write_str(&self.pipe)
        }
    }
}
