//! The tests that need root: they run processes as another user (`nobody`,
//! uid 65534) or give files to one. `ci/test.sh` runs them when it runs as
//! root and, otherwise, leaves them out and says so; run directly, each
//! fails at once with that reason rather than pass without testing.
//!
//! A process run as another user cannot reach the build's own binary when
//! the checkout lies in a private directory (a root home directory, a
//! `mktemp -d`): these tests run a copy placed where any user can reach it
//! ([`BinaryForOthers`]), and put their sockets under directories any user
//! can traverse. `ci/test.sh` runs them from a checkout under a 0700
//! directory to keep it so.
#![cfg(unix)]

mod support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::process::Output;

use daemoneye_ipc::TransportKind;
use support::*;

/// The uid (and gid) these tests act as: `nobody`.
const NOBODY: u32 = 65534;

/// Called first by every test here: fails with the reason when not root.
fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "tests/as_root.rs needs root: its tests run processes as uid {NOBODY}. ci/test.sh leaves \
         them out when it is not run as root"
    );
}

fn serve_once(endpoint: &str, transport: TransportKind) -> Output {
    daemoneye_ipc()
        .args([
            "serve",
            "--endpoint",
            endpoint,
            "--transport",
            transport.name(),
        ])
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

each_backend!(a_parent_symlink_owned_by_another_user_is_refused);
/// A parent reached through a symlink: the link must be ours or root's,
/// since its owner could point it elsewhere. Needs root, to give the link
/// to another user.
fn a_parent_symlink_owned_by_another_user_is_refused(transport: TransportKind) {
    require_root();
    let endpoint = Endpoint::fresh();
    let real = endpoint.dir.path().join("real");
    fs::create_dir(&real).unwrap();
    let via = endpoint.dir.path().join("via");
    symlink(&real, &via).unwrap();
    let name = via.join("run").join("procmond.sock");
    let name = name.to_str().unwrap();

    // Our own link: followed, and the directory created where it leads.
    let mut server = ServerProcess::start(name, transport, &[]);
    assert!(real.join("run").join("procmond.sock").exists());
    assert!(server.terminate().success());

    std::os::unix::fs::lchown(&via, Some(NOBODY), Some(NOBODY)).unwrap();
    let output = serve_once(name, transport);
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

each_backend!(peers_of_another_uid_are_refused_unless_allowed);
/// Peer credentials are checked even if the socket's mode is loosened by
/// mistake: a client running as another uid is refused, and admitted only
/// once allowed with --allow-uid. Needs root, to run the client as `nobody`.
fn peers_of_another_uid_are_refused_unless_allowed(transport: TransportKind) {
    require_root();
    let binary = BinaryForOthers::new();
    for allow in [false, true] {
        let endpoint = Endpoint::reachable_by_others();
        let dir = endpoint.path().parent().unwrap();
        fs::create_dir(dir).unwrap();
        // Traversable by nobody, writable only by us: acceptable to the server.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o711)).unwrap();
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
            binary
                .command()
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
            let message = stderr(&output);
            assert!(
                message.contains(
                    "refused this connection: this agent runs as uid 65534, which is not allowed"
                ),
                "the agent is told why: {message}"
            );
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
    require_root();
    let binary = BinaryForOthers::new();
    let endpoint = Endpoint::reachable_by_others();
    let dir = endpoint.path().parent().unwrap();
    fs::create_dir(dir).unwrap();
    rustix::fs::chown(
        dir,
        Some(rustix::fs::Uid::from_raw(NOBODY)),
        Some(rustix::fs::Gid::from_raw(NOBODY)),
    )
    .unwrap();
    let mut server = {
        use std::os::unix::process::CommandExt;
        let mut command = binary.command();
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

each_backend!(members_of_the_socket_group_get_in_and_others_are_refused_at_connect);
/// `--socket-group`: the socket is 0660 and its directory 0750 (and
/// set-group-id), both owned by the group; a client running as another uid
/// in the group is served, one outside it cannot even connect. Needs root,
/// to run clients as another user.
fn members_of_the_socket_group_get_in_and_others_are_refused_at_connect(transport: TransportKind) {
    require_root();
    const GROUP: u32 = NOBODY;
    const OTHER_GROUP: u32 = 12345;
    let binary = BinaryForOthers::new();
    // The parents let other users through to the socket's directory.
    let endpoint = Endpoint::reachable_by_others();
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
        binary
            .command()
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

/// Runs a command in a PID namespace of its own, as a container would.
const IN_PID_NAMESPACE: &[&str] = &[
    "unshare",
    "--pid",
    "--fork",
    "--mount-proc",
    "--kill-child",
    "--",
];

/// Runs a command in a user namespace of its own with no uid mapped: it
/// runs as the overflow uid there, and every peer's uid shows as that.
const IN_UNMAPPED_USER_NAMESPACE: &[&str] = &["unshare", "--user", "--"];

fn send_args<'a>(endpoint: &'a str, transport: TransportKind, task_id: &'a str) -> Vec<&'a str> {
    vec![
        "send",
        "--transport",
        transport.name(),
        "--endpoint",
        endpoint,
        "--task-id",
        task_id,
        "--accept-timeout-ms",
        "2000",
    ]
}

each_backend!(an_agent_in_another_pid_namespace_is_served);
/// #18: an agent in a container (its own PID namespace) reaching a host
/// collector through a shared socket. Linux reports no pid for a peer in
/// another PID namespace (0); that is no reason to refuse it. (It used to
/// be: "no server answered ... connection reset" on `interprocess`,
/// "credentials that cannot be read (Success)" on `legacy`.)
fn an_agent_in_another_pid_namespace_is_served(transport: TransportKind) {
    require_root();
    let endpoint = Endpoint::fresh();
    let mut server = ServerProcess::start(&endpoint.name, transport, &[]);
    let output = daemoneye_ipc_in(IN_PID_NAMESPACE)
        .args(send_args(&server.endpoint, transport, "from-a-container"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("from-a-container"));
    assert_eq!(server.counters()["rejected_peer"], 0);
}

each_backend!(a_collector_in_another_pid_namespace_serves_a_host_agent);
/// #18: the collector in a container, the agent on the host: the agent
/// reads no pid for its server either, and trusts it by its uid.
fn a_collector_in_another_pid_namespace_serves_a_host_agent(transport: TransportKind) {
    require_root();
    let endpoint = Endpoint::fresh();
    let server = ServerProcess::start_in(IN_PID_NAMESPACE, &endpoint.name, transport, &[]);
    let output = daemoneye_ipc()
        .args(send_args(&server.endpoint, transport, "to-a-container"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("to-a-container"));
}

each_backend!(a_collector_that_cannot_see_its_peers_uid_refuses_it_and_says_why);
/// #18: a collector in a user namespace that maps no uid sees every peer as
/// the overflow uid, the same as its own there: it cannot tell who is
/// connecting, so it refuses them, and its log and the agent's error say
/// so.
fn a_collector_that_cannot_see_its_peers_uid_refuses_it_and_says_why(transport: TransportKind) {
    require_root();
    let endpoint = Endpoint::fresh();
    let mut server =
        ServerProcess::start_in(IN_UNMAPPED_USER_NAMESPACE, &endpoint.name, transport, &[]);
    let output = daemoneye_ipc()
        .args(send_args(&server.endpoint, transport, "unseen"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    server.wait_for_log("peer rejected", 1);
    let logs = server.logs();
    assert!(
        logs.contains("user namespace cannot see (the kernel shows it as the overflow uid 65534"),
        "{logs}"
    );
    let message = stderr(&output);
    assert!(
        message.contains("refused this connection") && message.contains("overflow uid"),
        "{message}"
    );
}

each_backend!(an_agent_as_root_of_a_container_is_judged_by_its_host_uid);
/// #18: root in a container whose root is host uid 100000 (the usual
/// rootless-container mapping) is uid 100000 to a host collector: refused
/// as such, and served once that uid is allowed. Its own view of the
/// collector's uid is the overflow uid (host root is not mapped there), so
/// the agent names that one.
fn an_agent_as_root_of_a_container_is_judged_by_its_host_uid(transport: TransportKind) {
    use std::os::unix::process::CommandExt;
    require_root();
    const CONTAINER_ROOT: u32 = 100_000;
    let binary = BinaryForOthers::new();
    for allow in [false, true] {
        let endpoint = Endpoint::reachable_by_others();
        let dir = endpoint.path().parent().unwrap();
        fs::create_dir(dir).unwrap();
        fs::set_permissions(dir, fs::Permissions::from_mode(0o711)).unwrap();
        let container_root = CONTAINER_ROOT.to_string();
        let args: &[&str] = if allow {
            &["--allow-uid", &container_root]
        } else {
            &[]
        };
        let mut server = ServerProcess::start(&endpoint.name, transport, args);
        fs::set_permissions(endpoint.path(), fs::Permissions::from_mode(0o666)).unwrap();
        let overflow = NOBODY.to_string();
        let mut send = send_args(&endpoint.name, transport, "from-container-root");
        send.extend(["--allow-uid", &overflow]);
        let output = binary
            .command_in(&["unshare", "--map-root-user", "--"])
            .args(send)
            .uid(CONTAINER_ROOT)
            .gid(CONTAINER_ROOT)
            .output()
            .unwrap();
        if allow {
            assert!(output.status.success(), "allowed: {}", stderr(&output));
            assert!(String::from_utf8_lossy(&output.stdout).contains("from-container-root"));
        } else {
            assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
            let message = stderr(&output);
            assert!(
                message.contains("this agent runs as uid 100000, which is not allowed"),
                "the agent is told which uid it is here: {message}"
            );
            server.wait_for_log("peer rejected", 1);
            let logs = server.logs();
            assert!(
                logs.contains("peer rejected: it runs as uid 100000, which is not allowed"),
                "{logs}"
            );
        }
    }
}

each_backend!(an_agent_that_cannot_see_its_servers_uid_refuses_it_and_says_why);
/// #18, the other way: an agent in a user namespace that maps no uid
/// cannot tell who runs its server, refuses it before sending anything,
/// and says why: not "connection reset".
fn an_agent_that_cannot_see_its_servers_uid_refuses_it_and_says_why(transport: TransportKind) {
    require_root();
    let endpoint = Endpoint::fresh();
    let server = ServerProcess::start(&endpoint.name, transport, &[]);
    let output = daemoneye_ipc_in(IN_UNMAPPED_USER_NAMESPACE)
        .args(send_args(&server.endpoint, transport, "t"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains("refusing to send tasks to the server")
            && message.contains("overflow uid 65534"),
        "{message}"
    );
    assert!(!message.contains("connection reset"), "{message}");
}
