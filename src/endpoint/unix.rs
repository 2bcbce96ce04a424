//! Unix socket paths: validation, a private directory, one server per
//! endpoint by a lock, stale-socket recovery, owner-only sockets, and
//! removal on shutdown. Every backend binds through [`bind`] and wraps the
//! listening socket it returns.

use std::fs::{self, DirBuilder, FileType, Metadata};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use rustix::fs::Mode;
use rustix::net::SocketAddrUnix;

use super::SocketGroup;
use crate::error::IpcError;

/// Longest usable `sun_path` (the kernel needs one byte for the NUL).
const MAX_SOCKET_PATH: usize = if cfg!(any(target_os = "linux", target_os = "android")) {
    107
} else {
    103
};

/// The mode every socket file gets before it is visible: owner read/write,
/// and with a socket group, group read/write too. (A socket's execute bit
/// means nothing; only group/other bits matter.)
const SOCKET_MODE: u32 = 0o600;
const GROUP_SOCKET_MODE: u32 = 0o660;

/// The mode a missing directory is created with.
const DIR_MODE: u32 = 0o700;

/// The socket's directory with a socket group: the group may enter it (not
/// write to it), and the set-group-id bit makes the socket created in it
/// belong to the group from the start.
const GROUP_DIR_MODE: u32 = 0o2750;

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

/// A bound endpoint: the socket file (removed when this is dropped, unless
/// something else has taken the path since) and the lock that makes this
/// server the endpoint's only one (released after the file is removed).
#[derive(Debug)]
pub(crate) struct BoundEndpoint {
    watch: SocketWatch,
    _lock: EndpointLock,
}

impl BoundEndpoint {
    /// What the accept loop uses to notice the socket file going, and to
    /// bind it again.
    pub(crate) fn watch(&self) -> SocketWatch {
        self.watch.clone()
    }
}

impl Drop for BoundEndpoint {
    fn drop(&mut self) {
        // The file goes first (it is what clients reach), then the lock.
        drop(self.watch.lock().take());
    }
}

/// The socket file of a running server, watched: if it is removed (or
/// replaced by something else) while the server runs, new clients could no
/// longer reach it; the accept loop sees that at its next check and binds a
/// new socket at the path, with the same protections. Shared by the server
/// (which removes the file when it stops) and its accept loop, so that a
/// socket is never bound again once the server has let go of the endpoint.
#[derive(Debug, Clone)]
pub(crate) struct SocketWatch {
    path: PathBuf,
    mode: u32,
    group: Option<SocketGroup>,
    file: std::sync::Arc<std::sync::Mutex<Option<SocketFile>>>,
}

impl SocketWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<SocketFile>> {
        self.file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// If the socket file is gone or is no longer ours, binds a new one and
    /// returns its listening socket; `None` if all is well, or if the
    /// server has let go of the endpoint.
    pub(crate) fn rebind_if_lost(&self) -> Result<Option<UnixListener>, IpcError> {
        let mut file = self.lock();
        let Some(current) = file.as_ref() else {
            return Ok(None);
        };
        if current.is_in_place() {
            return Ok(None);
        }
        tracing::error!(
            endpoint = %self.path.display(),
            "the socket file was removed or replaced while serving; binding it again"
        );
        // Ours no longer: forget it without removing whatever is there now.
        if let Some(lost) = file.take() {
            lost.forget();
        }
        clear_the_path(&self.path)?;
        let (listener, socket_file) = bind_socket(&self.path, self.mode, self.group.as_ref())?;
        *file = Some(socket_file);
        tracing::info!(endpoint = %self.path.display(), "socket file re-created");
        Ok(Some(listener))
    }
}

/// Secures `path` and binds a listening socket on it: the one way every
/// backend gets its Unix listener, which it then wraps.
///
/// In order: the parent directory is created 0700 (or refused if another
/// user could tamper with it); the endpoint's lock is taken, so that no
/// other server touches the path from here on; what is at the path is
/// refused if it is not a socket, or removed if it is a stale one; the
/// socket is bound, given exactly 0600, checked, and only then listens.
///
/// With a socket `group`, the directory is 0750 (and set-group-id) and the
/// socket 0660, both owned by that group, and never more open than that on
/// the way: the directory is created 0700 and handed to the group before it
/// opens, and the socket is born in it 0660 with the directory's group.
pub(crate) fn bind(
    path: &Path,
    group: Option<&SocketGroup>,
) -> Result<(UnixListener, BoundEndpoint), IpcError> {
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
    let created = !dir.exists();
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(io_error(format!("creating directory {}", dir.display())))?;
    if created {
        // Born 0700 less the umask: exactly 0700 (a umask may have taken
        // our own bits), without touching the process-wide umask.
        rustix::fs::chmod(dir, Mode::from_raw_mode(DIR_MODE as _)).map_err(|errno| {
            io_error(format!("setting {} to mode 0700", dir.display()))(errno.into())
        })?;
    }
    if let Some(group) = group {
        open_to_group(dir, group)?;
    }
    check_directories(dir)?;
    let lock = EndpointLock::acquire(path)?;
    clear_the_path(path)?;
    let mode = group.map_or(SOCKET_MODE, |_| GROUP_SOCKET_MODE);
    let (listener, socket_file) = bind_socket(path, mode, group)?;
    let watch = SocketWatch {
        path: path.to_owned(),
        mode,
        group: group.cloned(),
        file: std::sync::Arc::new(std::sync::Mutex::new(Some(socket_file))),
    };
    Ok((listener, BoundEndpoint { watch, _lock: lock }))
}

/// Hands the socket's directory to `group`: 0750 and set-group-id, owned
/// by the group. A directory of ours is changed (it is never more open than
/// that on the way: group first, then mode); one of another owner (root's,
/// for a server that is not root) must be so already.
fn open_to_group(dir: &Path, group: &SocketGroup) -> Result<(), IpcError> {
    use rustix::fs::{AtFlags, CWD, Gid};
    let failed = |action: String| {
        move |source: rustix::io::Errno| IpcError::EndpointIo {
            endpoint: dir.display().to_string(),
            action,
            source: source.into(),
        }
    };
    let meta = fs::symlink_metadata(dir).map_err(|source| IpcError::EndpointIo {
        endpoint: dir.display().to_string(),
        action: format!("inspecting directory {}", dir.display()),
        source,
    })?;
    if meta.gid() == group.gid && meta.mode() & 0o7777 == GROUP_DIR_MODE {
        return Ok(());
    }
    if meta.uid() != effective_uid() {
        return Err(IpcError::UnsafeEndpointDirectory {
            dir: dir.to_owned(),
            reason: format!(
                "socket_group {} needs it owned by group {} with mode {GROUP_DIR_MODE:04o}, and it \
                 belongs to uid {}, so this server cannot make it so",
                group.name,
                group.gid,
                meta.uid()
            ),
            expected_owner: effective_uid(),
        });
    }
    let gid = Gid::from_raw(group.gid);
    rustix::fs::chownat(CWD, dir, None, Some(gid), AtFlags::SYMLINK_NOFOLLOW).map_err(failed(
        format!("giving directory {} to group {}", dir.display(), group.name),
    ))?;
    rustix::fs::chmod(dir, Mode::from_raw_mode(GROUP_DIR_MODE as _)).map_err(failed(format!(
        "setting directory {} to mode {GROUP_DIR_MODE:04o}",
        dir.display()
    )))
}

/// An exclusive `flock` on `<socket path>.lock`, held for the server's
/// whole life: one server per endpoint, decided by the kernel rather than
/// by a probe that two servers starting at once could both pass. The file
/// itself stays (removing it would let a third server lock a new file while
/// the second still holds the old one).
#[derive(Debug)]
struct EndpointLock {
    _file: fs::File,
}

impl EndpointLock {
    fn acquire(socket: &Path) -> Result<EndpointLock, IpcError> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut name = socket.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // Never through a link someone planted: the directory is
            // private, but the check costs nothing.
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path)
            .map_err(|source| IpcError::EndpointIo {
                endpoint: socket.display().to_string(),
                action: format!("opening the lock file {}", path.display()),
                source,
            })?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(EndpointLock { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(IpcError::EndpointInUse {
                endpoint: socket.display().to_string(),
            }),
            Err(error) => Err(IpcError::EndpointIo {
                endpoint: socket.display().to_string(),
                action: format!("locking {}", path.display()),
                source: error.into(),
            }),
        }
    }
}

/// With the lock held, nothing but a stale socket may be at the path: a
/// symlink or any other kind of file is refused and left alone; a socket
/// is removed, unless a server answers on it (one that predates the lock,
/// or does not take it).
fn clear_the_path(path: &Path) -> Result<(), IpcError> {
    let io_error = |action: String| {
        let endpoint = path.display().to_string();
        move |source| IpcError::EndpointIo {
            endpoint,
            action,
            source,
        }
    };
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
    match probe(path) {
        // A server accepted (or queued) us, or its queue is full: alive.
        Ok(()) => Err(IpcError::EndpointInUse {
            endpoint: path.display().to_string(),
        }),
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => Err(IpcError::EndpointInUse {
            endpoint: path.display().to_string(),
        }),
        // Nobody listens: the socket outlived a crashed server.
        Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
            remove_if_same_socket(path, &existing).map_err(io_error(format!(
                "removing stale socket {}",
                path.display()
            )))?;
            tracing::info!(endpoint = %path.display(), "removed a stale socket left by a server that is gone");
            Ok(())
        }
        // Removed between our look and the probe: nothing to clean up.
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(io_error(format!(
            "probing the existing socket {}",
            path.display()
        ))(err)),
    }
}

/// Connects to `path` without waiting: `Ok` if a server accepted or queued
/// us, `WouldBlock` if its queue is full, `ConnectionRefused` if nobody
/// listens.
fn probe(path: &Path) -> io::Result<()> {
    let socket = new_socket(true)?;
    rustix::net::connect(&socket, &SocketAddrUnix::new(path)?)?;
    Ok(())
}

/// Accept queue length; the kernel caps it at `net.core.somaxconn`.
const BACKLOG: i32 = 1024;

/// Socket, bind, mode, check, listen: the socket file has exactly `mode`
/// (and `group`) before anyone can connect to it, and no process-wide state
/// changes on the way (a umask would be every thread's).
///
/// The file is born with the socket's mode less the umask: where the OS can
/// set a mode on an unbound socket (Linux), that is set to `mode` first, so
/// the file is never more open than `mode`. It is then given `mode` exactly,
/// checked, and only then does the socket listen: a client that finds the
/// file earlier is refused the connection, as if no server were there yet.
fn bind_socket(
    path: &Path,
    mode: u32,
    group: Option<&SocketGroup>,
) -> Result<(UnixListener, SocketFile), IpcError> {
    let failed = |action: &str| {
        let action = format!("{action} the socket {}", path.display());
        move |source: io::Error| IpcError::EndpointIo {
            endpoint: path.display().to_string(),
            action,
            source,
        }
    };
    let socket = new_socket(false).map_err(failed("creating"))?;
    let address = SocketAddrUnix::new(path).map_err(|errno| failed("addressing")(errno.into()))?;
    match rustix::fs::fchmod(&socket, Mode::from_raw_mode(mode as _)) {
        // No mode on unbound sockets here (macOS): the chmod below does it.
        Ok(()) | Err(rustix::io::Errno::INVAL) => {}
        Err(errno) => return Err(failed("setting the mode of")(errno.into())),
    }
    rustix::net::bind(&socket, &address).map_err(|errno| failed("binding")(errno.into()))?;
    // The directory is ours and no one else may write in it: the path is
    // the socket just bound.
    if let Err(errno) = rustix::fs::chmod(path, Mode::from_raw_mode(mode as _)) {
        let _ = fs::remove_file(path);
        return Err(failed(&format!("setting mode {mode:04o} on"))(errno.into()));
    }
    let socket_file = verify_bound(path, mode, group)?;
    rustix::net::listen(&socket, BACKLOG).map_err(|errno| failed("listening on")(errno.into()))?;
    Ok((UnixListener::from(socket), socket_file))
}

/// A close-on-exec Unix stream socket, non-blocking if asked, atomically
/// where the OS can.
pub(crate) fn new_socket(nonblocking: bool) -> io::Result<rustix::fd::OwnedFd> {
    use rustix::net::{AddressFamily, SocketType};
    #[cfg(not(target_vendor = "apple"))]
    {
        use rustix::net::SocketFlags;
        let mut flags = SocketFlags::CLOEXEC;
        if nonblocking {
            flags |= SocketFlags::NONBLOCK;
        }
        Ok(rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            flags,
            None,
        )?)
    }
    #[cfg(target_vendor = "apple")]
    {
        let socket = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None)?;
        rustix::io::fcntl_setfd(&socket, rustix::io::FdFlags::CLOEXEC)?;
        if nonblocking {
            rustix::io::ioctl_fionbio(&socket, true)?;
        }
        Ok(socket)
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

/// Checks a freshly bound socket is ours, no more open than
/// `expected_mode`, and (with a socket group) the group's, and returns the
/// guard that removes it when the server goes away.
fn verify_bound(
    path: &Path,
    expected_mode: u32,
    group: Option<&SocketGroup>,
) -> Result<SocketFile, IpcError> {
    let inspect = || {
        fs::symlink_metadata(path).map_err(|source| IpcError::EndpointIo {
            endpoint: path.display().to_string(),
            action: "inspecting the socket just bound".to_owned(),
            source,
        })
    };
    let mut meta = inspect()?;
    if let Some(group) = group.filter(|group| meta.gid() != group.gid) {
        // The directory is the group's, but its set-group-id bit did not
        // pass to the socket here: hand the socket over (it is 0660 with a
        // group the peer check does not admit until then).
        let _ = rustix::fs::chownat(
            rustix::fs::CWD,
            path,
            None,
            Some(rustix::fs::Gid::from_raw(group.gid)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        );
        meta = inspect()?;
    }
    let expected_owner = effective_uid();
    let mode = meta.mode() & 0o7777;
    let wrong_group = group.is_some_and(|group| meta.gid() != group.gid);
    if !meta.file_type().is_socket()
        || meta.uid() != expected_owner
        || mode & !expected_mode & 0o777 != 0
        || wrong_group
    {
        let _ = remove_if_same_socket(path, &meta);
        return Err(IpcError::InsecureSocket {
            path: path.to_owned(),
            mode,
            expected_mode,
            owner: meta.uid(),
            group: meta.gid(),
            expected_owner,
            expected_group: group.map(|group| group.gid),
        });
    }
    Ok(SocketFile {
        path: path.to_owned(),
        meta,
        owned: true,
    })
}

/// The socket file of a running server. Dropping it removes the file, unless
/// something else has taken the path since.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    meta: Metadata,
    /// False once forgotten: then dropping it removes nothing.
    owned: bool,
}

impl SocketFile {
    /// Whether the path still holds this very socket.
    fn is_in_place(&self) -> bool {
        fs::symlink_metadata(&self.path).is_ok_and(|now| {
            now.file_type().is_socket()
                && now.dev() == self.meta.dev()
                && now.ino() == self.meta.ino()
        })
    }

    /// Lets go of the file without removing anything.
    fn forget(mut self) {
        self.owned = false;
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        match remove_if_same_socket(&self.path, &self.meta) {
            Ok(()) => tracing::debug!(endpoint = %self.path.display(), "removed socket file"),
            Err(err) => {
                tracing::warn!(endpoint = %self.path.display(), error = %err, "could not remove socket file")
            }
        }
    }
}
