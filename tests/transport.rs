//! Round trips through a real `daemoneye-ipc serve` process on every
//! backend, and every client backend against every server backend.

mod support;

use daemoneye_ipc::{IpcClient, TaskType};
use support::*;

#[test]
fn every_backend_round_trips_and_interoperates_with_every_other() {
    for server_transport in transports() {
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
}

#[test]
fn an_unsupported_task_type_is_answered_and_the_connection_stays_usable() {
    let endpoint = Endpoint::fresh();
    let server = ServerProcess::start(&endpoint.name, transports()[0], &[]);
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

#[test]
fn pipelined_tasks_on_one_connection_are_answered_by_id() {
    let endpoint = Endpoint::fresh();
    let server = ServerProcess::start(&endpoint.name, transports()[0], &[]);
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

#[test]
fn concurrent_sends_share_one_client_and_each_gets_its_own_result() {
    let endpoint = Endpoint::fresh();
    let server = ServerProcess::start(&endpoint.name, transports()[0], &[]);
    let client = IpcClient::new(server.client_config(transports()[0])).unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), vec![7u8; 256 * 1024]).unwrap();
    let hash_path = file.path().to_string_lossy().into_owned();
    block_on(async {
        let mut sends = tokio::task::JoinSet::new();
        for i in 0..16 {
            let client = client.clone();
            let hash_path = hash_path.clone();
            sends.spawn(async move {
                let task = if i % 2 == 0 {
                    quick_task(&format!("enum-{i}"))
                } else {
                    daemoneye_ipc::DetectionTask {
                        task_id: format!("hash-{i}"),
                        task_type: TaskType::CheckProcessHash.into(),
                        hash_check: Some(daemoneye_ipc::proto::HashCheck {
                            executable_path: hash_path,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }
                };
                (task.task_id.clone(), client.send(task).await.unwrap())
            });
        }
        while let Some(joined) = sends.join_next().await {
            let (task_id, result) = joined.unwrap();
            assert_eq!(result.task_id, task_id);
            assert!(result.success, "{result:?}");
            if task_id.starts_with("hash") {
                assert_eq!(
                    result.hash_result.unwrap().hash_value.len(),
                    64,
                    "a sha256 for {task_id}"
                );
            } else {
                assert_eq!(result.processes.len(), 1, "a process list for {task_id}");
            }
        }
    });
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

    #[test]
    fn send_prints_the_result_as_json_with_proto_field_names() {
        let endpoint = Endpoint::fresh();
        let server = ServerProcess::start(&endpoint.name, transports()[0], &[]);
        let me = std::process::id().to_string();
        let output = daemoneye_ipc()
            .args([
                "send",
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

    #[test]
    fn send_hashes_a_file_and_reports_a_mismatch() {
        let endpoint = Endpoint::fresh();
        let server = ServerProcess::start(&endpoint.name, transports()[0], &[]);
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let path = file.path().to_string_lossy().into_owned();
        for (expected, matches) in [(abc, true), ("0000", false)] {
            let output = daemoneye_ipc()
                .args(["send", "--endpoint", &server.endpoint, "--task-id", "h"])
                .args(["--hash-path", &path, "--expected-hash", expected])
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            assert_eq!(json["success"], true, "the hash was computed");
            assert_eq!(json["hash_result"]["hash_value"], abc);
            assert_eq!(json["hash_result"]["success"], matches);
        }
    }

    #[test]
    fn send_without_a_server_fails_in_one_line_naming_the_endpoint() {
        let endpoint = Endpoint::fresh();
        let output = daemoneye_ipc()
            .args([
                "send",
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

    #[test]
    fn ping_reports_the_round_trip() {
        let endpoint = Endpoint::fresh();
        let server = ServerProcess::start(&endpoint.name, transports()[0], &[]);
        let output = daemoneye_ipc()
            .args(["ping", "--endpoint", &server.endpoint, "--count", "3"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert!(
            stdout.contains(&format!("transport={}", transports()[0])),
            "{stdout}"
        );
        assert_eq!(stdout.matches("round trip ").count(), 3, "{stdout}");
        assert!(stdout.contains("3 round trips: min"), "{stdout}");
    }
}
