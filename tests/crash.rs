//! A server killed with requests in flight: every request fails promptly
//! with a clear error, and the client reconnects once a server is back.

mod support;

use std::time::Duration;

use daemoneye_ipc::TransportKind;
use daemoneye_ipc::proto::HashCheck;
use daemoneye_ipc::{DetectionTask, IpcClient, IpcError, TaskType};
use support::*;

each_backend!(requests_in_flight_fail_within_their_deadline_and_the_client_reconnects);
fn requests_in_flight_fail_within_their_deadline_and_the_client_reconnects(
    transport: TransportKind,
) {
    let endpoint = Endpoint::fresh();
    // Hashing a 64 GiB sparse file keeps each task in flight for minutes.
    let huge = tempfile::NamedTempFile::new_in(endpoint.dir.path()).unwrap();
    huge.as_file().set_len(64 << 30).unwrap();
    let allowed = endpoint.dir.path().to_str().unwrap();
    let mut server = ServerProcess::start(
        &endpoint.name,
        transport,
        &[
            "--hash-allow",
            allowed,
            "--max-hash-bytes",
            &(128u64 << 30).to_string(),
        ],
    );
    let client = IpcClient::new(server.client_config(transport)).unwrap();

    let outcomes = block_on(async {
        let mut sends = tokio::task::JoinSet::new();
        for i in 0..3 {
            let client = client.clone();
            let task = DetectionTask {
                task_id: format!("slow-{i}"),
                task_type: TaskType::CheckProcessHash.into(),
                hash_check: Some(HashCheck {
                    executable_path: huge.path().to_string_lossy().into_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            sends.spawn(async move { client.send(task).await });
        }
        tokio::task::spawn_blocking(move || {
            server.wait_for_log("task received", 3);
            server.kill();
            server
        })
        .await
        .unwrap();
        let killed_at = tokio::time::Instant::now();
        let mut outcomes = Vec::new();
        while let Some(outcome) = sends.join_next().await {
            outcomes.push((outcome.unwrap(), killed_at.elapsed()));
        }
        outcomes
    });
    assert_eq!(outcomes.len(), 3);
    for (outcome, after) in outcomes {
        match outcome {
            Err(IpcError::ConnectionLost {
                endpoint: named,
                task_id,
                reason,
            }) => {
                assert_eq!(named, endpoint.name, "the error names the endpoint");
                assert!(task_id.starts_with("slow-"));
                assert!(!reason.is_empty());
            }
            other => panic!("{transport}: expected ConnectionLost, got {other:?}"),
        }
        assert!(
            after < Duration::from_secs(5),
            "{transport}: failed {after:?} after the kill"
        );
    }

    let restarted = ServerProcess::start(&endpoint.name, transport, &[]);
    let result = block_on(client.send(quick_task("after-restart"))).expect("the client reconnects");
    assert!(result.success);
    drop(restarted);
}
