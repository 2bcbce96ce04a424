//! The server never opens a TCP or UDP socket: every socket it holds is a
//! Unix domain socket (read from /proc, so Linux only).
#![cfg(target_os = "linux")]

mod support;

use std::collections::HashSet;

use daemoneye_ipc::IpcClient;
use support::*;

/// Socket inodes listed in /proc/net/<table> (as seen from `pid`'s namespace).
fn inodes(pid: u32, table: &str) -> HashSet<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
    let inode_column = match table {
        "unix" => 6,
        _ => 9,
    };
    text.lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(inode_column)?.parse().ok())
        .collect()
}

/// Inodes of the sockets among `pid`'s open file descriptors.
fn socket_fds(pid: u32) -> HashSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| {
            let target = std::fs::read_link(entry.ok()?.path()).ok()?;
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn the_server_holds_only_unix_sockets() {
    for transport in transports() {
        let endpoint = Endpoint::fresh();
        let server = ServerProcess::start(&endpoint.name, transport, &[]);
        let client = IpcClient::new(server.client_config(transport)).unwrap();
        block_on(async {
            assert!(
                client
                    .send(quick_task("while-connected"))
                    .await
                    .unwrap()
                    .success
            );
            let sockets = socket_fds(server.pid());
            assert!(
                sockets.len() >= 2,
                "{transport}: the listener and our connection, got {sockets:?}"
            );
            let network: HashSet<u64> = [
                "tcp", "tcp6", "udp", "udp6", "raw", "raw6", "udplite", "udplite6",
            ]
            .into_iter()
            .flat_map(|table| inodes(server.pid(), table))
            .collect();
            let unix = inodes(server.pid(), "unix");
            for socket in &sockets {
                assert!(
                    !network.contains(socket),
                    "{transport}: socket {socket} is a network socket"
                );
                assert!(
                    unix.contains(socket),
                    "{transport}: socket {socket} is not a Unix socket"
                );
            }
        });
    }
}
