//! Unix endpoint hardening, with a real server process: a private directory,
//! an owner-only socket, stale sockets recovered, nothing else touched.
#![cfg(unix)]

mod support;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::process::Output;

use daemoneye_ipc::TransportKind;
use support::*;

fn mode(path: &std::path::Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn serve_once(endpoint: &str) -> Output {
    daemoneye_ipc()
        .args(["serve", "--endpoint", endpoint])
        .output()
        .unwrap()
}

/// The uid the tests that need another user run things as.
const NOBODY: u32 = 65534;

/// Tests that act as another user need root to do so.
fn require_root(what: &str) {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test {what} ({NOBODY}) and so must run as root"
    );
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

each_backend!(the_directory_is_created_0700_and_the_socket_is_0600);
fn the_directory_is_created_0700_and_the_socket_is_0600(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let _server = ServerProcess::start(&endpoint.name, transport, &[]);
    let socket = endpoint.path();
    assert_eq!(
        mode(socket.parent().unwrap()),
        0o700,
        "{transport}: directory mode"
    );
    assert!(
        fs::symlink_metadata(socket)
            .unwrap()
            .file_type()
            .is_socket()
    );
    assert_eq!(mode(socket), 0o600, "{transport}: socket mode");
    assert_eq!(
        fs::metadata(socket).unwrap().uid(),
        rustix::process::geteuid().as_raw()
    );
}

#[test]
fn a_world_writable_parent_directory_is_refused() {
    let endpoint = Endpoint::fresh();
    let dir = endpoint.path().parent().unwrap();
    fs::create_dir(dir).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).unwrap();
    let output = serve_once(&endpoint.name);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains(&format!("refusing to use directory {}", dir.display())),
        "{message}"
    );
    assert!(message.contains("mode 0777"), "{message}");
    assert!(!endpoint.path().exists(), "nothing was bound");
}

#[test]
fn a_group_writable_parent_directory_is_refused_but_a_private_one_is_kept() {
    let endpoint = Endpoint::fresh();
    let dir = endpoint.path().parent().unwrap();
    fs::create_dir(dir).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o770)).unwrap();
    let message = stderr(&serve_once(&endpoint.name));
    assert!(message.contains("mode 0770"), "{message}");

    // An existing 0750 directory (not writable by others) is acceptable as is.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o750)).unwrap();
    let _server = ServerProcess::start(&endpoint.name, transports()[0], &[]);
    assert_eq!(
        mode(dir),
        0o750,
        "the server does not change an acceptable directory"
    );
}

#[test]
fn a_parent_directory_others_can_write_to_is_refused_unless_sticky() {
    let endpoint = Endpoint::fresh();
    // <tmp>/dipcXXXX/run/procmond.sock: loosen <tmp>/dipcXXXX, a parent.
    let grandparent = endpoint.dir.path();
    fs::set_permissions(grandparent, fs::Permissions::from_mode(0o777)).unwrap();
    let message = stderr(&serve_once(&endpoint.name));
    assert!(
        message.contains(&format!(
            "refusing to use directory {}",
            grandparent.display()
        )),
        "{message}"
    );
    assert!(
        message.contains("mode 0777 lets group or others write to it"),
        "{message}"
    );

    // Sticky, like /tmp: others cannot rename or remove what we put there.
    fs::set_permissions(grandparent, fs::Permissions::from_mode(0o1777)).unwrap();
    let _server = ServerProcess::start(&endpoint.name, transports()[0], &[]);
}

#[test]
fn a_socket_directory_that_is_a_symlink_is_refused() {
    let endpoint = Endpoint::fresh();
    let real = endpoint.dir.path().join("real");
    fs::create_dir(&real).unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
    symlink(&real, endpoint.path().parent().unwrap()).unwrap();
    let output = serve_once(&endpoint.name);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(message.contains("it is a symbolic link"), "{message}");
    assert!(
        fs::read_dir(&real).unwrap().next().is_none(),
        "nothing was bound through the link"
    );
}

/// A parent reached through a symlink: the link must be ours or root's,
/// since its owner could point it elsewhere. Needs root, to give the link
/// to another user.
#[test]
fn a_parent_symlink_owned_by_another_user_is_refused() {
    require_root("gives a symlink to another uid");
    let endpoint = Endpoint::fresh();
    let real = endpoint.dir.path().join("real");
    fs::create_dir(&real).unwrap();
    let via = endpoint.dir.path().join("via");
    symlink(&real, &via).unwrap();
    let name = via.join("run").join("procmond.sock");
    let name = name.to_str().unwrap();

    // Our own link: followed, and the directory created where it leads.
    let mut server = ServerProcess::start(name, transports()[0], &[]);
    assert!(real.join("run").join("procmond.sock").exists());
    assert!(server.terminate().success());

    std::os::unix::fs::lchown(&via, Some(NOBODY), Some(NOBODY)).unwrap();
    let output = serve_once(name);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains(&format!("refusing to use directory {}", via.display())),
        "{message}"
    );
    assert!(
        message.contains("symbolic link owned by uid 65534"),
        "{message}"
    );
}

#[test]
fn a_symlink_at_the_socket_path_is_refused_and_not_followed() {
    let endpoint = Endpoint::fresh();
    let dir = endpoint.path().parent().unwrap();
    fs::create_dir(dir).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).unwrap();
    let target = endpoint.dir.path().join("elsewhere.sock");
    symlink(&target, endpoint.path()).unwrap();

    let output = serve_once(&endpoint.name);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains("is a symbolic link; refusing to follow or remove it"),
        "{message}"
    );
    assert!(
        fs::symlink_metadata(endpoint.path())
            .unwrap()
            .file_type()
            .is_symlink(),
        "link left alone"
    );
    assert!(!target.exists(), "nothing was created through the link");
}

#[test]
fn a_regular_file_at_the_socket_path_is_refused_and_left_untouched() {
    let endpoint = Endpoint::fresh();
    fs::create_dir(endpoint.path().parent().unwrap()).unwrap();
    fs::write(endpoint.path(), b"precious").unwrap();

    let output = serve_once(&endpoint.name);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains("exists and is a regular file, not a socket; refusing to remove it"),
        "{message}"
    );
    assert_eq!(fs::read(endpoint.path()).unwrap(), b"precious");
}

#[test]
fn an_abstract_namespace_name_is_refused_with_the_reason() {
    // An invalid endpoint is configuration: every command refuses it with
    // the usage exit code, before binding or connecting.
    let serve = serve_once("@daemoneye-procmond");
    let send = daemoneye_ipc()
        .args([
            "send",
            "--task-id",
            "t",
            "--endpoint",
            "@daemoneye-procmond",
        ])
        .output()
        .unwrap();
    let config = daemoneye_ipc()
        .args(["config", "--endpoint", "@daemoneye-procmond"])
        .output()
        .unwrap();
    for (command, output) in [("serve", serve), ("send", send), ("config", config)] {
        assert_eq!(output.status.code(), Some(2), "{command}");
        let message = stderr(&output);
        assert!(
            message.contains("abstract-namespace"),
            "{command}: {message}"
        );
        assert!(
            message.contains("no file permissions"),
            "{command}: {message}"
        );
    }
}

each_backend!(a_second_server_on_a_live_endpoint_is_refused);
fn a_second_server_on_a_live_endpoint_is_refused(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let first = ServerProcess::start(&endpoint.name, transport, &[]);
    first.assert_second_servers_refused(&endpoint.name);
}

each_backend!(a_stale_socket_left_by_kill_9_is_recovered);
fn a_stale_socket_left_by_kill_9_is_recovered(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let mut crashed = ServerProcess::start(&endpoint.name, transport, &[]);
    crashed.kill();
    assert!(
        fs::symlink_metadata(endpoint.path())
            .unwrap()
            .file_type()
            .is_socket(),
        "SIGKILL leaves the socket file behind"
    );
    let mut restarted = ServerProcess::start(&endpoint.name, transport, &[]);
    assert!(
        restarted.logs().contains("removed a stale socket"),
        "{}",
        restarted.logs()
    );
    let client = daemoneye_ipc::IpcClient::new(restarted.client_config(transport)).unwrap();
    assert!(
        block_on(client.send(quick_task("after-crash")))
            .unwrap()
            .success
    );
    assert!(restarted.terminate().success());
}

each_backend!(sigterm_exits_0_and_removes_the_socket);
fn sigterm_exits_0_and_removes_the_socket(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let mut server = ServerProcess::start(&endpoint.name, transport, &[]);
    assert!(endpoint.path().exists());
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "{transport}: {}", server.logs());
    assert!(
        !endpoint.path().exists(),
        "{transport}: socket removed on clean shutdown"
    );
    assert!(
        endpoint.path().parent().unwrap().exists(),
        "the directory stays"
    );
}

each_backend!(peers_of_another_uid_are_refused_unless_allowed);
/// Peer credentials are checked even if the socket's mode is loosened by
/// mistake: a client running as another uid is refused, and admitted only
/// once allowed with --allow-uid. Needs root, to run the client as `nobody`.
fn peers_of_another_uid_are_refused_unless_allowed(transport: TransportKind) {
    require_root("runs a client as another uid");
    for allow in [false, true] {
        let endpoint = Endpoint::fresh();
        let dir = endpoint.path().parent().unwrap();
        fs::create_dir(dir).unwrap();
        // Traversable by nobody, writable only by us: acceptable to the server.
        for traversed in [endpoint.dir.path(), dir] {
            fs::set_permissions(traversed, fs::Permissions::from_mode(0o711)).unwrap();
        }
        let nobody = NOBODY.to_string();
        let args: &[&str] = if allow {
            &["--allow-uid", &nobody]
        } else {
            &[]
        };
        let mut server = ServerProcess::start(&endpoint.name, transport, args);
        fs::set_permissions(endpoint.path(), fs::Permissions::from_mode(0o666)).unwrap();

        let output = {
            use std::os::unix::process::CommandExt;
            daemoneye_ipc()
                .args([
                    "send",
                    "--transport",
                    transport.name(),
                    "--endpoint",
                    &endpoint.name,
                    "--task-id",
                    "from-nobody",
                ])
                .uid(NOBODY)
                .gid(NOBODY)
                .output()
                .unwrap()
        };
        if allow {
            assert!(output.status.success(), "allowed uid: {}", stderr(&output));
        } else {
            assert_eq!(
                output.status.code(),
                Some(1),
                "refused uid must not get a result"
            );
            assert!(output.stdout.is_empty());
            server.wait_for_log("peer rejected", 1);
            let logs = server.logs();
            assert!(
                logs.contains("peer rejected: it runs as uid 65534, which is not allowed"),
                "{logs}"
            );
        }
    }
}

each_backend!(the_client_refuses_a_server_running_as_another_uid_unless_allowed);
/// The client checks who serves the endpoint: a server running as another
/// (non-root) uid is refused before any task is sent, unless allowed.
fn the_client_refuses_a_server_running_as_another_uid_unless_allowed(transport: TransportKind) {
    require_root("runs a server as another uid");
    let endpoint = Endpoint::fresh();
    let dir = endpoint.path().parent().unwrap();
    fs::create_dir(dir).unwrap();
    fs::set_permissions(endpoint.dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
    rustix::fs::chown(
        dir,
        Some(rustix::fs::Uid::from_raw(NOBODY)),
        Some(rustix::fs::Gid::from_raw(NOBODY)),
    )
    .unwrap();
    let mut server = {
        use std::os::unix::process::CommandExt;
        let mut command = daemoneye_ipc();
        command
            .args(["serve", "--endpoint", &endpoint.name])
            .args(["--transport", transport.name()])
            .env("RUST_LOG", "daemoneye_ipc=info")
            .stderr(std::process::Stdio::piped())
            .uid(NOBODY)
            .gid(NOBODY);
        command.spawn().unwrap()
    };
    wait_until("the server's socket", PATIENCE, || {
        endpoint.path().exists().then_some(())
    });

    let send = |extra: &[&str]| {
        daemoneye_ipc()
            .args([
                "send",
                "--transport",
                transport.name(),
                "--endpoint",
                &endpoint.name,
                "--task-id",
                "t",
                "--accept-timeout-ms",
                "2000",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = send(&[]);
    assert_eq!(refused.status.code(), Some(1));
    let message = stderr(&refused);
    assert!(
        message.contains("refusing to send tasks to the server"),
        "{message}"
    );
    assert!(
        message.contains("it runs as uid 65534, which is not allowed"),
        "{message}"
    );

    let allowed = send(&["--allow-uid", "65534"]);
    assert!(allowed.status.success(), "{}", stderr(&allowed));
    let _ = server.kill();
    let _ = server.wait();
}

each_backend!(of_ten_servers_started_at_once_on_one_endpoint_exactly_one_serves);
/// One server per endpoint, by the endpoint's lock: ten servers started at
/// once on one endpoint, exactly one serves and the nine others exit 1
/// naming the endpoint; the one that serves is reachable.
fn of_ten_servers_started_at_once_on_one_endpoint_exactly_one_serves(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let mut servers: Vec<ServerProcess> = (0..10)
        .map(|_| ServerProcess::spawn(&endpoint.name, transport, &[]))
        .collect();
    let exited = wait_until("nine of the ten servers to exit", PATIENCE, || {
        let exited: Vec<(usize, std::process::ExitStatus)> = servers
            .iter_mut()
            .enumerate()
            .filter_map(|(n, server)| server.try_exit().map(|status| (n, status)))
            .collect();
        (exited.len() >= 9).then_some(exited)
    });
    assert_eq!(exited.len(), 9, "exactly one keeps running");
    for (n, status) in &exited {
        assert_eq!(status.code(), Some(1), "server {n}: {}", servers[*n].logs());
        let message = servers[*n].logs();
        assert!(
            message.contains(&format!(
                "endpoint {} is in use by a running server",
                endpoint.name
            )),
            "server {n}: {message}"
        );
    }
    let serving = (0..10)
        .find(|n| exited.iter().all(|(m, _)| m != n))
        .unwrap();
    let mut serving = servers.swap_remove(serving);
    serving.wait_for_log("listening", 1);
    let client = daemoneye_ipc::IpcClient::new(serving.client_config(transport)).unwrap();
    assert!(
        block_on(client.send(quick_task("to-the-one")))
            .unwrap()
            .success
    );
}

each_backend!(members_of_the_socket_group_get_in_and_others_are_refused_at_connect);
/// `--socket-group`: the socket is 0660 and its directory 0750 (and
/// set-group-id), both owned by the group; a client running as another uid
/// in the group is served, one outside it cannot even connect. Needs root,
/// to run clients as another user.
fn members_of_the_socket_group_get_in_and_others_are_refused_at_connect(transport: TransportKind) {
    require_root("runs clients as another uid, in and out of the socket group");
    const GROUP: u32 = NOBODY;
    const OTHER_GROUP: u32 = 12345;
    let endpoint = Endpoint::fresh();
    // The parents let other users through to the socket's directory.
    fs::set_permissions(endpoint.dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
    let group = GROUP.to_string();
    let _server = ServerProcess::start(&endpoint.name, transport, &["--socket-group", &group]);
    let dir = endpoint.path().parent().unwrap();
    let dir_meta = fs::metadata(dir).unwrap();
    assert_eq!(dir_meta.mode() & 0o7777, 0o2750, "directory mode");
    assert_eq!(dir_meta.gid(), GROUP, "directory group");
    let socket_meta = fs::symlink_metadata(endpoint.path()).unwrap();
    assert_eq!(socket_meta.mode() & 0o7777, 0o660, "socket mode");
    assert_eq!(socket_meta.gid(), GROUP, "socket group");

    let send_as = |gid: u32| {
        use std::os::unix::process::CommandExt;
        daemoneye_ipc()
            .args(["send", "--transport", transport.name()])
            .args(["--endpoint", &endpoint.name, "--task-id", "grouped"])
            .args(["--accept-timeout-ms", "2000"])
            .uid(NOBODY)
            .gid(gid)
            .output()
            .unwrap()
    };
    let member = send_as(GROUP);
    assert!(
        member.status.success(),
        "a member is served: {}",
        stderr(&member)
    );
    let outsider = send_as(OTHER_GROUP);
    assert_eq!(outsider.status.code(), Some(1));
    let message = stderr(&outsider);
    assert!(
        message.contains("Permission denied"),
        "refused at connect: {message}"
    );

    let config = daemoneye_ipc()
        .args(["config", "--socket-group", &group])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&config.stdout).contains(&format!("socket_group = \"{group}\"")),
        "config shows the setting: {}",
        String::from_utf8_lossy(&config.stdout)
    );
}
