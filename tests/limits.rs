//! `max_connections` with a real server: excess clients wait for a slot up to
//! `accept_timeout_ms`, then are closed; a slot frees when a client leaves.

mod support;

use std::time::Duration;

use daemoneye_ipc::TransportKind;
use support::*;

/// A task on a connection of its own: its answer, or `None` if the server
/// closed the connection instead (before or after the task was written).
#[cfg(unix)]
async fn try_task(endpoint: &str, id: &str) -> Option<daemoneye_ipc::DetectionResult> {
    let mut client = RawClient::connect(endpoint).await;
    client.write(&frame_bytes(&quick_task(id))).await.ok()?;
    client.read_reply(PATIENCE).await
}

async fn served_client(endpoint: &str, id: &str) -> RawClient {
    let mut client = RawClient::connect(endpoint).await;
    client.write(&frame_bytes(&quick_task(id))).await.unwrap();
    assert_eq!(client.read_result(PATIENCE).await.task_id, id);
    client
}

each_backend!(
    a_third_client_is_not_served_while_two_are_held_and_is_closed_after_the_accept_timeout
);
fn a_third_client_is_not_served_while_two_are_held_and_is_closed_after_the_accept_timeout(
    transport: TransportKind,
) {
    let endpoint = Endpoint::fresh();
    let mut server = ServerProcess::start(
        &endpoint.name,
        transport,
        &["--max-connections", "2", "--accept-timeout-ms", "1000"],
    );
    block_on(async {
        let _first = served_client(&server.endpoint, "first").await;
        let _second = served_client(&server.endpoint, "second").await;

        let mut third = RawClient::connect(&server.endpoint).await;
        let started = tokio::time::Instant::now();
        third
            .write(&frame_bytes(&quick_task("third")))
            .await
            .unwrap();
        assert_eq!(
            third.read_reply(PATIENCE).await,
            None,
            "closed, never answered"
        );
        let notice = third.notice.take().expect("told why, before the close");
        assert!(
            notice.contains("no connection slot freed within accept_timeout_ms = 1000 (max_connections = 2 reached)"),
            "{notice}"
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(900),
            "closed before accept_timeout_ms: {waited:?}"
        );
        assert!(
            waited < Duration::from_millis(5 * 1000),
            "closed long after accept_timeout_ms: {waited:?}"
        );
    });
    server.wait_for_log("no connection slot freed in time", 1);
}

each_backend!(a_waiting_client_is_served_as_soon_as_a_slot_frees);
/// The third client waits (its task is not read while both slots are held)
/// and is served once the first leaves.
fn a_waiting_client_is_served_as_soon_as_a_slot_frees(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let mut server = ServerProcess::start(
        &endpoint.name,
        transport,
        &["--max-connections", "2", "--accept-timeout-ms", "15000"],
    );
    block_on(async {
        let first = served_client(&server.endpoint, "first").await;
        let _second = served_client(&server.endpoint, "second").await;

        let mut third = RawClient::connect(&server.endpoint).await;
        third
            .write(&frame_bytes(&quick_task("third")))
            .await
            .unwrap();
        tokio::task::block_in_place(|| server.wait_for_log("all slots taken; waiting for one", 1));
        assert_eq!(
            server.counters()["frames_in"],
            2,
            "the waiting client's task is not read while it waits"
        );
        drop(first);
        let answer = third.read_result(PATIENCE).await;
        assert_eq!(answer.task_id, "third");
    });
}

#[cfg(target_os = "linux")]
each_backend!(accept_errors_back_off_instead_of_spinning_and_recover);
/// With its file descriptors exhausted, the server's accept fails again and
/// again (the connection stays queued): it must back off between attempts,
/// not spin, and recover once descriptors free up.
#[cfg(target_os = "linux")]
fn accept_errors_back_off_instead_of_spinning_and_recover(transport: TransportKind) {
    use rustix::process::{Pid, Resource, Rlimit, prlimit};

    let endpoint = Endpoint::fresh();
    let mut server = ServerProcess::start(&endpoint.name, transport, &[]);
    let pid = Pid::from_raw(server.pid() as i32).unwrap();
    let open_fds = std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
        .unwrap()
        .count() as u64;
    let hard_limit = std::fs::read_to_string(format!("/proc/{}/limits", server.pid()))
        .unwrap()
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(4)?.parse().ok());
    // Lower only the soft limit, to what is open now: the next accept fails.
    let original = prlimit(
        Some(pid),
        Resource::Nofile,
        Rlimit {
            current: Some(open_fds),
            maximum: hard_limit,
        },
    )
    .unwrap();
    block_on(async {
        let mut starved = RawClient::connect(&server.endpoint).await;
        starved
            .write(&frame_bytes(&quick_task("starved")))
            .await
            .unwrap();

        let failures = |server: &ServerProcess| server.logs().matches("accept failed").count();
        eventually("four failed accepts", PATIENCE, || {
            (failures(&server) >= 4).then_some(())
        })
        .await;
        // Backoff steps of at least 5, 10 and 20 ms separate the four, by
        // the server's own log timestamps (wall clock, hence 30 ms and not
        // 35); a spinning loop would log thousands in that time.
        let fourth = server.logged_at("accept failed")[3];
        assert!(
            fourth >= Duration::from_millis(30),
            "{fourth:?} from the first failure to the fourth"
        );
        assert!(
            failures(&server) < 50,
            "accept is spinning: {} failures",
            failures(&server)
        );

        prlimit(Some(pid), Resource::Nofile, original).unwrap();
        let answer = starved.read_result(PATIENCE).await;
        assert_eq!(
            answer.task_id, "starved",
            "served once descriptors were available again"
        );
    });
    server.wait_for_log("retry_in_ms", 1);
}

#[cfg(unix)]
each_backend!(one_peer_holds_no_more_than_max_connections_per_peer);
/// With slots to spare, a third connection from the same uid is closed at
/// once when that uid may hold two, and named in the log; when one of its
/// two leaves, it may connect again. (Unix: Windows reports no uid for a
/// pipe's client, so the cap does not apply there.)
#[cfg(unix)]
fn one_peer_holds_no_more_than_max_connections_per_peer(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let mut server = ServerProcess::start(
        &endpoint.name,
        transport,
        &[
            "--max-connections",
            "4",
            "--max-connections-per-peer",
            "2",
            "--accept-timeout-ms",
            "60000",
        ],
    );
    block_on(async {
        let first = served_client(&server.endpoint, "first").await;
        let _second = served_client(&server.endpoint, "second").await;
        // Closed unanswered, at once: not after the minute a waiter waits.
        assert_eq!(try_task(&server.endpoint, "third").await, None);
        drop(first);
        // The first's slot frees once the server notices it left.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while try_task(&server.endpoint, "again").await.is_none() {
            assert!(tokio::time::Instant::now() < deadline, "never served again");
        }
    });
    server.wait_for_log("holds max_connections_per_peer = 2 connections already", 1);
    assert!(server.counters()["rejected_limit"] >= 1);
}
