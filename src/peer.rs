//! Who is on the other end of a connection, and whether it may be.
//!
//! **Reading it** happens here, once per OS, for every backend:
//!
//! * Linux: `SO_PEERCRED` for the uid, gid and pid, and `SO_PEERGROUPS`
//!   (Linux 4.13 and later) for the supplementary groups, all as of the
//!   peer's `connect`, read from the socket: nothing about the peer is looked
//!   up by pid afterwards. A peer in another PID namespace (an agent in a
//!   container, a collector in one) has no pid here: Linux reports 0, which
//!   is kept as "unknown", never taken for an error.
//! * macOS, FreeBSD, DragonFly: `LOCAL_PEERCRED` (uid, and the groups with
//!   the effective gid first); macOS also `LOCAL_PEERPID`.
//! * Other Unix (NetBSD, OpenBSD): `getpeereid`, the uid and effective gid
//!   only, so `socket_group` admits a peer there by its effective gid alone.
//! * Windows: the client's pid of a pipe (`GetNamedPipeClientProcessId`);
//!   no uid: the pipe's security descriptor admits clients.
//!
//! **Judging it** ([`PeerPolicy`]) is the same rule for a server admitting
//! clients and a client trusting its server. Unix: the peer's effective uid
//! must be ours, root's, or one explicitly allowed, or (servers with a
//! `socket_group`) the peer a member of that group; a peer whose credentials
//! cannot be read is refused, and so is one whose uid our user namespace
//! cannot see (Linux shows it as the overflow uid, 65534 by default) unless
//! that uid is explicitly allowed. The pid is never part of the decision:
//! it is for the logs. Windows: the pipe's security descriptor admits
//! clients (so [`PeerPolicy::check`] passes), and a client trusts a pipe only
//! if its owner is our user, SYSTEM or Administrators ([`check_pipe_owner`]);
//! it also opens pipes at the identification impersonation level, so a
//! server cannot act as it.

use std::io;
use std::sync::OnceLock;

use crate::transport::PeerCredentials;

/// Who is on the other end of a connection, as the OS reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Peer {
    pub(crate) credentials: PeerCredentials,
    /// Unix: the peer's groups as of its connect, where the OS reports them
    /// (see the [module docs](self)); `None` where it does not.
    pub(crate) groups: Option<Vec<u32>>,
}

/// The peer of a connected Unix socket. See the [module docs](self).
#[cfg(unix)]
pub(crate) fn of_socket(socket: std::os::fd::BorrowedFd<'_>) -> io::Result<Peer> {
    os::of_socket(socket)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod os {
    use std::io;
    use std::os::fd::BorrowedFd;

    use nix::sys::socket::{getsockopt, sockopt};

    use super::Peer;
    use crate::transport::PeerCredentials;

    pub(super) fn of_socket(socket: BorrowedFd<'_>) -> io::Result<Peer> {
        let ucred = getsockopt(&socket, sockopt::PeerCredentials).map_err(io::Error::from)?;
        // 0: no pid this process can name (the peer is in another PID
        // namespace). Unknown, not an error.
        let pid = u32::try_from(ucred.pid()).ok().filter(|&pid| pid != 0);
        let groups = match crate::linux::peer_groups(socket) {
            Ok(groups) => Some(groups),
            // Before Linux 4.13: the effective gid is all there is.
            Err(error) if error.raw_os_error() == Some(nix::libc::ENOPROTOOPT) => None,
            Err(error) => return Err(error),
        };
        Ok(Peer {
            credentials: PeerCredentials {
                uid: Some(ucred.uid()),
                gid: Some(ucred.gid()),
                pid,
            },
            groups,
        })
    }
}

#[cfg(any(
    target_os = "macos",
    target_os = "ios",
    target_os = "tvos",
    target_os = "watchos",
    target_os = "visionos",
    target_os = "freebsd",
    target_os = "dragonfly"
))]
mod os {
    use std::io;
    use std::os::fd::BorrowedFd;

    use nix::sys::socket::{getsockopt, sockopt};

    use super::Peer;
    use crate::transport::PeerCredentials;

    pub(super) fn of_socket(socket: BorrowedFd<'_>) -> io::Result<Peer> {
        let xucred = getsockopt(&socket, sockopt::LocalPeerCred).map_err(io::Error::from)?;
        let groups = xucred.groups().to_vec();
        Ok(Peer {
            credentials: PeerCredentials {
                uid: Some(xucred.uid()),
                // The first of the groups is the effective gid.
                gid: groups.first().copied(),
                pid: pid(socket),
            },
            groups: Some(groups),
        })
    }

    #[cfg(not(any(target_os = "freebsd", target_os = "dragonfly")))]
    fn pid(socket: BorrowedFd<'_>) -> Option<u32> {
        let pid = getsockopt(&socket, sockopt::LocalPeerPid).ok()?;
        u32::try_from(pid).ok().filter(|&pid| pid != 0)
    }

    #[cfg(any(target_os = "freebsd", target_os = "dragonfly"))]
    fn pid(_socket: BorrowedFd<'_>) -> Option<u32> {
        None
    }
}

#[cfg(all(
    unix,
    not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "macos",
        target_os = "ios",
        target_os = "tvos",
        target_os = "watchos",
        target_os = "visionos",
        target_os = "freebsd",
        target_os = "dragonfly"
    ))
))]
mod os {
    use std::io;
    use std::os::fd::BorrowedFd;

    use super::Peer;
    use crate::transport::PeerCredentials;

    pub(super) fn of_socket(socket: BorrowedFd<'_>) -> io::Result<Peer> {
        let (uid, gid) = nix::unistd::getpeereid(socket).map_err(io::Error::from)?;
        Ok(Peer {
            credentials: PeerCredentials {
                uid: Some(uid.as_raw()),
                gid: Some(gid.as_raw()),
                pid: None,
            },
            groups: None,
        })
    }
}

/// The client of a Windows pipe: its pid. See the [module docs](self).
#[cfg(windows)]
pub(crate) fn of_pipe(pipe: std::os::windows::io::BorrowedHandle<'_>) -> io::Result<Peer> {
    Ok(Peer {
        credentials: PeerCredentials {
            pid: Some(crate::win32::client_process_id(pipe)?),
            ..PeerCredentials::default()
        },
        groups: None,
    })
}

/// The uids a peer may run as, and the group whose members are admitted.
#[derive(Debug, Clone)]
pub(crate) struct PeerPolicy {
    /// Our effective uid and root.
    #[cfg_attr(windows, allow(dead_code))]
    own: [u32; 2],
    /// Allowed explicitly (`--allow-uid`).
    #[cfg_attr(windows, allow(dead_code))]
    extra: Vec<u32>,
    #[cfg_attr(windows, allow(dead_code))]
    group: Option<u32>,
    /// Linux: the uid a peer our user namespace cannot see shows as.
    #[cfg_attr(windows, allow(dead_code))]
    overflow_uid: Option<u32>,
}

impl PeerPolicy {
    /// Our effective uid and root, plus `extra_uids`.
    pub(crate) fn new(extra_uids: impl IntoIterator<Item = u32>) -> PeerPolicy {
        #[cfg(unix)]
        let own = [crate::endpoint::unix::effective_uid(), 0];
        #[cfg(windows)]
        let own = [0; 2];
        let mut extra: Vec<u32> = extra_uids.into_iter().collect();
        extra.sort_unstable();
        extra.dedup();
        PeerPolicy {
            own,
            extra,
            group: None,
            overflow_uid: overflow_uid(),
        }
    }

    /// Also admits members of the group `gid` (the socket group): a peer
    /// whose effective gid is `gid`, or whose groups (where the OS reports
    /// them, see the [module docs](self)) include it.
    pub(crate) fn admitting_group(mut self, gid: Option<u32>) -> PeerPolicy {
        self.group = gid;
        self
    }

    /// `Ok` if the peer may talk to us, else why not, phrased to follow
    /// "the peer" or "the server" ("runs as uid 1001, which is not allowed").
    pub(crate) fn check(&self, peer: io::Result<Peer>) -> Result<(), String> {
        #[cfg(unix)]
        {
            let peer =
                peer.map_err(|error| format!("has credentials that cannot be read ({error})"))?;
            let Some(uid) = peer.credentials.uid else {
                return Err("has a uid the OS did not report".to_owned());
            };
            let unmapped = Some(uid) == self.overflow_uid;
            if self.extra.contains(&uid) {
                return Ok(());
            }
            if unmapped && self.own.contains(&uid) {
                // We run unmapped ourselves: every peer our namespace cannot
                // see shows as our own uid. That says nothing of who it is.
                return Err(format!(
                    "runs as a uid this process's user namespace cannot see (the kernel shows \
                     it as the overflow uid {uid}, as it shows this process), so who it is \
                     cannot be told; run both ends in user namespaces that map each other's \
                     uids, or allow {uid} with --allow-uid if anyone unmapped may connect"
                ));
            }
            if self.own.contains(&uid) || self.is_group_member(&peer) {
                return Ok(());
            }
            let mut allowed: Vec<u32> = self.own.iter().chain(&self.extra).copied().collect();
            allowed.sort_unstable();
            allowed.dedup();
            let mut reason = match self.group {
                None => format!(
                    "runs as uid {uid}, which is not allowed (allowed: {allowed:?}; see --allow-uid)"
                ),
                Some(group) => format!(
                    "runs as uid {uid}, which is not allowed (allowed: {allowed:?}, and members \
                     of group {group}; see --allow-uid and --socket-group)"
                ),
            };
            if unmapped {
                reason.push_str(&format!(
                    "; {uid} is also the overflow uid, which every peer in a user namespace that \
                     maps none of this process's uids shows as"
                ));
            }
            Err(reason)
        }
        #[cfg(windows)]
        {
            let _ = peer;
            Ok(())
        }
    }

    #[cfg(unix)]
    fn is_group_member(&self, peer: &Peer) -> bool {
        let Some(group) = self.group else {
            return false;
        };
        peer.credentials.gid == Some(group)
            || peer
                .groups
                .as_ref()
                .is_some_and(|groups| groups.contains(&group))
    }
}

/// Linux: the uid the kernel shows for one this user namespace does not map
/// (`/proc/sys/kernel/overflowuid`, 65534 unless changed).
///
/// Read once per process: every client and server makes a policy, and a
/// client made per task (as the CLI's `send`) would otherwise spend five
/// system calls of each connection on this file.
fn overflow_uid() -> Option<u32> {
    if !cfg!(any(target_os = "linux", target_os = "android")) {
        return None;
    }
    static OVERFLOW_UID: OnceLock<u32> = OnceLock::new();
    Some(*OVERFLOW_UID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/overflowuid")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(65534)
    }))
}

/// Windows, client side: `Ok` if the pipe reached is owned by our user,
/// SYSTEM or Administrators, else why not, phrased to follow "the server".
/// Another user who creates the pipe name first owns it, and is refused.
#[cfg(windows)]
pub(crate) fn check_pipe_owner(
    owner: io::Result<crate::transport::PipeOwner>,
) -> Result<(), String> {
    match owner {
        Ok(owner) if owner.trusted => Ok(()),
        Ok(owner) => Err(format!(
            "created the pipe as {}, which is neither this user, SYSTEM nor Administrators",
            owner.sid
        )),
        Err(error) => Err(format!("owns a pipe whose owner cannot be read ({error})")),
    }
}
