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

each_backend!(a_world_writable_parent_directory_is_refused);
fn a_world_writable_parent_directory_is_refused(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let dir = endpoint.path().parent().unwrap();
    fs::create_dir(dir).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).unwrap();
    let output = serve_once(&endpoint.name, transport);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains(&format!("refusing to use directory {}", dir.display())),
        "{message}"
    );
    assert!(message.contains("mode 0777"), "{message}");
    assert!(!endpoint.path().exists(), "nothing was bound");
}

each_backend!(a_group_writable_parent_directory_is_refused_but_a_private_one_is_kept);
fn a_group_writable_parent_directory_is_refused_but_a_private_one_is_kept(
    transport: TransportKind,
) {
    let endpoint = Endpoint::fresh();
    let dir = endpoint.path().parent().unwrap();
    fs::create_dir(dir).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o770)).unwrap();
    let message = stderr(&serve_once(&endpoint.name, transport));
    assert!(message.contains("mode 0770"), "{message}");

    // An existing 0750 directory (not writable by others) is acceptable as is.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o750)).unwrap();
    let _server = ServerProcess::start(&endpoint.name, transport, &[]);
    assert_eq!(
        mode(dir),
        0o750,
        "the server does not change an acceptable directory"
    );
}

each_backend!(a_parent_directory_others_can_write_to_is_refused_unless_sticky);
fn a_parent_directory_others_can_write_to_is_refused_unless_sticky(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    // <tmp>/dipcXXXX/run/procmond.sock: loosen <tmp>/dipcXXXX, a parent.
    let grandparent = endpoint.dir.path();
    fs::set_permissions(grandparent, fs::Permissions::from_mode(0o777)).unwrap();
    let message = stderr(&serve_once(&endpoint.name, transport));
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
    let _server = ServerProcess::start(&endpoint.name, transport, &[]);
}

each_backend!(a_socket_directory_that_is_a_symlink_is_refused);
fn a_socket_directory_that_is_a_symlink_is_refused(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let real = endpoint.dir.path().join("real");
    fs::create_dir(&real).unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
    symlink(&real, endpoint.path().parent().unwrap()).unwrap();
    let output = serve_once(&endpoint.name, transport);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(message.contains("it is a symbolic link"), "{message}");
    assert!(
        fs::read_dir(&real).unwrap().next().is_none(),
        "nothing was bound through the link"
    );
}

each_backend!(a_symlink_at_the_socket_path_is_refused_and_not_followed);
fn a_symlink_at_the_socket_path_is_refused_and_not_followed(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let dir = endpoint.path().parent().unwrap();
    fs::create_dir(dir).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).unwrap();
    let target = endpoint.dir.path().join("elsewhere.sock");
    symlink(&target, endpoint.path()).unwrap();

    let output = serve_once(&endpoint.name, transport);
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

each_backend!(a_regular_file_at_the_socket_path_is_refused_and_left_untouched);
fn a_regular_file_at_the_socket_path_is_refused_and_left_untouched(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    fs::create_dir(endpoint.path().parent().unwrap()).unwrap();
    fs::write(endpoint.path(), b"precious").unwrap();

    let output = serve_once(&endpoint.name, transport);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains("exists and is a regular file, not a socket; refusing to remove it"),
        "{message}"
    );
    assert_eq!(fs::read(endpoint.path()).unwrap(), b"precious");
}

each_backend!(an_abstract_namespace_name_is_refused_with_the_reason);
fn an_abstract_namespace_name_is_refused_with_the_reason(transport: TransportKind) {
    // An invalid endpoint is configuration: every command refuses it with
    // the usage exit code, before binding or connecting.
    let serve = serve_once("@daemoneye-procmond", transport);
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

/// The child of [`modes_are_exact_under_any_umask_and_no_other_thread_sees_it_change`]:
/// sets the umask it is given, then binds and stops a server 40 times over
/// while a thread of its own creates files, each of which must get exactly
/// `0666` less that umask; then binds once more and waits for its standard
/// input to close.
#[test]
#[ignore = "a server process of this file's tests, which start it themselves"]
fn server_under_a_umask() {
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let umask = u32::from_str_radix(&std::env::var("DAEMONEYE_TEST_UMASK").unwrap(), 8).unwrap();
    let endpoint = std::env::var("DAEMONEYE_TEST_ENDPOINT").unwrap();
    let transport: TransportKind = std::env::var("DAEMONEYE_TEST_TRANSPORT")
        .unwrap()
        .parse()
        .unwrap();
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(umask as _));
    let files = tempfile::tempdir().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (created, wrong) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let creator = {
        let (stop, created, wrong) = (stop.clone(), created.clone(), wrong.clone());
        let dir = files.path().to_owned();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let path = dir.join("f");
                fs::File::create(&path).unwrap();
                if mode(&path) != 0o666 & !umask {
                    wrong.fetch_add(1, Ordering::SeqCst);
                }
                fs::remove_file(&path).unwrap();
                created.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let config = daemoneye_ipc::IpcConfig {
        transport,
        endpoint_path: endpoint,
        ..daemoneye_ipc::IpcConfig::default()
    };
    let handler = |task: daemoneye_ipc::DetectionTask| async move {
        daemoneye_ipc::DetectionResult {
            task_id: task.task_id,
            ..Default::default()
        }
    };
    block_on(async {
        for _ in 0..40 {
            let server = daemoneye_ipc::IpcServer::bind(config.clone(), handler)
                .await
                .unwrap();
            server.shutdown(std::time::Duration::ZERO).await;
        }
        let _server = daemoneye_ipc::IpcServer::bind(config.clone(), handler)
            .await
            .unwrap();
        stop.store(true, Ordering::SeqCst);
        creator.join().unwrap();
        println!(
            "bound; files created {}, with a wrong mode {}",
            created.load(Ordering::SeqCst),
            wrong.load(Ordering::SeqCst)
        );
        std::io::stdout().flush().unwrap();
        tokio::task::spawn_blocking(|| {
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())
        })
        .await
        .unwrap()
        .unwrap();
    });
}

each_backend!(modes_are_exact_under_any_umask_and_no_other_thread_sees_it_change);
/// #18: the directory is 0700 and the socket 0600 exactly whatever the
/// process umask, even one that takes the owner's own bits; and binding
/// never changes the umask, which is every thread's (the collector embeds
/// this library in a process of many threads).
fn modes_are_exact_under_any_umask_and_no_other_thread_sees_it_change(transport: TransportKind) {
    use std::io::{BufRead, BufReader};
    for umask in ["000", "022", "077", "277"] {
        let endpoint = Endpoint::fresh();
        let mut child = rerun_test_binary("server_under_a_umask")
            .env("DAEMONEYE_TEST_UMASK", umask)
            .env("DAEMONEYE_TEST_ENDPOINT", &endpoint.name)
            .env("DAEMONEYE_TEST_TRANSPORT", transport.name())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let report = BufReader::new(child.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok)
            .find(|line| line.contains("bound;"))
            .unwrap_or_else(|| panic!("umask {umask}: the server did not bind"));
        let socket = endpoint.path();
        assert_eq!(mode(socket.parent().unwrap()), 0o700, "umask {umask}");
        assert_eq!(mode(socket), 0o600, "umask {umask}");
        assert!(
            report.ends_with("with a wrong mode 0"),
            "umask {umask}: another thread saw the umask change: {report}"
        );
        drop(child.stdin.take());
        child.wait().unwrap();
    }
}
