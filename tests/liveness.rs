//! Nothing hangs and nothing grows without limit: stuck tasks, a server that
//! never answers, shutdown with blocking work, floods of refusals, and what
//! a peer's strings can do to the log. Real processes where the behaviour
//! depends on them.

mod support;

#[cfg(unix)]
use std::time::{Duration, Instant};

use daemoneye_ipc::proto::HashCheck;
use daemoneye_ipc::{
    DetectionResult, DetectionTask, IpcClient, IpcConfig, IpcError, IpcServer, TaskType,
    TransportKind,
};
use support::*;

/// A task hashing `path`.
fn hash_task(id: &str, path: &std::path::Path) -> DetectionTask {
    DetectionTask {
        task_id: id.to_owned(),
        task_type: TaskType::CheckProcessHash.into(),
        hash_check: Some(HashCheck {
            executable_path: path.to_string_lossy().into_owned(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A server that may hash files in the endpoint's directory, however large.
fn hashing_server(endpoint: &Endpoint, transport: TransportKind, extra: &[&str]) -> ServerProcess {
    let allowed = endpoint.dir.path().to_str().unwrap();
    let limit = (256u64 << 30).to_string();
    let args = [
        &["--hash-allow", allowed, "--max-hash-bytes", &limit],
        extra,
    ]
    .concat();
    ServerProcess::start(&endpoint.name, transport, &args)
}

/// A 64 GiB sparse file: hashing it takes minutes.
fn huge_file(endpoint: &Endpoint) -> tempfile::NamedTempFile {
    let huge = tempfile::NamedTempFile::new_in(endpoint.dir.path()).unwrap();
    huge.as_file().set_len(64 << 30).unwrap();
    huge
}

each_backend!(tasks_that_never_finish_are_answered_at_their_deadline_and_their_work_stops);
/// Eight hashes that would take minutes are answered at `task_timeout_ms`
/// with an error naming it, and their work stops: a small hash sent after
/// them gets one of the collector's few blocking-job slots (which the eight
/// would otherwise hold for minutes) and is answered.
fn tasks_that_never_finish_are_answered_at_their_deadline_and_their_work_stops(
    transport: TransportKind,
) {
    let endpoint = Endpoint::fresh();
    let mut server = hashing_server(&endpoint, transport, &["--task-timeout-ms", "1000"]);
    let huge = huge_file(&endpoint);
    let small = tempfile::NamedTempFile::new_in(endpoint.dir.path()).unwrap();
    std::fs::write(small.path(), b"abc").unwrap();
    let client = IpcClient::new(server.client_config(transport)).unwrap();
    block_on(async {
        let mut stuck = tokio::task::JoinSet::new();
        for n in 0..8 {
            let client = client.clone();
            let task = hash_task(&format!("huge-{n}"), huge.path());
            stuck.spawn(async move { client.send(task).await });
        }
        while let Some(answer) = stuck.join_next().await {
            let answer = answer.unwrap().unwrap();
            assert!(!answer.success, "{answer:?}");
            let message = answer.error_message.unwrap();
            assert!(
                message.contains("did not finish this task within task_timeout_ms = 1000"),
                "{message}"
            );
        }
        let answer = client.send(hash_task("small", small.path())).await.unwrap();
        assert!(
            answer.success,
            "the stopped hashes freed their slots: {answer:?}"
        );
    });
    assert_eq!(server.counters()["task_timeouts"], 8);
}

each_backend!(async a_hundred_tasks_that_time_out_do_not_use_up_the_client);
/// A server that never answers some kind of task: a hundred of those time
/// out (their slots all taken, then given up on), and the same client then
/// gets answers to normal tasks at once, on a fresh connection.
async fn a_hundred_tasks_that_time_out_do_not_use_up_the_client(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let config = IpcConfig {
        transport,
        endpoint_path: endpoint.name.clone(),
        ..IpcConfig::default()
    };
    let server = IpcServer::bind(config.clone(), |task: DetectionTask| async move {
        if task.metadata.as_deref() == Some("never") {
            std::future::pending::<()>().await;
        }
        DetectionResult {
            task_id: task.task_id,
            success: true,
            ..Default::default()
        }
    })
    .await
    .unwrap();
    let read_timeout_ms = 300;
    let client = IpcClient::new(IpcConfig {
        read_timeout_ms,
        ..config
    })
    .unwrap();

    let mut never = tokio::task::JoinSet::new();
    for n in 0..100 {
        let client = client.clone();
        never.spawn(async move {
            let task = DetectionTask {
                task_id: format!("never-{n}"),
                metadata: Some("never".into()),
                ..Default::default()
            };
            client.send(task).await
        });
    }
    while let Some(outcome) = never.join_next().await {
        match outcome.unwrap() {
            Err(IpcError::ResponseTimeout { .. } | IpcError::InFlightLimit { .. }) => {}
            other => panic!("expected a timeout, got {other:?}"),
        }
    }

    // Answered at once: on the old connection it would wait for a slot the
    // stuck tasks hold, then fail (InFlightLimit).
    let answer = client
        .send(DetectionTask {
            task_id: "normal".into(),
            ..Default::default()
        })
        .await
        .expect("answered, not refused for slots held by the stuck tasks");
    assert_eq!(answer.task_id, "normal");
    assert_eq!(
        server.stats().accepted,
        2,
        "the stuck connection was replaced by a fresh one"
    );
}

#[cfg(unix)]
each_backend!(serve_exits_within_the_grace_period_while_blocking_work_runs);
/// After SIGTERM, `serve` waits the grace period for the task in flight,
/// then exits within one second more even while its handler is busy with
/// blocking work (a hash that would take minutes): by the server's own log,
/// between "stop requested" and "stopped".
#[cfg(unix)]
fn serve_exits_within_the_grace_period_while_blocking_work_runs(transport: TransportKind) {
    const GRACE_MS: u64 = 1000;
    let endpoint = Endpoint::fresh();
    let grace = GRACE_MS.to_string();
    let mut server = hashing_server(
        &endpoint,
        transport,
        &["--shutdown-grace-ms", &grace, "--task-timeout-ms", "600000"],
    );
    let huge = huge_file(&endpoint);
    let client = IpcClient::new(server.client_config(transport)).unwrap();
    let runtime = runtime();
    let _busy = runtime.spawn(async move { client.send(hash_task("huge", huge.path())).await });
    server.wait_for_log("task received", 1);
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "{}", server.logs());
    let took = server.logged_between("stop requested", "stopped drained=");
    let grace = Duration::from_millis(GRACE_MS);
    assert!(
        took >= grace,
        "stopped {took:?} after SIGTERM, before the grace period was over"
    );
    assert!(
        took <= grace + Duration::from_secs(1),
        "stopped {took:?} after SIGTERM, over the grace period plus one second"
    );
}

#[cfg(unix)]
each_backend!(rejections_are_counted_in_full_and_logged_once_a_second);
/// Fifty connections refused for want of a slot in a burst: every one is
/// counted, and the log gets a line a second, not fifty.
#[cfg(unix)]
fn rejections_are_counted_in_full_and_logged_once_a_second(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let mut server = ServerProcess::start(
        &endpoint.name,
        transport,
        &["--max-connections", "1", "--accept-timeout-ms", "1"],
    );
    let started = Instant::now();
    block_on(async {
        let mut holder = RawClient::connect(&server.endpoint).await;
        holder
            .write(&frame_bytes(&quick_task("holder")))
            .await
            .unwrap();
        assert_eq!(holder.read_result(PATIENCE).await.task_id, "holder");
        for _ in 0..50 {
            let mut refused = RawClient::connect(&server.endpoint).await;
            assert_eq!(refused.read_reply(PATIENCE).await, None, "refused");
        }
    });
    let took = started.elapsed();
    assert_eq!(server.counters()["rejected_limit"], 50);
    let lines = server
        .logs()
        .matches("no connection slot freed in time")
        .count();
    let seconds = took.as_secs() + 1;
    assert!(
        (1..=seconds as usize).contains(&lines),
        "{lines} log lines for 50 refusals in {took:?}"
    );
}

each_backend!(a_task_id_with_a_newline_cannot_forge_a_log_line);
/// Strings that come from a peer are logged escaped: a task id carrying a
/// newline and a fake log line stays on the line that logs it.
fn a_task_id_with_a_newline_cannot_forge_a_log_line(transport: TransportKind) {
    const FORGED: &str = "2030-01-01T00:00:00.000000Z  INFO daemoneye_ipc: forged entry";
    let endpoint = Endpoint::fresh();
    let mut server = ServerProcess::start(&endpoint.name, transport, &[]);
    let client = IpcClient::new(server.client_config(transport)).unwrap();
    let task_id = format!("innocent\n{FORGED}");
    let answer = block_on(client.send(quick_task(&task_id))).unwrap();
    assert_eq!(
        answer.task_id, task_id,
        "the id itself is carried unchanged"
    );
    server.wait_for_log("task received", 1);
    let logs = server.logs();
    assert!(
        !logs.lines().any(|line| line.starts_with(FORGED)),
        "a forged line in the log:\n{logs}"
    );
    assert!(
        logs.contains(r"innocent\n2030-01-01"),
        "the id is logged, escaped:\n{logs}"
    );
}
