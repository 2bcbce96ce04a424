//! `IpcServer` and `IpcClient` as a library, in one process, with handlers
//! the tests control: true pipelining, handler failures, oversize results,
//! id rules, deadlines, graceful shutdown and cleanup, telemetry.

mod support;

use std::sync::Arc;
use std::time::Duration;

use daemoneye_ipc::proto::ProcessFilter;
use daemoneye_ipc::server::TaskHandler;
use daemoneye_ipc::{
    DetectionResult, DetectionTask, IpcClient, IpcConfig, IpcError, IpcServer, ProcessRecord,
    TransportKind,
};
use support::{Endpoint, PATIENCE};
use tokio::sync::{Notify, Semaphore, oneshot};

fn config(endpoint: &Endpoint, transport: TransportKind) -> IpcConfig {
    IpcConfig {
        transport,
        endpoint_path: endpoint.name.clone(),
        ..IpcConfig::default()
    }
}

/// A successful result that echoes the task's metadata, so that answers to
/// tasks with the same id but different metadata can be told apart.
fn ok(task: &DetectionTask) -> DetectionResult {
    DetectionResult {
        task_id: task.task_id.clone(),
        success: true,
        error_message: task.metadata.clone(),
        ..Default::default()
    }
}

fn task(id: &str) -> DetectionTask {
    DetectionTask {
        task_id: id.to_owned(),
        ..Default::default()
    }
}

/// Sends `task` on a task of its own, so the test can act while it waits.
fn send_in_background(
    client: &IpcClient,
    task: DetectionTask,
) -> tokio::task::JoinHandle<Result<DetectionResult, IpcError>> {
    let client = client.clone();
    tokio::spawn(async move { client.send(task).await })
}

/// A handler that holds tasks whose metadata is "hold" until released.
#[derive(Clone, Default)]
struct Gate {
    released: Arc<Notify>,
    held: Arc<Notify>,
}

impl Gate {
    fn handler(&self) -> impl TaskHandler {
        let gate = self.clone();
        move |task: DetectionTask| {
            let gate = gate.clone();
            async move {
                if task.metadata.as_deref() == Some("hold") {
                    let released = gate.released.notified();
                    gate.held.notify_one();
                    released.await;
                }
                ok(&task)
            }
        }
    }
}

fn held(id: &str) -> DetectionTask {
    DetectionTask {
        metadata: Some("hold".into()),
        ..task(id)
    }
}

/// A server with one task held in flight by its handler until
/// `gate.released` is notified.
struct Held {
    server: IpcServer,
    gate: Gate,
    /// The held task's send, on a task of its own.
    in_flight: tokio::task::JoinHandle<Result<DetectionResult, IpcError>>,
}

/// Binds a gated server on `endpoint` and sends it a task `id` to hold;
/// returns once the handler holds it.
async fn holding(endpoint: &Endpoint, transport: TransportKind, id: &str) -> Held {
    let gate = Gate::default();
    let server = IpcServer::bind(config(endpoint, transport), gate.handler())
        .await
        .unwrap();
    let client = IpcClient::new(config(endpoint, transport)).unwrap();
    let in_flight = send_in_background(&client, held(id));
    gate.held.notified().await;
    Held {
        server,
        gate,
        in_flight,
    }
}

each_backend!(async answers_come_back_as_they_complete_not_in_request_order);
async fn answers_come_back_as_they_complete_not_in_request_order(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let gate = Gate::default();
    let server = IpcServer::bind(config(&endpoint, transport), gate.handler())
        .await
        .unwrap();
    let client = IpcClient::new(config(&endpoint, transport)).unwrap();

    let slow = send_in_background(&client, held("slow"));
    gate.held.notified().await;
    // The slow task is running; a later one overtakes it on the same connection.
    let fast = client.send(task("fast")).await.unwrap();
    assert_eq!(fast.task_id, "fast");
    // The client can read a result before the server has counted it.
    let written = support::eventually("the fast result counted", PATIENCE, || {
        Some(server.stats().frames_out).filter(|&written| written > 0)
    })
    .await;
    assert_eq!(
        written, 1,
        "{transport}: only the fast task's result was written while the slow one is held"
    );
    gate.released.notify_one();
    assert_eq!(slow.await.unwrap().unwrap().task_id, "slow");
    assert_eq!(
        server.stats().accepted,
        1,
        "{transport}: one connection carried both"
    );
}

each_backend!(a_client_outlives_the_runtime_it_first_connected_on);
/// A client kept across runtimes (a static one, say): the runtime it
/// connected on is dropped before the connection's driver ever ran, and a
/// send on another runtime is answered on a fresh connection instead of
/// waiting on one nothing drives.
fn a_client_outlives_the_runtime_it_first_connected_on(transport: TransportKind) {
    let server_runtime = support::runtime();
    let endpoint = Endpoint::fresh();
    let server = server_runtime
        .block_on(IpcServer::bind(
            config(&endpoint, transport),
            |task: DetectionTask| async move { ok(&task) },
        ))
        .unwrap();
    let client = IpcClient::new(config(&endpoint, transport)).unwrap();
    // A current-thread runtime runs the tasks spawned on it only while it
    // blocks on something; connecting spawns the driver and returns.
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    first.block_on(client.connect_now()).unwrap();
    drop(first);
    let answer = support::runtime().block_on(async {
        tokio::time::timeout(PATIENCE, client.send(task("after")))
            .await
            .unwrap_or_else(|_| {
                panic!("{transport}: the send waits on a connection nothing drives")
            })
    });
    assert_eq!(answer.unwrap().task_id, "after", "{transport}");
    server_runtime.block_on(server.shutdown(Duration::from_secs(5)));
}

each_backend!(async a_panicking_handler_is_answered_with_an_error_and_the_connection_lives_on);
async fn a_panicking_handler_is_answered_with_an_error_and_the_connection_lives_on(
    transport: TransportKind,
) {
    let endpoint = Endpoint::fresh();
    let server = IpcServer::bind(
        config(&endpoint, transport),
        |task: DetectionTask| async move {
            assert_ne!(task.task_id, "boom", "handler bug triggered on purpose");
            ok(&task)
        },
    )
    .await
    .unwrap();
    let client = IpcClient::new(config(&endpoint, transport)).unwrap();

    let answer = client.send(task("boom")).await.unwrap();
    assert_eq!(answer.task_id, "boom");
    assert!(!answer.success);
    assert!(answer.error_message.unwrap().contains("handler failed"));
    assert!(client.send(task("fine")).await.unwrap().success);
    let stats = server.stats();
    assert_eq!(stats.handler_errors, 1);
    assert_eq!(stats.accepted, 1, "the same connection served both");
}

each_backend!(async a_handler_that_panics_after_waiting_is_answered_with_an_error);
/// A handler that panics after its first `.await` runs as a task of its own
/// by then: the panic is caught there, answered, and counted.
async fn a_handler_that_panics_after_waiting_is_answered_with_an_error(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let server = IpcServer::bind(
        config(&endpoint, transport),
        |task: DetectionTask| async move {
            // Not ready on the first poll: the rest runs as a task.
            tokio::task::yield_now().await;
            assert_ne!(task.task_id, "late-boom", "handler bug after waiting");
            ok(&task)
        },
    )
    .await
    .unwrap();
    let client = IpcClient::new(config(&endpoint, transport)).unwrap();

    let answer = client.send(task("late-boom")).await.unwrap();
    assert_eq!(answer.task_id, "late-boom");
    assert!(!answer.success);
    let message = answer.error_message.unwrap();
    assert!(
        message.contains("handler failed") && message.contains("handler bug after waiting"),
        "{message}"
    );
    assert!(client.send(task("fine")).await.unwrap().success);
    let stats = server.stats();
    assert_eq!(stats.handler_errors, 1);
    assert_eq!(stats.accepted, 1, "the same connection served both");
}

each_backend!(async a_result_too_large_for_a_frame_is_answered_with_its_size_and_the_limit);
async fn a_result_too_large_for_a_frame_is_answered_with_its_size_and_the_limit(
    transport: TransportKind,
) {
    let endpoint = Endpoint::fresh();
    let limited = IpcConfig {
        max_frame_bytes: 4096,
        ..config(&endpoint, transport)
    };
    let server = IpcServer::bind(limited.clone(), |task: DetectionTask| async move {
        DetectionResult {
            processes: vec![
                ProcessRecord {
                    name: "x".repeat(100),
                    ..Default::default()
                };
                100
            ],
            ..ok(&task)
        }
    })
    .await
    .unwrap();
    let client = IpcClient::new(limited).unwrap();
    let answer = client.send(task("huge")).await.unwrap();
    assert_eq!(answer.task_id, "huge");
    assert!(!answer.success);
    let message = answer.error_message.unwrap();
    assert!(message.contains("max_frame_bytes = 4096"), "{message}");
    assert!(message.contains("is 10"), "the size is given: {message}");
    assert!(
        message.contains("process_filter"),
        "the fix is suggested: {message}"
    );
    assert_eq!(server.stats().oversize_results, 1);
    assert!(
        client.send(task("next")).await.is_ok(),
        "the connection is still usable"
    );
}

each_backend!(async a_budget_smaller_than_one_task_and_its_result_is_refused_at_bind);
/// `max_bytes_in_flight` below one task and one result of the largest size
/// would leave every connection waiting forever: `bind` refuses it, names
/// the least it accepts, and binds nothing. That least is accepted.
async fn a_budget_smaller_than_one_task_and_its_result_is_refused_at_bind(
    transport: TransportKind,
) {
    let endpoint = Endpoint::fresh();
    let limited = IpcConfig {
        max_frame_bytes: 4096,
        ..config(&endpoint, transport)
    };
    // A task frame and a result frame: 2 x (4096 + 8-byte header).
    const LEAST: usize = 2 * (4096 + 8);
    let refused = IpcServer::builder(limited.clone())
        .max_bytes_in_flight(LEAST - 1)
        .bind(|task: DetectionTask| async move { ok(&task) })
        .await
        .expect_err("a budget under one task and its result is refused");
    let message = refused.to_string();
    assert!(
        message.contains("max_bytes_in_flight") && message.contains(&format!("at least {LEAST}")),
        "{message}"
    );
    #[cfg(unix)]
    assert!(!endpoint.path().exists(), "nothing bound");
    let server = IpcServer::builder(limited.clone())
        .max_bytes_in_flight(LEAST)
        .bind(|task: DetectionTask| async move { ok(&task) })
        .await
        .unwrap();
    let client = IpcClient::new(limited).unwrap();
    assert!(client.send(task("fits")).await.unwrap().success);
    server.shutdown(PATIENCE).await;
}

each_backend!(async a_shared_result_goes_out_with_each_tasks_own_id);
async fn a_shared_result_goes_out_with_each_tasks_own_id(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let shared = Arc::new(DetectionResult {
        success: true,
        processes: vec![ProcessRecord {
            pid: 7,
            name: "shared".into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    let stale = Arc::new(DetectionResult {
        task_id: "someone else's".into(),
        ..DetectionResult::clone(&shared)
    });
    let _server = IpcServer::bind(config(&endpoint, transport), move |task: DetectionTask| {
        let reply = if task.task_id == "stale" {
            stale.clone()
        } else {
            shared.clone()
        };
        async move { reply }
    })
    .await
    .unwrap();
    let client = IpcClient::new(config(&endpoint, transport)).unwrap();
    for id in ["a", "b", "stale"] {
        let result = client.send(task(id)).await.unwrap();
        assert_eq!(result.task_id, id);
        assert!(result.success);
        assert_eq!(result.processes.len(), 1);
        assert_eq!(result.processes[0].name, "shared");
    }
}

each_backend!(async task_ids_must_be_non_empty_and_unique_while_in_flight);
async fn task_ids_must_be_non_empty_and_unique_while_in_flight(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let gate = Gate::default();
    let _server = IpcServer::bind(config(&endpoint, transport), gate.handler())
        .await
        .unwrap();
    let client = IpcClient::new(config(&endpoint, transport)).unwrap();

    assert!(matches!(
        client.send(task("")).await,
        Err(IpcError::EmptyTaskId)
    ));

    let first = send_in_background(&client, held("twin"));
    gate.held.notified().await;
    match client.send(task("twin")).await {
        Err(error @ IpcError::DuplicateTaskId { .. }) => {
            assert!(error.to_string().contains("\"twin\""))
        }
        other => panic!("expected DuplicateTaskId, got {other:?}"),
    }
    gate.released.notify_one();
    assert!(first.await.unwrap().unwrap().success);
    assert!(
        client.send(task("twin")).await.unwrap().success,
        "the id is free again"
    );
}

each_backend!(async the_server_answers_with_the_task_id_whatever_the_handler_says);
async fn the_server_answers_with_the_task_id_whatever_the_handler_says(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let _server = IpcServer::bind(config(&endpoint, transport), |_task: DetectionTask| async {
        DetectionResult {
            task_id: "something else".into(),
            success: true,
            ..Default::default()
        }
    })
    .await
    .unwrap();
    let client = IpcClient::new(config(&endpoint, transport)).unwrap();
    assert_eq!(client.send(task("mine")).await.unwrap().task_id, "mine");
}

each_backend!(async a_client_waiting_on_a_slow_handler_is_not_cut_as_idle);
async fn a_client_waiting_on_a_slow_handler_is_not_cut_as_idle(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let short = IpcConfig {
        read_timeout_ms: 300,
        ..config(&endpoint, transport)
    };
    let _server = IpcServer::bind(short.clone(), |task: DetectionTask| async move {
        // Slower than the server's idle limit, faster than the client's patience.
        tokio::time::sleep(Duration::from_millis(900)).await;
        ok(&task)
    })
    .await
    .unwrap();
    let patient = IpcConfig {
        read_timeout_ms: 10_000,
        ..short
    };
    let client = IpcClient::new(patient).unwrap();
    assert!(client.send(task("slow")).await.unwrap().success);
}

each_backend!(async no_answer_within_the_read_timeout_is_a_response_timeout);
async fn no_answer_within_the_read_timeout_is_a_response_timeout(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let gate = Gate::default();
    let _server = IpcServer::bind(config(&endpoint, transport), gate.handler())
        .await
        .unwrap();
    let impatient = IpcConfig {
        read_timeout_ms: 200,
        ..config(&endpoint, transport)
    };
    let client = IpcClient::new(impatient).unwrap();
    match client.send(held("stuck")).await {
        Err(error @ IpcError::ResponseTimeout { .. }) => {
            let message = error.to_string();
            assert!(
                message.contains("within 200 ms") && message.contains(&endpoint.name),
                "{message}"
            );
        }
        other => panic!("expected ResponseTimeout, got {other:?}"),
    }
    gate.released.notify_one();
    assert!(client.send(task("next")).await.unwrap().success);
}

/// A handler that waits until `open` is closed, then answers.
fn wait_for(open: &Arc<Semaphore>) -> impl TaskHandler + use<> {
    let open = open.clone();
    move |task: DetectionTask| {
        let open = open.clone();
        async move {
            let _closed = open.acquire().await;
            ok(&task)
        }
    }
}

each_backend!(async tasks_beyond_the_in_flight_limit_wait_their_turn_without_stalling_the_connection);
/// The server stops reading a connection with its limit of tasks in flight.
/// A client that went on writing would stall on that backpressure and, past
/// its write deadline, take the connection for dead; the client keeps to the
/// limit instead, and the tasks beyond it wait their turn.
async fn tasks_beyond_the_in_flight_limit_wait_their_turn_without_stalling_the_connection(
    transport: TransportKind,
) {
    const LIMIT: usize = 4;
    let endpoint = Endpoint::fresh();
    let open = Arc::new(Semaphore::new(0));
    // The server would take more than the client's limit: what it reads
    // shows what the client sent.
    let server = IpcServer::builder(config(&endpoint, transport))
        .max_in_flight_per_connection(4 * LIMIT)
        .bind(wait_for(&open))
        .await
        .unwrap();
    let write_timeout_ms = 200;
    let client = IpcClient::builder(IpcConfig {
        write_timeout_ms,
        ..config(&endpoint, transport)
    })
    .max_in_flight(LIMIT)
    .build()
    .unwrap();

    // Tasks large enough that the ones beyond the limit would fill the
    // socket's buffer if they were written.
    let bulk = "x".repeat(100 * 1024);
    let sends: Vec<_> = (0..3 * LIMIT)
        .map(|n| {
            let task = DetectionTask {
                process_filter: Some(ProcessFilter {
                    process_names: vec![bulk.clone()],
                    ..Default::default()
                }),
                ..task(&format!("bulk-{n}"))
            };
            send_in_background(&client, task)
        })
        .collect();
    support::eventually(
        "the server to hold the client's limit of tasks",
        PATIENCE,
        || (server.stats().frames_in == LIMIT as u64).then_some(()),
    )
    .await;
    // The behaviour under test is what happens once the write deadline has
    // passed with the server holding its limit.
    tokio::time::sleep(Duration::from_millis(3 * write_timeout_ms)).await;
    assert_eq!(
        server.stats().frames_in,
        LIMIT as u64,
        "the client sent no more than the limit"
    );

    open.close();
    for (n, send) in sends.into_iter().enumerate() {
        let result = send.await.unwrap().expect("every task is answered");
        assert_eq!(result.task_id, format!("bulk-{n}"));
    }
    let stats = server.stats();
    assert_eq!(stats.accepted, 1, "one connection carried every task");
    assert_eq!(stats.frames_in, 3 * LIMIT as u64);
}

each_backend!(async a_send_waits_for_an_in_flight_slot_no_longer_than_the_read_timeout);
/// With every in-flight slot held by a stuck task, a further send gives up
/// within its deadline without sending. Once the stuck task is past its
/// deadline, the connection holding it is replaced: the next send is
/// answered at once on a fresh connection, although the server still holds
/// the stuck task.
async fn a_send_waits_for_an_in_flight_slot_no_longer_than_the_read_timeout(
    transport: TransportKind,
) {
    let endpoint = Endpoint::fresh();
    let gate = Gate::default();
    let server = IpcServer::bind(config(&endpoint, transport), gate.handler())
        .await
        .unwrap();
    let client = IpcClient::builder(IpcConfig {
        read_timeout_ms: 300,
        ..config(&endpoint, transport)
    })
    .max_in_flight(1)
    .build()
    .unwrap();

    let stuck = send_in_background(&client, held("stuck"));
    gate.held.notified().await;
    match client.send(task("waiting")).await {
        Err(error @ IpcError::InFlightLimit { .. }) => {
            let message = error.to_string();
            assert!(
                message.contains("\"waiting\"")
                    && message.contains("in-flight limit (1) was reached")
                    && message.contains("within 300 ms"),
                "{message}"
            );
        }
        other => panic!("expected InFlightLimit, got {other:?}"),
    }
    assert!(matches!(
        stuck.await.unwrap(),
        Err(IpcError::ResponseTimeout { .. })
    ));
    assert_eq!(server.stats().frames_in, 1, "the waiting task was not sent");

    assert_eq!(client.send(task("later")).await.unwrap().task_id, "later");
    assert_eq!(
        server.stats().accepted,
        2,
        "a fresh connection replaced the one holding the stuck task"
    );
    gate.released.notify_one();
}

each_backend!(async a_late_result_is_never_taken_for_the_answer_to_a_retry);
/// A caller that gives up leaves its id reserved until the server's late
/// answer has come and been discarded: that answer can never be delivered to
/// a later task reusing the id.
async fn a_late_result_is_never_taken_for_the_answer_to_a_retry(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let gate = Gate::default();
    let server = IpcServer::bind(config(&endpoint, transport), gate.handler())
        .await
        .unwrap();
    let client = IpcClient::new(config(&endpoint, transport)).unwrap();
    {
        let held_task = client.send(held("reused"));
        tokio::pin!(held_task);
        tokio::select! {
            _ = &mut held_task => panic!("the held task cannot finish"),
            _ = gate.held.notified() => {}
        }
        // The server holds the task: its caller gives up now, dropping the
        // send.
    }

    assert!(matches!(
        client.send(task("reused")).await,
        Err(IpcError::DuplicateTaskId { .. })
    ));
    gate.released.notify_one();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let retried = loop {
        match client.send(task("reused")).await {
            Ok(result) => break result,
            Err(IpcError::DuplicateTaskId { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => panic!("expected the retry to succeed, got {other:?}"),
        }
    };
    assert!(retried.success);
    assert_eq!(
        retried.error_message, None,
        "the retry's own answer, not the held task's (which echoes \"hold\")"
    );
    assert_eq!(server.stats().accepted, 1, "all on one connection");
    // The late answer and the retry's own (counted just after they are written).
    support::eventually("two results written", PATIENCE, || {
        (server.stats().frames_out == 2).then_some(())
    })
    .await;
}

each_backend!(async a_send_given_up_on_mid_write_leaves_the_connection_intact);
/// A caller that gives up while its frame is half written leaves the
/// connection intact: the rest of the frame still goes out, and the next
/// task on the same connection is served. The server holds one task at its
/// in-flight limit, so it reads nothing: a 512 KiB frame cannot go out whole
/// until it is released, and its send is dropped meanwhile.
async fn a_send_given_up_on_mid_write_leaves_the_connection_intact(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let gate = Gate::default();
    let server = IpcServer::builder(config(&endpoint, transport))
        .max_in_flight_per_connection(1)
        .bind(gate.handler())
        .await
        .unwrap();
    let client = IpcClient::new(config(&endpoint, transport)).unwrap();
    let holding = send_in_background(&client, held("held"));
    gate.held.notified().await;
    let big = DetectionTask {
        metadata: Some("x".repeat(512 * 1024)),
        ..task("big")
    };
    let cut = tokio::time::timeout(Duration::from_millis(100), client.send(big)).await;
    assert!(
        cut.is_err(),
        "the frame cannot go out whole while the server reads nothing"
    );
    assert_eq!(server.stats().frames_in, 1, "nor has any of it been read");

    gate.released.notify_one();
    assert!(holding.await.unwrap().unwrap().success);
    assert!(client.send(task("after")).await.unwrap().success);
    let stats = server.stats();
    assert_eq!(stats.accepted, 1, "the connection survived");
    assert_eq!(stats.frames_in, 3, "the given-up frame arrived whole");
    assert_eq!(
        stats.malformed_frames + stats.read_timeouts + stats.crc_errors,
        0
    );
}

each_backend!(async concurrent_sends_without_a_server_all_fail_within_the_connect_deadline);
async fn concurrent_sends_without_a_server_all_fail_within_the_connect_deadline(
    transport: TransportKind,
) {
    let endpoint = Endpoint::fresh();
    let quick = IpcConfig {
        accept_timeout_ms: 300,
        ..config(&endpoint, transport)
    };
    let client = IpcClient::new(quick).unwrap();
    let started = tokio::time::Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..10 {
        let client = client.clone();
        sends.spawn(async move { client.send(task(&format!("t{i}"))).await });
    }
    while let Some(outcome) = sends.join_next().await {
        assert!(matches!(
            outcome.unwrap(),
            Err(IpcError::ConnectTimeout { .. })
        ));
    }
    // One connect deadline for everyone, not one after another (that would
    // take ten times 300 ms).
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        started.elapsed()
    );
}

each_backend!(async an_idle_connection_is_replaced_before_the_server_would_close_it);
async fn an_idle_connection_is_replaced_before_the_server_would_close_it(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let short = IpcConfig {
        read_timeout_ms: 2000,
        ..config(&endpoint, transport)
    };
    let server = IpcServer::bind(
        short.clone(),
        |task: DetectionTask| async move { ok(&task) },
    )
    .await
    .unwrap();
    let client = IpcClient::new(short).unwrap();
    client.send(task("first")).await.unwrap();
    // Idle past half the read timeout (and short of all of it, by most of a
    // second even on a loaded machine): the next send must not cross the
    // server's idle close, so the client opens a fresh connection.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(client.send(task("second")).await.unwrap().success);
    assert_eq!(server.stats().accepted, 2);
}

each_backend!(async connecting_retries_until_the_server_appears_or_the_deadline_passes);
async fn connecting_retries_until_the_server_appears_or_the_deadline_passes(
    transport: TransportKind,
) {
    let endpoint = Endpoint::fresh();
    let quick = IpcConfig {
        accept_timeout_ms: 200,
        ..config(&endpoint, transport)
    };
    match IpcClient::connect(quick).await {
        Err(error @ IpcError::ConnectTimeout { .. }) => {
            let message = error.to_string();
            assert!(
                message.contains(&endpoint.name) && message.contains("within 200 ms"),
                "{message}"
            );
        }
        other => panic!("expected ConnectTimeout, got {other:?}"),
    }

    // A client started before its server: it keeps trying and gets through.
    let client = IpcClient::new(config(&endpoint, transport)).unwrap();
    let early = tokio::spawn(async move { client.send(task("early")).await });
    let (bound_tx, bound_rx) = oneshot::channel();
    let server_config = config(&endpoint, transport);
    let server_task = tokio::spawn(async move {
        // The server comes up a little after the client started trying.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let server = IpcServer::bind(
            server_config,
            |task: DetectionTask| async move { ok(&task) },
        )
        .await
        .unwrap();
        let _ = bound_tx.send(());
        server
    });
    bound_rx.await.unwrap();
    assert!(early.await.unwrap().unwrap().success);
    drop(server_task.await.unwrap());
}

each_backend!(async graceful_shutdown_finishes_tasks_in_flight_then_removes_the_socket);
async fn graceful_shutdown_finishes_tasks_in_flight_then_removes_the_socket(
    transport: TransportKind,
) {
    let endpoint = Endpoint::fresh();
    let Held {
        server,
        gate,
        in_flight,
    } = holding(&endpoint, transport, "finishing").await;
    let shutdown = tokio::spawn(server.shutdown(PATIENCE));
    // The task is released only once the shutdown has begun.
    until_not_accepting(&endpoint, transport).await;
    gate.released.notify_one();
    let result = in_flight
        .await
        .unwrap()
        .expect("the in-flight task is answered during shutdown");
    assert!(result.success);
    let report = shutdown.await.unwrap();
    assert!(report.drained, "{transport}");
    assert_eq!(report.stats.frames_out, 1);
    #[cfg(unix)]
    assert!(!endpoint.path().exists(), "{transport}: socket removed");
    // Nothing listens after shutdown.
    until_not_accepting(&endpoint, transport).await;
}

#[cfg(unix)]
each_backend!(async a_connection_the_drain_cuts_finds_no_listener_to_reconnect_to);
/// Shutdown stops accepting before it stops reading. A client whose
/// connection the drain closes and who reconnects at once finds the
/// endpoint gone (so it waits for a replacement), rather than being
/// accepted by the draining server only to be cut again with a new task.
/// (Windows closes a waiting pipe instance a moment after its owner drops
/// it, so there the endpoint is refused shortly after, not at once.)
#[cfg(unix)]
async fn a_connection_the_drain_cuts_finds_no_listener_to_reconnect_to(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    // A task held in flight keeps the drain going.
    let Held {
        server,
        gate,
        in_flight,
    } = holding(&endpoint, transport, "draining").await;
    let mut idle = support::RawClient::connect(&endpoint.name).await;
    idle.write(&support::frame_bytes(&task("before")))
        .await
        .unwrap();
    assert_eq!(idle.read_result(PATIENCE).await.task_id, "before");

    let shutdown = tokio::spawn(server.shutdown(PATIENCE));
    idle.closed_within(PATIENCE).await;
    let reconnected = tokio::net::UnixStream::connect(endpoint.path()).await;
    assert!(
        reconnected.is_err(),
        "{transport}: a client cut by the drain was let in again"
    );

    gate.released.notify_one();
    assert!(in_flight.await.unwrap().unwrap().success);
    assert!(shutdown.await.unwrap().drained, "{transport}");
}

/// Waits until a server on `endpoint` no longer accepts: on Unix its socket
/// file is gone (at once when shutdown begins). A Windows pipe instance
/// that was waiting for a client is closed through the I/O completion port,
/// a moment after its owner dropped it, so there the refusal is awaited.
async fn until_not_accepting(endpoint: &Endpoint, transport: TransportKind) {
    #[cfg(unix)]
    {
        let _ = transport;
        support::eventually("the socket file to be removed", PATIENCE, || {
            (!endpoint.path().exists()).then_some(())
        })
        .await;
    }
    #[cfg(windows)]
    {
        let refused = async {
            while IpcClient::connect(IpcConfig {
                accept_timeout_ms: 50,
                ..config(endpoint, transport)
            })
            .await
            .is_ok()
            {}
        };
        tokio::time::timeout(PATIENCE, refused)
            .await
            .unwrap_or_else(|_| {
                panic!("{transport}: clients still got in {PATIENCE:?} after shutdown")
            });
    }
}

#[cfg(unix)]
each_backend!(async a_replacement_binds_while_the_old_server_drains_and_keeps_its_socket);
/// The socket file goes when accepting stops, not after the grace period:
/// a replacement may bind meanwhile, and the old server must not remove the
/// replacement's socket when it is done.
#[cfg(unix)]
async fn a_replacement_binds_while_the_old_server_drains_and_keeps_its_socket(
    transport: TransportKind,
) {
    let endpoint = Endpoint::fresh();
    let Held {
        server: old,
        gate,
        in_flight,
    } = holding(&endpoint, transport, "draining").await;
    let shutdown = tokio::spawn(old.shutdown(PATIENCE));
    support::eventually("the old server to let go of the socket", PATIENCE, || {
        (!endpoint.path().exists()).then_some(())
    })
    .await;

    // The old server removes its socket file, then lets go of the
    // endpoint's lock: between the two it still holds the endpoint. Its
    // task is held, so every attempt here is made while it drains.
    let started = std::time::Instant::now();
    let replacement = loop {
        let bound = IpcServer::bind(
            config(&endpoint, transport),
            |task: DetectionTask| async move { ok(&task) },
        )
        .await;
        match bound {
            Ok(server) => break server,
            Err(IpcError::EndpointInUse { .. }) if started.elapsed() < PATIENCE => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(error) => {
                panic!("{transport}: the endpoint is free while the old server drains: {error}")
            }
        }
    };
    gate.released.notify_one();
    let answer = in_flight.await.unwrap().unwrap();
    assert_eq!(
        answer.task_id, "draining",
        "{transport}: the old server answers its task"
    );
    assert!(shutdown.await.unwrap().drained, "{transport}");

    assert!(
        endpoint.path().exists(),
        "{transport}: the old server left the replacement's socket alone"
    );
    let fresh = IpcClient::new(config(&endpoint, transport)).unwrap();
    assert_eq!(fresh.send(task("after")).await.unwrap().task_id, "after");
    assert_eq!(replacement.stats().accepted, 1, "{transport}");
}

each_backend!(async a_shutdown_whose_grace_expires_cuts_the_connection_and_the_client_hears_of_it);
async fn a_shutdown_whose_grace_expires_cuts_the_connection_and_the_client_hears_of_it(
    transport: TransportKind,
) {
    let endpoint = Endpoint::fresh();
    let Held {
        server,
        in_flight: stuck,
        ..
    } = holding(&endpoint, transport, "never").await;
    let report = server.shutdown(Duration::from_millis(100)).await;
    assert!(!report.drained);
    match stuck.await.unwrap() {
        Err(IpcError::ConnectionLost { task_id, .. }) => assert_eq!(task_id, "never"),
        other => panic!("expected ConnectionLost, got {other:?}"),
    }
}

each_backend!(async dropping_the_server_removes_the_socket_and_frees_the_endpoint);
async fn dropping_the_server_removes_the_socket_and_frees_the_endpoint(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let server = IpcServer::bind(
        config(&endpoint, transport),
        |task: DetectionTask| async move { ok(&task) },
    )
    .await
    .unwrap();
    drop(server);
    #[cfg(unix)]
    assert!(
        !endpoint.path().exists(),
        "{transport}: socket removed on drop"
    );
    // The name is free again (on Windows, once the accept task has let
    // go of its pipe instance).
    let mut again = None;
    for _ in 0..200 {
        match IpcServer::bind(
            config(&endpoint, transport),
            |task: DetectionTask| async move { ok(&task) },
        )
        .await
        {
            Ok(server) => {
                again = Some(server);
                break;
            }
            Err(IpcError::EndpointInUse { .. }) => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(other) => panic!("{transport}: {other}"),
        }
    }
    assert!(
        again.is_some(),
        "{transport}: the endpoint stayed busy after the server was dropped"
    );
}

each_backend!(async stats_count_connections_frames_and_bytes_and_name_the_transport);
async fn stats_count_connections_frames_and_bytes_and_name_the_transport(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let server = IpcServer::bind(
        config(&endpoint, transport),
        |task: DetectionTask| async move { ok(&task) },
    )
    .await
    .unwrap();
    let client = IpcClient::new(config(&endpoint, transport)).unwrap();
    for i in 0..3 {
        client.send(task(&format!("t{i}"))).await.unwrap();
    }
    // The client can read a result before the server has counted it.
    let stats = support::eventually("three results counted", PATIENCE, || {
        Some(server.stats()).filter(|stats| stats.frames_out == 3)
    })
    .await;
    assert_eq!(stats.transport, transport.name());
    assert_eq!(stats.accepted, 1);
    assert_eq!(stats.active, 1);
    assert_eq!(stats.frames_in, 3);
    // Each task "tN" is 4 bytes of protobuf plus the 8-byte header.
    assert_eq!(stats.bytes_in, 3 * 12);
    // Each result adds success=true (2 bytes).
    assert_eq!(stats.bytes_out, 3 * 14);
    drop(client);
    support::eventually("the connection to be released", PATIENCE, || {
        (server.stats().active == 0).then_some(())
    })
    .await;
}

each_backend!(async a_handler_that_blocks_its_first_poll_stops_the_server_polling_handlers_inline);
/// A handler is first polled where its task was read (on the connection's
/// own task, or its thread on `legacy`), until handlers have blocked there
/// for more than 2 ms three times: from then on each runs as a task of its
/// own. Which task a handler's synchronous part runs on shows it. Only
/// blocking handlers come before the last task, so that a first poll slow
/// for another reason (under emulation, any may be) cannot count early.
async fn a_handler_that_blocks_its_first_poll_stops_the_server_polling_handlers_inline(
    transport: TransportKind,
) {
    let endpoint = Endpoint::fresh();
    let _server = IpcServer::bind(config(&endpoint, transport), |task: DetectionTask| {
        // Runs in the first poll: before the handler's first await.
        let polled_on = format!("{:?}", tokio::task::try_id());
        if task.task_id.starts_with("blocks") {
            std::thread::sleep(Duration::from_millis(20));
        }
        async move {
            DetectionResult {
                task_id: task.task_id,
                error_message: Some(polled_on),
                ..Default::default()
            }
        }
    })
    .await
    .unwrap();
    let client = IpcClient::new(config(&endpoint, transport)).unwrap();
    let mut polled_on = Vec::new();
    for id in ["blocks-1", "blocks-2", "blocks-3", "after"] {
        let result = client.send(task(id)).await.unwrap();
        polled_on.push(result.error_message.unwrap());
    }
    assert!(
        polled_on[..3].iter().all(|on| *on == polled_on[0]),
        "inline, blocking twice included: all on the connection's own task (or thread): \
         {polled_on:?}"
    );
    assert_ne!(
        polled_on[2], polled_on[3],
        "after a third blocking first poll, a task of its own"
    );
}

each_backend!(async a_shutdown_returns_within_a_second_of_cutting_a_connection_that_cannot_stop);
/// A handler that blocks its connection (on `legacy`, its thread; on the
/// others, a runtime worker) cannot be cancelled: a shutdown cuts the
/// connection at the end of the grace period and returns within a second
/// more, rather than waiting for it.
async fn a_shutdown_returns_within_a_second_of_cutting_a_connection_that_cannot_stop(
    transport: TransportKind,
) {
    const BLOCKED: Duration = Duration::from_secs(4);
    const GRACE: Duration = Duration::from_millis(100);
    let endpoint = Endpoint::fresh();
    let blocking = Arc::new(Notify::new());
    let told = blocking.clone();
    let server = IpcServer::bind(config(&endpoint, transport), move |task: DetectionTask| {
        // Blocks in the first poll, where no cancellation reaches it.
        told.notify_one();
        std::thread::sleep(BLOCKED);
        async move { ok(&task) }
    })
    .await
    .unwrap();
    let client = IpcClient::new(config(&endpoint, transport)).unwrap();
    let _stuck = send_in_background(&client, task("stuck"));
    blocking.notified().await;
    let started = std::time::Instant::now();
    let report = server.shutdown(GRACE).await;
    let took = started.elapsed();
    assert!(!report.drained);
    assert!(
        took < GRACE + Duration::from_secs(2),
        "shutdown took {took:?}, the handler blocks for {BLOCKED:?}"
    );
}
