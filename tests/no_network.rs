//! The server never opens a TCP or UDP socket: every socket it holds is a
//! Unix domain socket (read from /proc, so Linux only).
#![cfg(target_os = "linux")]

mod support;

use std::collections::HashSet;

use daemoneye_ipc::{IpcClient, TransportKind};
use support::*;

/// Socket inodes listed in /proc/net/<table> (as seen from `pid`'s namespace).
fn inodes(pid: u32, table: &str) -> HashSet<u64> {
    // A table that cannot be read proves nothing: fail rather than count it
    // as empty. (Tables of protocols the kernel lacks do not exist at all.)
    let path = format!("/proc/{pid}/net/{table}");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && table != "unix" => {
            return HashSet::new();
        }
        Err(error) => panic!("cannot read {path}: {error}"),
    };
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

/// Every socket the server holds is a Unix domain socket, and none is a
/// network socket: checked when it has just started, with a client
/// connected, and after the client has left.
fn assert_only_unix_sockets(server: &ServerProcess, moment: &str, at_least: usize) {
    let pid = server.pid();
    let sockets = socket_fds(pid);
    assert!(
        sockets.len() >= at_least,
        "{moment}: expected at least {at_least} sockets, got {sockets:?}"
    );
    let network: HashSet<u64> = [
        "tcp", "tcp6", "udp", "udp6", "raw", "raw6", "udplite", "udplite6",
    ]
    .into_iter()
    .flat_map(|table| inodes(pid, table))
    .collect();
    let unix = inodes(pid, "unix");
    for socket in &sockets {
        assert!(
            !network.contains(socket),
            "{moment}: socket {socket} is a network socket"
        );
        assert!(
            unix.contains(socket),
            "{moment}: socket {socket} is not a Unix socket"
        );
    }
}

each_backend!(the_server_holds_only_unix_sockets);
fn the_server_holds_only_unix_sockets(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let mut server = ServerProcess::start(&endpoint.name, transport, &[]);
    assert_only_unix_sockets(&server, "just started", 1);
    let client = IpcClient::new(server.client_config(transport)).unwrap();
    // The client's connection lives as long as the runtime that drives it.
    let runtime = runtime();
    let answer = runtime.block_on(client.send(quick_task("while-connected")));
    assert!(answer.unwrap().success);
    assert_only_unix_sockets(&server, "with a client connected", 2);
    drop(client);
    drop(runtime);
    wait_until("the client's connection to close", PATIENCE, || {
        (server.counters()["active"] == 0).then_some(())
    });
    assert_only_unix_sockets(&server, "after the client left", 1);
}
