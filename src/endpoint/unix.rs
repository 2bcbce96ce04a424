//! Unix socket paths: validation, a private directory, stale-socket recovery,
//! owner-only sockets, and removal on shutdown. Shared by every backend.

use std::fs::{self, DirBuilder, FileType, Metadata};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::IpcError;

/// Longest usable `sun_path` (the kernel needs one byte for the NUL).
const MAX_SOCKET_PATH: usize = if cfg!(any(target_os = "linux", target_os = "android")) {
    107
} else {
    103
};

/// The mode every socket file gets before it is visible: owner read/write.
pub(crate) const SOCKET_MODE: u32 = 0o600;

/// The mode a missing parent directory is created with.
const DIR_MODE: u32 = 0o700;

/// Validates an endpoint path and makes it absolute.
pub(crate) fn parse(endpoint_path: &str) -> Result<PathBuf, IpcError> {
    if endpoint_path.starts_with('@') || endpoint_path.starts_with('\0') {
        return Err(IpcError::AbstractSocketRefused {
            name: endpoint_path.to_owned(),
        });
    }
    let path = std::path::absolute(endpoint_path).map_err(|source| IpcError::EndpointIo {
        endpoint: endpoint_path.to_owned(),
        action: "resolving the path against the current directory".to_owned(),
        source,
    })?;
    let length = path.as_os_str().len();
    if length > MAX_SOCKET_PATH {
        return Err(IpcError::EndpointPathTooLong {
            path,
            length,
            limit: MAX_SOCKET_PATH,
        });
    }
    if path.file_name().is_none() {
        return Err(IpcError::NotASocket {
            path,
            kind: "directory",
        });
    }
    Ok(path)
}

/// The effective uid of this process.
pub(crate) fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Gets `path` ready to be bound: a private parent directory, and nothing at
/// the path itself (a stale socket is removed once probed dead).
///
/// Refuses a parent directory that others can write to or that another user
/// owns, a symlink or non-socket file at the path, and a socket a live server
/// answers on.
pub(crate) async fn prepare(path: &Path, probe_timeout: Duration) -> Result<(), IpcError> {
    let endpoint = path.display().to_string();
    let io_error = |action: String| {
        let endpoint = endpoint.clone();
        move |source| IpcError::EndpointIo {
            endpoint,
            action,
            source,
        }
    };

    let dir = path
        .parent()
        .expect("parse() leaves a file name under a parent");
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(io_error(format!("creating directory {}", dir.display())))?;
    let dir_meta =
        fs::metadata(dir).map_err(io_error(format!("inspecting directory {}", dir.display())))?;
    check_private_dir(dir, &dir_meta)?;

    let existing = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(io_error(format!("inspecting {}", path.display()))(err)),
    };
    let file_type = existing.file_type();
    if file_type.is_symlink() {
        return Err(IpcError::SymlinkAtEndpoint {
            path: path.to_owned(),
        });
    }
    if !file_type.is_socket() {
        return Err(IpcError::NotASocket {
            path: path.to_owned(),
            kind: describe(file_type),
        });
    }

    match tokio::time::timeout(probe_timeout, tokio::net::UnixStream::connect(path)).await {
        // A server accepted (or at least queued) us: it is alive.
        Ok(Ok(_)) | Err(_) => Err(IpcError::EndpointInUse { endpoint }),
        // Nobody listens: the socket outlived a crashed server.
        Ok(Err(err)) if err.kind() == io::ErrorKind::ConnectionRefused => {
            remove_if_same_socket(path, &existing).map_err(io_error(format!(
                "removing stale socket {}",
                path.display()
            )))?;
            tracing::info!(endpoint = %path.display(), "removed a stale socket left by a server that is gone");
            Ok(())
        }
        // Removed between our look and the probe: nothing to clean up.
        Ok(Err(err)) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Ok(Err(err)) => Err(io_error(format!(
            "probing the existing socket {}",
            path.display()
        ))(err)),
    }
}

fn check_private_dir(dir: &Path, meta: &Metadata) -> Result<(), IpcError> {
    let expected_owner = effective_uid();
    let owner_ok = meta.uid() == expected_owner || meta.uid() == 0;
    let mode = meta.mode() & 0o7777;
    if !owner_ok || mode & 0o022 != 0 {
        return Err(IpcError::UnsafeEndpointDirectory {
            dir: dir.to_owned(),
            mode,
            owner: meta.uid(),
            expected_owner,
        });
    }
    Ok(())
}

fn describe(file_type: FileType) -> &'static str {
    if file_type.is_dir() {
        "directory"
    } else if file_type.is_file() {
        "regular file"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_char_device() || file_type.is_block_device() {
        "device"
    } else {
        "special file"
    }
}

/// Unlinks `path` only if it is still the socket described by `expected`, so a
/// socket another server bound in the meantime is left alone.
fn remove_if_same_socket(path: &Path, expected: &Metadata) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(now)
            if now.file_type().is_socket()
                && now.dev() == expected.dev()
                && now.ino() == expected.ino() =>
        {
            fs::remove_file(path)
        }
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}

/// Checks a freshly bound socket is ours and owner-only, and returns the
/// guard that removes it when the server goes away.
pub(crate) fn verify_bound(path: &Path) -> Result<SocketFile, IpcError> {
    let meta = fs::symlink_metadata(path).map_err(|source| IpcError::EndpointIo {
        endpoint: path.display().to_string(),
        action: "inspecting the socket just bound".to_owned(),
        source,
    })?;
    let expected_owner = effective_uid();
    let mode = meta.mode() & 0o7777;
    if !meta.file_type().is_socket() || meta.uid() != expected_owner || mode & 0o177 != 0 {
        let _ = remove_if_same_socket(path, &meta);
        return Err(IpcError::InsecureSocket {
            path: path.to_owned(),
            mode,
            owner: meta.uid(),
            expected_owner,
        });
    }
    Ok(SocketFile {
        path: path.to_owned(),
        meta,
    })
}

/// The socket file of a running server. Dropping it removes the file, unless
/// something else has taken the path since.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    meta: Metadata,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match remove_if_same_socket(&self.path, &self.meta) {
            Ok(()) => tracing::debug!(endpoint = %self.path.display(), "removed socket file"),
            Err(err) => {
                tracing::warn!(endpoint = %self.path.display(), error = %err, "could not remove socket file")
            }
        }
    }
}

/// Runs `bind` with the process umask set so that a socket file is created
/// 0600, for platforms where `fchmod` before `bind` is not supported (macOS).
/// The umask is process-wide: a file another thread creates meanwhile comes
/// out more restrictive than asked, never less.
pub(crate) fn with_owner_only_umask<T>(bind: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    use rustix::fs::Mode;
    let previous = rustix::process::umask(Mode::from_raw_mode(0o177));
    let outcome = bind();
    rustix::process::umask(previous);
    outcome
}
