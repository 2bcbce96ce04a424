//! DaemonEye's own IPC interface (`daemoneye_ipc::upstream`, feature
//! `upstream-compat`), on every backend, used only through its facade:
//! what DaemonEye's integration tests exercise (round trips, handler
//! errors, oversize frames, a checksum mismatch, many clients, the
//! connection limit, shutdown, timeouts), the new schema's fields relayed
//! byte for byte, and the real collector answering task types it cannot
//! serve.

mod support;

use std::sync::Arc;
use std::time::Duration;

use daemoneye_ipc::TransportKind;
use daemoneye_ipc::upstream::ipc::codec::IpcError;
use daemoneye_ipc::upstream::ipc::interprocess_transport::{
    InterprocessClient, InterprocessServer,
};
use daemoneye_ipc::upstream::ipc::{IpcConfig, PanicStrategy, TransportType};
use daemoneye_ipc::upstream::proto::{
    DetectionResult, DetectionTask, FilesystemFilter, FilesystemRecord, NetworkFilter,
    NetworkRecord, PerformanceFilter, PerformanceRecord, ProcessFilter, ProcessRecord, TaskType,
};
use support::{Endpoint, PATIENCE};
use tokio::sync::Semaphore;

fn transport_type(kind: TransportKind) -> TransportType {
    match kind {
        TransportKind::Interprocess => TransportType::Interprocess,
        TransportKind::Tokio => TransportType::Tokio,
        TransportKind::Legacy => TransportType::Legacy,
    }
}

/// DaemonEye's configuration as its tests write it: a struct literal of
/// its eight fields.
fn config(endpoint: &Endpoint, transport: TransportKind) -> IpcConfig {
    IpcConfig {
        transport: transport_type(transport),
        endpoint_path: endpoint.name.clone(),
        max_frame_bytes: 1024 * 1024,
        accept_timeout_ms: 2000,
        read_timeout_ms: 5000,
        write_timeout_ms: 5000,
        max_connections: 16,
        panic_strategy: PanicStrategy::Unwind,
    }
}

fn task(id: &str) -> DetectionTask {
    DetectionTask::new_enumerate_processes(id, None)
}

/// A server answering each task with its id and metadata, started.
async fn echo_server(config: &IpcConfig) -> InterprocessServer {
    let mut server = InterprocessServer::new(config.clone());
    server.set_handler(|task: DetectionTask| async move {
        Ok(DetectionResult {
            error_message: None,
            ..DetectionResult::success(
                task.task_id,
                vec![ProcessRecord {
                    name: task.metadata.unwrap_or_default(),
                    ..Default::default()
                }],
            )
        })
    });
    server.start().await.unwrap();
    server
}

each_backend!(async a_task_goes_round_trip_on_one_kept_connection);
async fn a_task_goes_round_trip_on_one_kept_connection(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let config = config(&endpoint, transport);
    let mut server = echo_server(&config).await;
    let mut client = InterprocessClient::new(config);
    for n in 0..3 {
        let id = format!("round-{n}");
        let result = client
            .send_task(DetectionTask::new_test_task(
                &id,
                TaskType::EnumerateProcesses,
                Some(format!("meta-{n}")),
            ))
            .await
            .unwrap();
        assert_eq!(result.task_id, id);
        assert!(result.success);
        assert!(result.error_message.is_none());
        assert_eq!(result.processes[0].name, format!("meta-{n}"));
    }
    server.graceful_shutdown().await.unwrap();
}

each_backend!(async a_handler_error_is_answered_with_its_text_and_the_connection_lives_on);
async fn a_handler_error_is_answered_with_its_text_and_the_connection_lives_on(
    transport: TransportKind,
) {
    let endpoint = Endpoint::fresh();
    let config = config(&endpoint, transport);
    let mut server = InterprocessServer::new(config.clone());
    server.set_handler(|task: DetectionTask| async move {
        if task.task_id == "fails" {
            Err(IpcError::Encode("Test error".into()))
        } else {
            Ok(DetectionResult::success(task.task_id, vec![]))
        }
    });
    server.start().await.unwrap();
    let mut client = InterprocessClient::new(config);
    let failed = client.send_task(task("fails")).await.unwrap();
    assert_eq!(failed.task_id, "fails");
    assert!(!failed.success);
    assert_eq!(
        failed.error_message.as_deref(),
        Some("Protobuf encode error: Test error")
    );
    assert!(client.send_task(task("after")).await.unwrap().success);
    server.graceful_shutdown().await.unwrap();
}

each_backend!(async a_server_without_a_handler_does_not_start);
async fn a_server_without_a_handler_does_not_start(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let mut server = InterprocessServer::new(config(&endpoint, transport));
    let error = server.start().await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "Protobuf encode error: No message handler set"
    );
    #[cfg(unix)]
    assert!(!endpoint.path().exists(), "nothing bound");
}

each_backend!(async an_oversize_task_is_refused_before_sending_and_the_client_goes_on);
async fn an_oversize_task_is_refused_before_sending_and_the_client_goes_on(
    transport: TransportKind,
) {
    let endpoint = Endpoint::fresh();
    let config = IpcConfig {
        max_frame_bytes: 1024,
        ..config(&endpoint, transport)
    };
    let mut server = echo_server(&config).await;
    let mut client = InterprocessClient::new(config);
    let large = DetectionTask::new_test_task(
        "large",
        TaskType::EnumerateProcesses,
        Some("x".repeat(2048)),
    );
    match client.send_task(large).await {
        Err(IpcError::TooLarge { size, max_size }) => {
            assert!(size > 2048, "{size}");
            assert_eq!(max_size, 1024);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(client.send_task(task("normal")).await.unwrap().success);
    server.graceful_shutdown().await.unwrap();
}

each_backend!(async a_result_over_the_limit_is_answered_with_an_error_naming_it);
/// DaemonEye closes the connection on a result it cannot write; here the
/// agent learns why, and the connection carries on.
async fn a_result_over_the_limit_is_answered_with_an_error_naming_it(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let config = IpcConfig {
        max_frame_bytes: 1024,
        ..config(&endpoint, transport)
    };
    let mut server = InterprocessServer::new(config.clone());
    server.set_handler(|task: DetectionTask| async move {
        let records = vec![
            ProcessRecord {
                name: "y".repeat(100),
                ..Default::default()
            };
            40
        ];
        Ok(DetectionResult::success(task.task_id, records))
    });
    server.start().await.unwrap();
    let mut client = InterprocessClient::new(config);
    let result = client.send_task(task("big")).await.unwrap();
    assert!(!result.success);
    let message = result.error_message.unwrap();
    assert!(message.contains("max_frame_bytes"), "{message}");
    assert!(!client.send_task(task("again")).await.unwrap().success);
    server.graceful_shutdown().await.unwrap();
}

each_backend!(async a_frame_with_a_bad_crc32c_closes_only_its_connection);
async fn a_frame_with_a_bad_crc32c_closes_only_its_connection(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let config = config(&endpoint, transport);
    let mut server = echo_server(&config).await;
    let mut bystander = InterprocessClient::new(config.clone());
    assert!(bystander.send_task(task("before")).await.unwrap().success);

    let body = prost::Message::encode_to_vec(&task("corrupt"));
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&(crc32c::crc32c(&body) ^ 1).to_le_bytes());
    frame.extend_from_slice(&body);
    let mut raw = support::RawClient::connect(&endpoint.name).await;
    raw.write(&frame).await.unwrap();
    raw.closed_within(PATIENCE).await;

    assert!(bystander.send_task(task("after")).await.unwrap().success);
    server.graceful_shutdown().await.unwrap();
}

each_backend!(async many_concurrent_clients_each_get_their_own_answers);
async fn many_concurrent_clients_each_get_their_own_answers(transport: TransportKind) {
    const CLIENTS: usize = 12;
    const TASKS: usize = 10;
    let endpoint = Endpoint::fresh();
    let config = config(&endpoint, transport);
    let mut server = echo_server(&config).await;
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let config = config.clone();
        clients.push(tokio::spawn(async move {
            let mut client = InterprocessClient::new(config);
            for t in 0..TASKS {
                let id = format!("c{c}-t{t}");
                let result = client
                    .send_task(DetectionTask::new_test_task(
                        &id,
                        TaskType::EnumerateProcesses,
                        Some(id.clone()),
                    ))
                    .await
                    .unwrap();
                assert_eq!(result.task_id, id);
                assert_eq!(result.processes[0].name, id, "its own answer");
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    server.graceful_shutdown().await.unwrap();
}

each_backend!(async connections_over_the_limit_are_refused_at_once_and_slots_come_back);
/// DaemonEye refuses a connection over `max_connections` at once rather
/// than queueing it; so does the facade, and the refused client is told
/// why. Once the served clients go, a new one is served.
async fn connections_over_the_limit_are_refused_at_once_and_slots_come_back(
    transport: TransportKind,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let endpoint = Endpoint::fresh();
    let config = IpcConfig {
        max_connections: 2,
        // A client's patience, far beyond the test's: a server that made
        // excess connections wait for a slot would not refuse in time.
        accept_timeout_ms: 600_000,
        ..config(&endpoint, transport)
    };
    let gate = Arc::new(Semaphore::new(0));
    let arrived = Arc::new(AtomicUsize::new(0));
    let mut server = InterprocessServer::new(config.clone());
    let (held, count) = (gate.clone(), arrived.clone());
    server.set_handler(move |task: DetectionTask| {
        let (held, count) = (held.clone(), count.clone());
        async move {
            if task.task_id.starts_with("served") {
                count.fetch_add(1, Ordering::SeqCst);
                held.acquire().await.unwrap().forget();
            }
            Ok(DetectionResult::success(task.task_id, vec![]))
        }
    });
    server.start().await.unwrap();

    let served: Vec<_> = (0..2)
        .map(|n| {
            let config = config.clone();
            tokio::spawn(async move {
                let mut client = InterprocessClient::new(config);
                let result = client.send_task(task(&format!("served-{n}"))).await;
                (client, result)
            })
        })
        .collect();
    support::eventually("both served tasks with the handler", PATIENCE, || {
        (arrived.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await;
    for n in 0..3 {
        let mut refused = InterprocessClient::new(config.clone());
        let error =
            tokio::time::timeout(PATIENCE, refused.send_task(task(&format!("refused-{n}"))))
                .await
                .expect("refused at once, not kept waiting for a slot")
                .unwrap_err();
        let IpcError::Io(io) = &error else {
            panic!("{error:?}")
        };
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused, "{error}");
        assert!(error.to_string().contains("max_connections"), "{error}");
    }
    gate.add_permits(2);
    for client in served {
        let (client, result) = client.await.unwrap();
        assert!(result.unwrap().success);
        drop(client);
    }
    // The slots come back as the served clients' connections close.
    let mut after = InterprocessClient::new(config.clone());
    let started = std::time::Instant::now();
    let result = loop {
        match after.send_task(task("after-the-served")).await {
            Ok(result) => break result,
            Err(IpcError::Io(io)) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                assert!(started.elapsed() < PATIENCE, "no slot came back: {io}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(other) => panic!("{other:?}"),
        }
    };
    assert!(result.success);
    server.graceful_shutdown().await.unwrap();
}

each_backend!(async graceful_shutdown_answers_the_task_in_flight_then_nothing_is_served);
/// DaemonEye's `graceful_shutdown` neither waits for nor answers the tasks
/// in flight; here they are answered, the socket goes at once, and a new
/// client finds no server.
async fn graceful_shutdown_answers_the_task_in_flight_then_nothing_is_served(
    transport: TransportKind,
) {
    let endpoint = Endpoint::fresh();
    let config = IpcConfig {
        accept_timeout_ms: 300,
        ..config(&endpoint, transport)
    };
    let gate = Arc::new(Semaphore::new(0));
    let started = Arc::new(Semaphore::new(0));
    let mut server = InterprocessServer::new(config.clone());
    let (held, begun) = (gate.clone(), started.clone());
    server.set_handler(move |task: DetectionTask| {
        let (held, begun) = (held.clone(), begun.clone());
        async move {
            begun.add_permits(1);
            held.acquire().await.unwrap().forget();
            Ok(DetectionResult::success(task.task_id, vec![]))
        }
    });
    server.start().await.unwrap();
    let mut client = InterprocessClient::new(config.clone());
    let in_flight = tokio::spawn(async move { client.send_task(task("in-flight")).await });
    started.acquire().await.unwrap().forget();

    let shutdown = tokio::spawn(async move {
        server.graceful_shutdown().await.unwrap();
        server
    });
    #[cfg(unix)]
    support::eventually("the socket to go as shutdown begins", PATIENCE, || {
        (!endpoint.path().exists()).then_some(())
    })
    .await;
    gate.add_permits(1);
    let answered = in_flight.await.unwrap().unwrap();
    assert_eq!(answered.task_id, "in-flight");
    assert!(answered.success, "the task in flight was answered");
    let _server = shutdown.await.unwrap();

    let mut late = InterprocessClient::new(config);
    assert!(late.send_task(task("late")).await.is_err());
}

each_backend!(async stop_cuts_connections_and_frees_the_endpoint);
async fn stop_cuts_connections_and_frees_the_endpoint(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let config = IpcConfig {
        accept_timeout_ms: 300,
        ..config(&endpoint, transport)
    };
    let started = Arc::new(Semaphore::new(0));
    let mut server = InterprocessServer::new(config.clone());
    let begun = started.clone();
    server.set_handler(move |_task: DetectionTask| {
        begun.add_permits(1);
        std::future::pending()
    });
    server.start().await.unwrap();
    let mut client = InterprocessClient::new(config.clone());
    let in_flight = tokio::spawn(async move { client.send_task(task("cut")).await });
    // The handler holds the task: the connection is up and the task in it.
    started.acquire().await.unwrap().forget();
    server.stop();
    let cut = tokio::time::timeout(PATIENCE, in_flight)
        .await
        .expect("the caller hears of the cut")
        .unwrap();
    assert!(matches!(cut, Err(IpcError::PeerClosed)), "{cut:?}");
    // The endpoint is free again: a new server binds it.
    let mut next = echo_server(&config).await;
    let mut client = InterprocessClient::new(config);
    assert!(client.send_task(task("next")).await.unwrap().success);
    next.graceful_shutdown().await.unwrap();
}

each_backend!(async a_second_server_on_a_live_endpoint_is_refused);
/// DaemonEye deletes whatever is at the path and binds over a live
/// server; the facade refuses, so the running collector keeps its agents.
async fn a_second_server_on_a_live_endpoint_is_refused(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let config = config(&endpoint, transport);
    let mut first = echo_server(&config).await;
    let mut second = InterprocessServer::new(config.clone());
    second.set_handler(|task: DetectionTask| async move {
        Ok(DetectionResult::failure(task.task_id, "the wrong server"))
    });
    let error = second.start().await.unwrap_err();
    let IpcError::Io(io) = &error else {
        panic!("{error:?}")
    };
    assert_eq!(io.kind(), std::io::ErrorKind::AddrInUse, "{error}");
    let mut client = InterprocessClient::new(config);
    assert!(client.send_task(task("still-first")).await.unwrap().success);
    first.graceful_shutdown().await.unwrap();
}

each_backend!(async a_handler_that_never_finishes_is_answered_before_the_client_gives_up);
async fn a_handler_that_never_finishes_is_answered_before_the_client_gives_up(
    transport: TransportKind,
) {
    let endpoint = Endpoint::fresh();
    let config = IpcConfig {
        read_timeout_ms: 1200,
        ..config(&endpoint, transport)
    };
    let mut server = InterprocessServer::new(config.clone());
    server.set_handler(|task: DetectionTask| async move {
        if task.task_id == "stuck" {
            std::future::pending::<()>().await;
        }
        Ok(DetectionResult::success(task.task_id, vec![]))
    });
    server.start().await.unwrap();
    let mut client = InterprocessClient::new(config);
    let stuck = client.send_task(task("stuck")).await.unwrap();
    assert!(!stuck.success);
    let message = stuck.error_message.unwrap();
    assert!(message.contains("task_timeout_ms = 1000"), "{message}");
    assert!(client.send_task(task("quick")).await.unwrap().success);
    server.graceful_shutdown().await.unwrap();
}

each_backend!(async a_client_rides_through_a_collector_restart);
async fn a_client_rides_through_a_collector_restart(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let config = config(&endpoint, transport);
    let mut server = echo_server(&config).await;
    let mut client = InterprocessClient::new(config.clone());
    assert!(client.send_task(task("before")).await.unwrap().success);
    server.graceful_shutdown().await.unwrap();
    let mut server = echo_server(&config).await;
    assert!(client.send_task(task("after")).await.unwrap().success);
    server.graceful_shutdown().await.unwrap();
}

/// A task using the network, filesystem and performance filters.
fn multi_domain_task() -> DetectionTask {
    DetectionTask {
        task_id: "multi".into(),
        task_type: TaskType::CollectPerformanceMetrics.into(),
        process_filter: Some(ProcessFilter {
            process_names: vec!["procmond".into()],
            pids: vec![1, 70_000],
            executable_pattern: Some("/usr/*".into()),
        }),
        hash_check: None,
        metadata: Some("relay".into()),
        network_filter: Some(NetworkFilter {
            protocols: vec!["tcp".into()],
            source_addresses: vec!["10.0.0.0/8".into()],
            destination_addresses: vec!["192.0.2.1:443".into()],
            connection_states: vec!["ESTABLISHED".into()],
        }),
        filesystem_filter: Some(FilesystemFilter {
            path_patterns: vec!["/etc/**".into()],
            operation_types: vec!["write".into()],
            file_extensions: vec!["conf".into()],
        }),
        performance_filter: Some(PerformanceFilter {
            metric_names: vec!["cpu".into()],
            components: vec!["procmond".into()],
            min_thresholds: [("cpu".to_owned(), 0.5), ("rss".to_owned(), 1.0)].into(),
            max_thresholds: [("cpu".to_owned(), 99.5)].into(),
        }),
    }
}

/// What the collector at the end of the relay answers `task` with: every
/// domain's records, built from the task.
fn multi_domain_result(task: &DetectionTask) -> DetectionResult {
    DetectionResult::multi_domain_success(
        task.task_id.clone(),
        vec![ProcessRecord {
            pid: 4242,
            name: "procmond".into(),
            ssdeep_hash: Some("3:abc".into()),
            on_disk_mismatch: true,
            ..Default::default()
        }],
        vec![NetworkRecord {
            connection_id: "c-1".into(),
            protocol: task.network_filter.as_ref().unwrap().protocols[0].clone(),
            pid: Some(4242),
            bytes_sent: 1 << 33,
            collection_time: 1_764_441_600_000,
            ..Default::default()
        }],
        vec![FilesystemRecord {
            operation_id: "op-1".into(),
            path: "/etc/hosts".into(),
            file_size: Some(0),
            ..Default::default()
        }],
        vec![PerformanceRecord {
            metric_id: "m-1".into(),
            metric_name: "cpu".into(),
            value: 37.25,
            unit: "%".into(),
            ..Default::default()
        }],
    )
}

each_backend!(async the_new_fields_are_relayed_byte_for_byte);
/// An agent, a relay that forwards each task to a collector and its result
/// back unchanged, and the collector: every field of the current schema
/// arrives at each hop as it left the one before.
async fn the_new_fields_are_relayed_byte_for_byte(transport: TransportKind) {
    let (far_end, near_end) = (Endpoint::fresh(), Endpoint::fresh());
    let far = config(&far_end, transport);
    let near = config(&near_end, transport);

    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut collector = InterprocessServer::new(far.clone());
    collector.set_handler(move |task: DetectionTask| {
        seen_tx.send(task.clone()).unwrap();
        async move { Ok(multi_domain_result(&task)) }
    });
    collector.start().await.unwrap();

    let onward = Arc::new(tokio::sync::Mutex::new(InterprocessClient::new(far)));
    let mut relay = InterprocessServer::new(near.clone());
    relay.set_handler(move |task: DetectionTask| {
        let onward = onward.clone();
        async move { onward.lock().await.send_task(task).await }
    });
    relay.start().await.unwrap();

    let mut agent = InterprocessClient::new(near);
    let sent = multi_domain_task();
    let result = agent.send_task(sent.clone()).await.unwrap();

    assert_eq!(
        seen_rx.recv().await.unwrap(),
        sent,
        "the task, at the collector"
    );
    let expected = multi_domain_result(&sent);
    assert_eq!(
        prost::Message::encode_to_vec(&result),
        prost::Message::encode_to_vec(&expected),
        "the result, at the agent"
    );
    relay.graceful_shutdown().await.unwrap();
    collector.graceful_shutdown().await.unwrap();
}

each_backend!(the_collector_answers_task_types_it_cannot_serve_with_an_error_naming_them);
/// `daemoneye-ipc serve` (a real process, CRC-32C as DaemonEye speaks)
/// serves processes and hashes; every other task type of the current
/// schema, and one it has never heard of, is answered with an error that
/// says so, on a connection that carries on.
fn the_collector_answers_task_types_it_cannot_serve_with_an_error_naming_them(
    transport: TransportKind,
) {
    let endpoint = Endpoint::fresh();
    let mut server =
        support::ServerProcess::start(&endpoint.name, transport, &["--crc32", "castagnoli"]);
    support::block_on(async {
        let mut client = InterprocessClient::new(config(&endpoint, transport));
        let cases = [
            (TaskType::MonitorProcessTree, "MONITOR_PROCESS_TREE"),
            (TaskType::VerifyExecutable, "VERIFY_EXECUTABLE"),
            (
                TaskType::MonitorNetworkConnections,
                "MONITOR_NETWORK_CONNECTIONS",
            ),
            (TaskType::TrackFileOperations, "TRACK_FILE_OPERATIONS"),
            (
                TaskType::CollectPerformanceMetrics,
                "COLLECT_PERFORMANCE_METRICS",
            ),
        ];
        for (task_type, name) in cases {
            let mut task = multi_domain_task();
            task.task_id = name.to_lowercase();
            task.task_type = task_type.into();
            let result = client.send_task(task).await.unwrap();
            assert!(!result.success, "{name}");
            let message = result.error_message.unwrap();
            assert!(
                message.contains(&format!("task type {name} is not supported")),
                "{message}"
            );
        }
        let mut unknown = task("unknown-type");
        unknown.task_type = 99;
        let result = client.send_task(unknown).await.unwrap();
        assert!(!result.success);
        assert!(
            result
                .error_message
                .unwrap()
                .contains("task type 99 is unknown")
        );
        // The same connection still serves what the collector can do.
        let listed = client
            .send_task(DetectionTask::new_enumerate_processes(
                "listed",
                Some(ProcessFilter {
                    pids: vec![std::process::id()],
                    ..Default::default()
                }),
            ))
            .await
            .unwrap();
        assert!(listed.success, "{:?}", listed.error_message);
    });
    assert_eq!(
        server.counters()["accepted"],
        1,
        "one connection throughout"
    );
}
