//! Round trips through a real `daemoneye-ipc serve` process on every
//! backend, and every client backend against every server backend.

mod support;

use daemoneye_ipc::{IpcClient, TaskType, TransportKind};
use support::*;

each_backend!(every_backend_round_trips_and_interoperates_with_every_other);
fn every_backend_round_trips_and_interoperates_with_every_other(transport: TransportKind) {
    let server_transport = transport;
    let endpoint = Endpoint::fresh();
    let server = ServerProcess::start(&endpoint.name, server_transport, &[]);
    assert!(
        server
            .logs()
            .contains(&format!("transport={server_transport}")),
        "the active transport is logged at start: {}",
        server.logs()
    );
    for client_transport in transports() {
        let client = IpcClient::new(server.client_config(client_transport)).unwrap();
        let task_id = format!("{server_transport}-serves-{client_transport}");
        let result = block_on(client.send(quick_task(&task_id))).unwrap();
        assert_eq!(result.task_id, task_id);
        assert!(result.success, "{result:?}");
        assert_eq!(
            result.processes.len(),
            1,
            "exactly this test process: {result:?}"
        );
        assert_eq!(result.processes[0].pid, std::process::id());
    }
}

each_backend!(an_unsupported_task_type_is_answered_and_the_connection_stays_usable);
fn an_unsupported_task_type_is_answered_and_the_connection_stays_usable(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let server = ServerProcess::start(&endpoint.name, transport, &[]);
    block_on(async {
        let mut raw = RawClient::connect(&server.endpoint).await;
        let mut task = quick_task("unsupported");
        task.task_type = TaskType::MonitorNetworkConnections.into();
        task.process_filter = None;
        raw.write(&frame_bytes(&task)).await.unwrap();
        let answer = raw.read_result(PATIENCE).await;
        assert_eq!(answer.task_id, "unsupported");
        assert!(!answer.success);
        let message = answer.error_message.unwrap();
        assert!(message.contains("MONITOR_NETWORK_CONNECTIONS"), "{message}");

        // The same connection still answers.
        raw.write(&frame_bytes(&quick_task("after"))).await.unwrap();
        let answer = raw.read_result(PATIENCE).await;
        assert_eq!(answer.task_id, "after");
        assert!(answer.success);
    });
}

each_backend!(pipelined_tasks_on_one_connection_are_answered_by_id);
fn pipelined_tasks_on_one_connection_are_answered_by_id(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let server = ServerProcess::start(&endpoint.name, transport, &[]);
    block_on(async {
        let mut raw = RawClient::connect(&server.endpoint).await;
        // Five frames in one write: the server must take them apart.
        let mut burst = Vec::new();
        for i in 0..5 {
            burst.extend(frame_bytes(&quick_task(&format!("burst-{i}"))));
        }
        raw.write(&burst).await.unwrap();
        let mut ids = Vec::new();
        for _ in 0..5 {
            let answer = raw.read_result(PATIENCE).await;
            assert!(answer.success);
            ids.push(answer.task_id);
        }
        ids.sort();
        assert_eq!(ids, ["burst-0", "burst-1", "burst-2", "burst-3", "burst-4"]);
    });
}

each_backend!(concurrent_sends_share_one_client_and_each_gets_its_own_result);
fn concurrent_sends_share_one_client_and_each_gets_its_own_result(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let allowed = endpoint.dir.path().to_str().unwrap();
    let server = ServerProcess::start(&endpoint.name, transport, &["--hash-allow", allowed]);
    let client = IpcClient::new(server.client_config(transport)).unwrap();
    // Sixteen files of different contents and sizes: every answer differs
    // from every other, so an answer given to the wrong task shows.
    let files: Vec<tempfile::NamedTempFile> = (0..16u8)
        .map(|i| {
            let file = tempfile::NamedTempFile::new_in(endpoint.dir.path()).unwrap();
            std::fs::write(file.path(), vec![i; 16 * 1024 * (1 + usize::from(i))]).unwrap();
            file
        })
        .collect();
    let hashes = block_on(async {
        let mut sends = tokio::task::JoinSet::new();
        for (i, file) in files.iter().enumerate() {
            let client = client.clone();
            let path = file.path().to_string_lossy().into_owned();
            sends.spawn(async move {
                let task = daemoneye_ipc::DetectionTask {
                    task_id: format!("hash-{i}"),
                    task_type: TaskType::CheckProcessHash.into(),
                    hash_check: Some(daemoneye_ipc::proto::HashCheck {
                        executable_path: path.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                (task.task_id.clone(), path, client.send(task).await.unwrap())
            });
        }
        let mut hashes = std::collections::HashSet::new();
        while let Some(joined) = sends.join_next().await {
            let (task_id, path, result) = joined.unwrap();
            assert_eq!(result.task_id, task_id);
            assert!(result.success, "{result:?}");
            let hash = result.hash_result.unwrap();
            assert_eq!(hash.file_path, path, "{task_id} got another task's answer");
            assert_eq!(hash.hash_value.len(), 64, "a sha256 for {task_id}");
            hashes.insert(hash.hash_value);
        }
        hashes
    });
    assert_eq!(hashes.len(), 16, "sixteen different files, sixteen hashes");
    let accepted = server.logs().matches("serving").count();
    assert_eq!(
        accepted,
        1,
        "all sixteen tasks went over one connection:\n{}",
        server.logs()
    );
}

mod cli {
    use super::*;

    each_backend!(send_prints_the_result_as_json_with_proto_field_names);
    fn send_prints_the_result_as_json_with_proto_field_names(transport: TransportKind) {
        let endpoint = Endpoint::fresh();
        let server = ServerProcess::start(&endpoint.name, transport, &[]);
        let me = std::process::id().to_string();
        let output = daemoneye_ipc()
            .args([
                "send",
                "--transport",
                transport.name(),
                "--endpoint",
                &server.endpoint,
                "--task-id",
                "cli-1",
                "--pid",
                &me,
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(json["task_id"], "cli-1");
        assert_eq!(json["success"], true);
        let process = &json["processes"][0];
        assert_eq!(process["pid"], std::process::id());
        for field in [
            "ppid",
            "name",
            "executable_path",
            "command_line",
            "start_time",
            "memory_usage",
            "user_id",
        ] {
            assert!(process.get(field).is_some(), "field {field} in {process}");
        }
    }

    each_backend!(send_hashes_a_file_and_reports_a_mismatch);
    fn send_hashes_a_file_and_reports_a_mismatch(transport: TransportKind) {
        let endpoint = Endpoint::fresh();
        let allowed = endpoint.dir.path().to_str().unwrap();
        let server = ServerProcess::start(&endpoint.name, transport, &["--hash-allow", allowed]);
        let file = tempfile::NamedTempFile::new_in(endpoint.dir.path()).unwrap();
        std::fs::write(file.path(), b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let path = file.path().to_string_lossy().into_owned();
        for (expected, matches) in [(abc, true), ("0000", false)] {
            let output = daemoneye_ipc()
                .args(["send", "--endpoint", &server.endpoint, "--task-id", "h"])
                .args(["--transport", transport.name()])
                .args(["--hash-path", &path, "--expected-hash", expected])
                .output()
                .unwrap();
            // A script goes by the exit code: 0 when the hash matches, 3
            // when it differs; the result is printed either way.
            assert_eq!(
                output.status.code(),
                Some(if matches { 0 } else { 3 }),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            assert_eq!(json["success"], true, "the hash was computed");
            assert_eq!(json["hash_result"]["hash_value"], abc);
            assert_eq!(json["hash_result"]["success"], matches);
        }
    }

    each_backend!(send_without_a_server_fails_in_one_line_naming_the_endpoint);
    fn send_without_a_server_fails_in_one_line_naming_the_endpoint(transport: TransportKind) {
        let endpoint = Endpoint::fresh();
        let output = daemoneye_ipc()
            .args([
                "send",
                "--transport",
                transport.name(),
                "--endpoint",
                &endpoint.name,
                "--task-id",
                "x",
                "--accept-timeout-ms",
                "300",
            ])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        assert!(output.stdout.is_empty());
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(&endpoint.name), "{stderr}");
        assert!(stderr.contains("no server answered"), "{stderr}");
        assert!(
            stderr.contains("--accept-timeout-ms"),
            "names what shortens the wait: {stderr}"
        );
    }

    #[test]
    fn send_refuses_an_empty_task_id() {
        let endpoint = Endpoint::fresh();
        let output = daemoneye_ipc()
            .args(["send", "--endpoint", &endpoint.name, "--task-id", ""])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "a usage error");
        assert!(String::from_utf8_lossy(&output.stderr).contains("empty task_id"));
    }

    each_backend!(ping_reports_the_round_trip);
    fn ping_reports_the_round_trip(transport: TransportKind) {
        let endpoint = Endpoint::fresh();
        let server = ServerProcess::start(&endpoint.name, transport, &[]);
        let output = daemoneye_ipc()
            .args(["ping", "--endpoint", &server.endpoint, "--count", "3"])
            .args(["--transport", transport.name()])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert!(
            stdout.contains(&format!("transport={}", transport)),
            "{stdout}"
        );
        assert_eq!(stdout.matches("round trip ").count(), 3, "{stdout}");
        assert!(stdout.contains("3 round trips: min"), "{stdout}");
    }
}

/// A task sent on a connection just made leaves within the call's first
/// poll, written by the caller: it does not wait for the runtime to turn
/// its reactor and learn the new socket's room first (that was an
/// `epoll_wait` and a wake-up of the connection's task in every new
/// connection's round trip). The poll here is the only one: the runtime
/// (current-thread) runs nothing else between it and the look at what the
/// server got, so only the caller can have written the frame.
///
/// The `tokio` backend's connect waits for no turn either (Tokio's own
/// `UnixStream::connect` would). Not `legacy`: its connection has a thread
/// of its own that could write the frame as well (its callers' rule is in
/// `policy::client`'s tests). Unix only: a named pipe's first write is the
/// pipe's own.
#[cfg(unix)]
mod a_new_connections_first_task_is_written_within_the_first_poll {
    #[cfg(feature = "ipc-interprocess")]
    #[test]
    fn interprocess() {
        super::first_task_within_the_first_poll(daemoneye_ipc::TransportKind::Interprocess);
    }

    #[cfg(feature = "ipc-tokio")]
    #[test]
    fn tokio() {
        super::first_task_within_the_first_poll(daemoneye_ipc::TransportKind::Tokio);
    }
}

#[cfg(unix)]
#[allow(dead_code)] // Unused where neither async backend is compiled in.
fn first_task_within_the_first_poll(transport: TransportKind) {
    use std::future::Future;
    use std::io::Read;
    use std::task::{Context, Waker};

    use bytes::BytesMut;
    use daemoneye_ipc::frame::{FrameDecoder, FrameSettings};
    use prost::Message;

    let endpoint = Endpoint::fresh();
    std::fs::create_dir(endpoint.path().parent().unwrap()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(endpoint.path()).unwrap();
    listener.set_nonblocking(true).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _in_runtime = runtime.enter();
    let client = IpcClient::new(daemoneye_ipc::IpcConfig {
        transport,
        endpoint_path: endpoint.name.clone(),
        ..Default::default()
    })
    .unwrap();
    let mut sending = std::pin::pin!(client.send(quick_task("first-on-a-new-connection")));
    let polled = sending
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()));
    assert!(polled.is_pending(), "no answer yet: {polled:?}");

    let (mut server_side, _) = listener
        .accept()
        .expect("the client connected within the first poll");
    server_side.set_nonblocking(true).unwrap();
    let mut arrived = BytesMut::zeroed(64 * 1024);
    let read = match server_side.read(&mut arrived) {
        Ok(read) => read,
        Err(error) => panic!("{transport}: nothing was written in the first poll ({error})"),
    };
    arrived.truncate(read);
    let body = FrameDecoder::new(FrameSettings::default())
        .decode(&mut arrived)
        .unwrap()
        .unwrap_or_else(|| panic!("only {read} bytes of the frame were written"));
    let task = daemoneye_ipc::DetectionTask::decode(body).unwrap();
    assert_eq!(task.task_id, "first-on-a-new-connection");
}
