//! Which peers may be on the other end of a connection: the same rule for a
//! server admitting clients and a client trusting its server.
//!
//! Unix: the peer's effective uid must be ours, root's, or one explicitly
//! allowed; a peer whose credentials cannot be read is refused. Windows: the
//! pipe's security descriptor admits clients (so [`PeerPolicy::check`]
//! passes), and a client trusts a pipe only if its owner is our user,
//! SYSTEM or Administrators ([`check_pipe_owner`]); it also opens pipes at
//! the identification impersonation level, so a server cannot act as it.

use std::io;

use crate::transport::PeerCredentials;

/// The uids a peer may run as, and the group whose members are admitted.
#[derive(Debug, Clone)]
pub(crate) struct PeerPolicy {
    #[cfg_attr(windows, allow(dead_code))]
    allowed_uids: Vec<u32>,
    #[cfg_attr(windows, allow(dead_code))]
    group: Option<u32>,
}

impl PeerPolicy {
    /// Our effective uid and root, plus `extra_uids`.
    pub(crate) fn new(extra_uids: impl IntoIterator<Item = u32>) -> PeerPolicy {
        #[cfg(unix)]
        let mut allowed_uids = vec![crate::endpoint::unix::effective_uid(), 0];
        #[cfg(windows)]
        let mut allowed_uids = Vec::new();
        allowed_uids.extend(extra_uids);
        allowed_uids.sort_unstable();
        allowed_uids.dedup();
        PeerPolicy {
            allowed_uids,
            group: None,
        }
    }

    /// Also admits members of the group `gid` (the socket group): a peer
    /// whose effective gid is `gid` or, on Linux, one whose supplementary
    /// groups include it (read from `/proc/PID/status` for the pid the
    /// kernel reported with its credentials).
    pub(crate) fn admitting_group(mut self, gid: Option<u32>) -> PeerPolicy {
        self.group = gid;
        self
    }

    /// `Ok` if the peer may talk to us, else why not, phrased to follow
    /// "the peer" or "the server" ("runs as uid 1001, which is not allowed").
    pub(crate) fn check(&self, peer: io::Result<PeerCredentials>) -> Result<(), String> {
        #[cfg(unix)]
        {
            let peer =
                peer.map_err(|error| format!("has credentials that cannot be read ({error})"))?;
            match peer.uid {
                Some(uid) if self.allowed_uids.contains(&uid) => Ok(()),
                Some(_) if self.is_group_member(&peer) => Ok(()),
                Some(uid) => Err(match self.group {
                    None => format!(
                        "runs as uid {uid}, which is not allowed (allowed: {:?}; see --allow-uid)",
                        self.allowed_uids
                    ),
                    Some(group) => format!(
                        "runs as uid {uid}, which is not allowed (allowed: {:?}, and members of \
                         group {group}; see --allow-uid and --socket-group)",
                        self.allowed_uids
                    ),
                }),
                None => Err("has a uid the OS did not report".to_owned()),
            }
        }
        #[cfg(windows)]
        {
            let _ = peer;
            Ok(())
        }
    }
}

#[cfg(unix)]
impl PeerPolicy {
    fn is_group_member(&self, peer: &PeerCredentials) -> bool {
        let Some(group) = self.group else {
            return false;
        };
        peer.gid == Some(group)
            || peer
                .pid
                .is_some_and(|pid| supplementary_groups(pid).contains(&group))
    }
}

/// The supplementary groups of process `pid` (Linux: the `Groups:` line of
/// `/proc/PID/status`; elsewhere none are known).
#[cfg(unix)]
fn supplementary_groups(pid: u32) -> Vec<u32> {
    if !cfg!(any(target_os = "linux", target_os = "android")) {
        return Vec::new();
    }
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status
                .lines()
                .find_map(|line| line.strip_prefix("Groups:"))?;
            Some(
                line.split_whitespace()
                    .filter_map(|gid| gid.parse().ok())
                    .collect(),
            )
        })
        .unwrap_or_default()
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
