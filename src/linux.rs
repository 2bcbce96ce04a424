//! The one Linux call no safe wrapper in our dependencies offers:
//! `getsockopt(SO_PEERGROUPS)`, the supplementary groups of a Unix socket's
//! peer as of its `connect` (Linux 4.13 and later). Everything else about a
//! peer comes through nix (see `src/peer.rs`).

#![allow(unsafe_code)]

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::libc;

/// The supplementary groups of the peer of a connected Unix socket.
/// `ENOPROTOOPT` before Linux 4.13.
pub(crate) fn peer_groups(socket: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    // Most processes have a handful of groups; the kernel says how many
    // there are when they do not fit.
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let capacity = groups.len() * size_of::<libc::gid_t>();
        let mut length = libc::socklen_t::try_from(capacity)
            .map_err(|_| io::Error::other("too many groups for getsockopt"))?;
        // SAFETY: `socket` is an open descriptor for the whole call (it is
        // borrowed); `groups` is initialised memory valid for writes of
        // `length` bytes and aligned for gid_t; the kernel writes at most
        // `length` bytes there and stores the size it needs or wrote in
        // `length`, a valid socklen_t.
        let outcome = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut length,
            )
        };
        let length = length as usize;
        if outcome == 0 {
            groups.truncate(length / size_of::<libc::gid_t>());
            return Ok(groups);
        }
        let error = io::Error::last_os_error();
        // ERANGE: too small, and `length` is the size needed (at most
        // NGROUPS_MAX gids, so this ends).
        if error.raw_os_error() == Some(libc::ERANGE) && length > capacity {
            groups.resize(length.div_ceil(size_of::<libc::gid_t>()), 0);
            continue;
        }
        return Err(error);
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_socket_pair_reports_this_process_groups() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let groups = match super::peer_groups(ours.as_fd()) {
            Ok(groups) => groups,
            // A kernel before 4.13 has no SO_PEERGROUPS.
            Err(error) if error.raw_os_error() == Some(nix::libc::ENOPROTOOPT) => return,
            Err(error) => panic!("{error}"),
        };
        let mut expected: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|gid| gid.as_raw())
            .collect();
        let mut got = groups;
        expected.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, expected);
    }
}
