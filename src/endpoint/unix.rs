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
/// (A socket's execute bit means nothing; only group/other bits matter.)
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
    check_directories(dir)?;

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
        // A server is there but its queue is full: alive too.
        Ok(Err(err)) if err.kind() == io::ErrorKind::WouldBlock => {
            Err(IpcError::EndpointInUse { endpoint })
        }
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

/// The socket's directory must be a real directory (not a symlink) that
/// only we (or root) own and can write; every parent must be owned by us or
/// root and writable by no one else unless sticky (like `/tmp`). Otherwise
/// another user could swap the directory, or the socket in it, for their own.
///
/// Parents may be reached through symlinks (`/var/run` -> `/run`). Such a
/// link must be ours or root's too: in a sticky directory its owner could
/// replace it with one pointing elsewhere (Linux refuses to follow such
/// links by default, macOS and the BSDs do not). What the links lead to is
/// checked on the resolved path.
fn check_directories(dir: &Path) -> Result<(), IpcError> {
    let expected_owner = effective_uid();
    let unsafe_dir = |dir: &Path, reason: String| IpcError::UnsafeEndpointDirectory {
        dir: dir.to_owned(),
        reason,
        expected_owner,
    };
    let inspect = |dir: &Path, meta: io::Result<Metadata>| {
        meta.map_err(|source| IpcError::EndpointIo {
            endpoint: dir.display().to_string(),
            action: format!("inspecting directory {}", dir.display()),
            source,
        })
    };

    let trusted_owner = |uid: u32| uid == expected_owner || uid == 0;

    let own = inspect(dir, fs::symlink_metadata(dir))?;
    if own.file_type().is_symlink() {
        return Err(unsafe_dir(dir, "it is a symbolic link".to_owned()));
    }
    for parent in dir.ancestors().skip(1) {
        let link = inspect(parent, fs::symlink_metadata(parent))?;
        if link.file_type().is_symlink() && !trusted_owner(link.uid()) {
            return Err(unsafe_dir(
                parent,
                format!(
                    "it is a symbolic link owned by uid {}, who could point it elsewhere",
                    link.uid()
                ),
            ));
        }
    }

    let resolved = fs::canonicalize(dir).map_err(|source| IpcError::EndpointIo {
        endpoint: dir.display().to_string(),
        action: format!("resolving directory {}", dir.display()),
        source,
    })?;
    for (index, ancestor) in resolved.ancestors().enumerate() {
        let meta = inspect(ancestor, fs::metadata(ancestor))?;
        let mode = meta.mode() & 0o7777;
        if !trusted_owner(meta.uid()) {
            return Err(unsafe_dir(
                ancestor,
                format!("it is owned by uid {} (mode {mode:04o})", meta.uid()),
            ));
        }
        let writable_by_others = mode & 0o022 != 0;
        let sticky = mode & 0o1000 != 0;
        if writable_by_others && (index == 0 || !sticky) {
            return Err(unsafe_dir(
                ancestor,
                format!("mode {mode:04o} lets group or others write to it"),
            ));
        }
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
    if !meta.file_type().is_socket() || meta.uid() != expected_owner || mode & 0o077 != 0 {
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

/// Runs `bind` with the process umask at 077, so that the socket file is
/// created owner-only, for platforms where `fchmod` before `bind` is not
/// supported (macOS).
///
/// The umask is process-wide: files and directories another thread creates
/// meanwhile come out owner-only too (usable by their owner, never more open
/// than asked). Concurrent binds are serialised so that each restores the
/// umask it found.
pub(crate) fn with_owner_only_umask<T>(bind: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    use rustix::fs::Mode;
    static UMASK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serialised = UMASK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let previous = rustix::process::umask(Mode::from_raw_mode(0o077));
    let outcome = bind();
    rustix::process::umask(previous);
    outcome
}
