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
use support::{Endpoint, PATIENCE, transports};
use tokio::sync::{Notify, Semaphore, oneshot};

fn config(endpoint: &Endpoint, transport: TransportKind) -> IpcConfig {
    IpcConfig {
        transport,
        endpoint_path: endpoint.name.clone(),
        ..IpcConfig::default()
    }
}

fn ok(task: &DetectionTask) -> DetectionResult {
    DetectionResult {
        task_id: task.task_id.clone(),
        success: true,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_come_back_as_they_complete_not_in_request_order() {
    for transport in transports() {
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
        assert!(
            !slow.is_finished(),
            "{transport}: the slow task is still held"
        );
        gate.released.notify_one();
        assert_eq!(slow.await.unwrap().unwrap().task_id, "slow");
        assert_eq!(
            server.stats().accepted,
            1,
            "{transport}: one connection carried both"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_answered_with_an_error_and_the_connection_lives_on() {
    let endpoint = Endpoint::fresh();
    let server = IpcServer::bind(
        config(&endpoint, transports()[0]),
        |task: DetectionTask| async move {
            assert_ne!(task.task_id, "boom", "handler bug triggered on purpose");
            ok(&task)
        },
    )
    .await
    .unwrap();
    let client = IpcClient::new(config(&endpoint, transports()[0])).unwrap();

    let answer = client.send(task("boom")).await.unwrap();
    assert_eq!(answer.task_id, "boom");
    assert!(!answer.success);
    assert!(answer.error_message.unwrap().contains("handler failed"));
    assert!(client.send(task("fine")).await.unwrap().success);
    let stats = server.stats();
    assert_eq!(stats.handler_errors, 1);
    assert_eq!(stats.accepted, 1, "the same connection served both");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_too_large_for_a_frame_is_answered_with_its_size_and_the_limit() {
    let endpoint = Endpoint::fresh();
    let limited = IpcConfig {
        max_frame_bytes: 4096,
        ..config(&endpoint, transports()[0])
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_result_goes_out_with_each_tasks_own_id() {
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
    let _server = IpcServer::bind(
        config(&endpoint, transports()[0]),
        move |task: DetectionTask| {
            let reply = if task.task_id == "stale" {
                stale.clone()
            } else {
                shared.clone()
            };
            async move { reply }
        },
    )
    .await
    .unwrap();
    let client = IpcClient::new(config(&endpoint, transports()[0])).unwrap();
    for id in ["a", "b", "stale"] {
        let result = client.send(task(id)).await.unwrap();
        assert_eq!(result.task_id, id);
        assert!(result.success);
        assert_eq!(result.processes.len(), 1);
        assert_eq!(result.processes[0].name, "shared");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_ids_must_be_non_empty_and_unique_while_in_flight() {
    let endpoint = Endpoint::fresh();
    let gate = Gate::default();
    let _server = IpcServer::bind(config(&endpoint, transports()[0]), gate.handler())
        .await
        .unwrap();
    let client = IpcClient::new(config(&endpoint, transports()[0])).unwrap();

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_answers_with_the_task_id_whatever_the_handler_says() {
    let endpoint = Endpoint::fresh();
    let _server = IpcServer::bind(
        config(&endpoint, transports()[0]),
        |_task: DetectionTask| async {
            DetectionResult {
                task_id: "something else".into(),
                success: true,
                ..Default::default()
            }
        },
    )
    .await
    .unwrap();
    let client = IpcClient::new(config(&endpoint, transports()[0])).unwrap();
    assert_eq!(client.send(task("mine")).await.unwrap().task_id, "mine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_on_a_slow_handler_is_not_cut_as_idle() {
    let endpoint = Endpoint::fresh();
    let short = IpcConfig {
        read_timeout_ms: 300,
        ..config(&endpoint, transports()[0])
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_within_the_read_timeout_is_a_response_timeout() {
    let endpoint = Endpoint::fresh();
    let gate = Gate::default();
    let _server = IpcServer::bind(config(&endpoint, transports()[0]), gate.handler())
        .await
        .unwrap();
    let impatient = IpcConfig {
        read_timeout_ms: 200,
        ..config(&endpoint, transports()[0])
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

/// The server stops reading a connection with its limit of tasks in flight.
/// A client that went on writing would stall on that backpressure and, past
/// its write deadline, take the connection for dead; the client keeps to the
/// limit instead, and the tasks beyond it wait their turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_beyond_the_in_flight_limit_wait_their_turn_without_stalling_the_connection() {
    const LIMIT: usize = 4;
    let endpoint = Endpoint::fresh();
    let open = Arc::new(Semaphore::new(0));
    let server = IpcServer::builder(config(&endpoint, transports()[0]))
        .max_in_flight_per_connection(LIMIT)
        .bind(wait_for(&open))
        .await
        .unwrap();
    let write_timeout_ms = 200;
    let client = IpcClient::builder(IpcConfig {
        write_timeout_ms,
        ..config(&endpoint, transports()[0])
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
    support::eventually("the server to hold its limit of tasks", PATIENCE, || {
        (server.stats().frames_in == LIMIT as u64).then_some(())
    })
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

/// With every in-flight slot held by a stuck task, a further send gives up
/// within its deadline without sending. Once the stuck task is past its
/// deadline, the connection holding it is replaced: the next send is
/// answered at once on a fresh connection, although the server still holds
/// the stuck task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_waits_for_an_in_flight_slot_no_longer_than_the_read_timeout() {
    let endpoint = Endpoint::fresh();
    let gate = Gate::default();
    let server = IpcServer::bind(config(&endpoint, transports()[0]), gate.handler())
        .await
        .unwrap();
    let client = IpcClient::builder(IpcConfig {
        read_timeout_ms: 300,
        ..config(&endpoint, transports()[0])
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

/// A caller that gives up leaves its id reserved until the server's late
/// answer has come and been discarded: that answer can never be delivered to
/// a later task reusing the id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_result_is_never_taken_for_the_answer_to_a_retry() {
    let endpoint = Endpoint::fresh();
    let gate = Gate::default();
    let server = IpcServer::bind(config(&endpoint, transports()[0]), gate.handler())
        .await
        .unwrap();
    let client = IpcClient::new(config(&endpoint, transports()[0])).unwrap();
    let gave_up = tokio::time::timeout(Duration::from_millis(100), async {
        let held_task = client.send(held("reused"));
        tokio::pin!(held_task);
        tokio::select! {
            _ = &mut held_task => panic!("the held task cannot finish"),
            _ = gate.held.notified() => {}
        }
        held_task.await
    })
    .await;
    assert!(
        gave_up.is_err(),
        "the caller gave up while the handler held the task"
    );

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
    assert_eq!(server.stats().accepted, 1, "all on one connection");
    // The late answer and the retry's own (counted just after they are written).
    support::eventually("two results written", PATIENCE, || {
        (server.stats().frames_out == 2).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_given_up_on_mid_write_leaves_the_connection_intact() {
    let endpoint = Endpoint::fresh();
    let server = IpcServer::bind(
        config(&endpoint, transports()[0]),
        |task: DetectionTask| async move { ok(&task) },
    )
    .await
    .unwrap();
    let client = IpcClient::new(config(&endpoint, transports()[0])).unwrap();
    client.send(task("warm-up")).await.unwrap();
    let big = DetectionTask {
        metadata: Some("x".repeat(512 * 1024)),
        ..task("big")
    };
    for attempt in 0..20 {
        // Dropped at once or part-way: either way the frame is written whole.
        let _ = tokio::time::timeout(
            Duration::from_micros(attempt * 50),
            client.send(DetectionTask {
                task_id: format!("big-{attempt}"),
                ..big.clone()
            }),
        )
        .await;
    }
    assert!(client.send(task("after")).await.unwrap().success);
    let stats = server.stats();
    assert_eq!(stats.accepted, 1, "the connection survived");
    assert_eq!(
        stats.malformed_frames + stats.read_timeouts + stats.crc_errors,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_without_a_server_all_fail_within_the_connect_deadline() {
    let endpoint = Endpoint::fresh();
    let quick = IpcConfig {
        accept_timeout_ms: 300,
        ..config(&endpoint, transports()[0])
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
    // One connect deadline for everyone, not one after another.
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_replaced_before_the_server_would_close_it() {
    let endpoint = Endpoint::fresh();
    let short = IpcConfig {
        read_timeout_ms: 400,
        ..config(&endpoint, transports()[0])
    };
    let server = IpcServer::bind(
        short.clone(),
        |task: DetectionTask| async move { ok(&task) },
    )
    .await
    .unwrap();
    let client = IpcClient::new(short).unwrap();
    client.send(task("first")).await.unwrap();
    // Idle past half the read timeout: the next send must not cross the
    // server's idle close, so the client opens a fresh connection.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(client.send(task("second")).await.unwrap().success);
    assert_eq!(server.stats().accepted, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_retries_until_the_server_appears_or_the_deadline_passes() {
    let endpoint = Endpoint::fresh();
    let quick = IpcConfig {
        accept_timeout_ms: 200,
        ..config(&endpoint, transports()[0])
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
    let client = IpcClient::new(config(&endpoint, transports()[0])).unwrap();
    let early = tokio::spawn(async move { client.send(task("early")).await });
    let (bound_tx, bound_rx) = oneshot::channel();
    let server_config = config(&endpoint, transports()[0]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_tasks_in_flight_then_removes_the_socket() {
    for transport in transports() {
        let endpoint = Endpoint::fresh();
        let gate = Gate::default();
        let server = IpcServer::bind(config(&endpoint, transport), gate.handler())
            .await
            .unwrap();
        let client = IpcClient::new(config(&endpoint, transport)).unwrap();
        let in_flight = send_in_background(&client, held("finishing"));
        gate.held.notified().await;
        let shutdown = tokio::spawn(server.shutdown(PATIENCE));
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
        // Nothing listens after shutdown. On Unix the socket file is gone at
        // once. A Windows pipe instance that was waiting for a client is
        // closed through the I/O completion port, a moment after its owner
        // dropped it, so there the refusal is awaited (with a deadline).
        let refused_in_time = async {
            loop {
                let attempt = IpcClient::connect(IpcConfig {
                    accept_timeout_ms: 50,
                    ..config(&endpoint, transport)
                })
                .await;
                if attempt.is_err() {
                    return;
                }
                if cfg!(unix) {
                    panic!("{transport}: a client got in after shutdown");
                }
            }
        };
        tokio::time::timeout(PATIENCE, refused_in_time)
            .await
            .unwrap_or_else(|_| {
                panic!("{transport}: clients still got in {PATIENCE:?} after shutdown")
            });
    }
}

/// The socket file goes when accepting stops, not after the grace period:
/// a replacement may bind meanwhile, and the old server must not remove the
/// replacement's socket when it is done.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_binds_while_the_old_server_drains_and_keeps_its_socket() {
    for transport in transports() {
        let endpoint = Endpoint::fresh();
        let gate = Gate::default();
        let old = IpcServer::bind(config(&endpoint, transport), gate.handler())
            .await
            .unwrap();
        let client = IpcClient::new(config(&endpoint, transport)).unwrap();
        let in_flight = send_in_background(&client, held("draining"));
        gate.held.notified().await;
        let shutdown = tokio::spawn(old.shutdown(PATIENCE));
        support::eventually("the old server to let go of the socket", PATIENCE, || {
            (!endpoint.path().exists()).then_some(())
        })
        .await;

        let replacement = IpcServer::bind(
            config(&endpoint, transport),
            |task: DetectionTask| async move { ok(&task) },
        )
        .await
        .unwrap_or_else(|error| {
            panic!("{transport}: the endpoint is free while the old server drains: {error}")
        });
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_whose_grace_expires_cuts_the_connection_and_the_client_hears_of_it() {
    let endpoint = Endpoint::fresh();
    let gate = Gate::default();
    let server = IpcServer::bind(config(&endpoint, transports()[0]), gate.handler())
        .await
        .unwrap();
    let client = IpcClient::new(config(&endpoint, transports()[0])).unwrap();
    let stuck = send_in_background(&client, held("never"));
    gate.held.notified().await;
    let report = server.shutdown(Duration::from_millis(100)).await;
    assert!(!report.drained);
    match stuck.await.unwrap() {
        Err(IpcError::ConnectionLost { task_id, .. }) => assert_eq!(task_id, "never"),
        other => panic!("expected ConnectionLost, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_server_removes_the_socket_and_frees_the_endpoint() {
    for transport in transports() {
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_connections_frames_and_bytes_and_name_the_transport() {
    for transport in transports() {
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
}
