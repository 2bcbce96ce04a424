//! A server killed with requests in flight: every request fails promptly
//! with a clear error, and the client reconnects once a server is back.

mod support;

use std::time::Duration;

use daemoneye_ipc::TransportKind;
use daemoneye_ipc::proto::HashCheck;
use daemoneye_ipc::{DetectionTask, IpcClient, IpcConfig, IpcError, TaskType};
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
    // A hundred tasks: the connection carries 32 (the in-flight limit), the
    // rest wait for a slot. Short deadlines, so that every call's end is
    // bounded: a lost connection at once, a reconnect within the accept
    // timeout.
    let client = IpcClient::new(IpcConfig {
        accept_timeout_ms: 2_000,
        read_timeout_ms: 5_000,
        ..server.client_config(transport)
    })
    .unwrap();
    // What `send` promises: a connection within accept_timeout_ms, then an
    // answer within read_timeout_ms. Half a second more for the timers to
    // be served on a loaded machine.
    let deadline = Duration::from_millis(2_000 + 5_000);
    const SCHEDULING: Duration = Duration::from_millis(500);

    let outcomes = block_on(async {
        let mut sends = tokio::task::JoinSet::new();
        for i in 0..100 {
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
            sends.spawn(async move {
                let started = tokio::time::Instant::now();
                (client.send(task).await, started.elapsed())
            });
        }
        tokio::task::spawn_blocking(move || {
            server.wait_for_log("task received", 32);
            server.kill();
            server
        })
        .await
        .unwrap();
        let mut outcomes = Vec::new();
        while let Some(outcome) = sends.join_next().await {
            outcomes.push(outcome.unwrap());
        }
        outcomes
    });
    assert_eq!(outcomes.len(), 100);
    let mut lost = 0;
    for (outcome, took) in outcomes {
        match outcome {
            Err(IpcError::ConnectionLost {
                endpoint: named,
                task_id,
                reason,
            }) => {
                assert_eq!(named, endpoint.name, "the error names the endpoint");
                assert!(task_id.starts_with("slow-"));
                assert!(!reason.is_empty());
                lost += 1;
            }
            // Waiting for a slot when the connection died: no server to
            // reconnect to until the deadline.
            Err(IpcError::ConnectTimeout { .. } | IpcError::InFlightLimit { .. }) => {}
            other => panic!("{transport}: expected the call to fail, got {other:?}"),
        }
        assert!(
            took <= deadline + SCHEDULING,
            "{transport}: a call took {took:?}, past its deadlines ({deadline:?})"
        );
    }
    assert!(lost >= 32, "the tasks in flight were lost: {lost}");

    let restarted = ServerProcess::start(&endpoint.name, transport, &[]);
    let result = block_on(client.send(quick_task("after-restart"))).expect("the client reconnects");
    assert!(result.success);
    drop(restarted);
}
