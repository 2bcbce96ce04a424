//! Rollback, proven on real processes: every client backend talks to every
//! server backend with both checksums and every size of task and result,
//! and one client rides through server restarts that switch the backend
//! with the operator's switch, `DAEMONEYE_IPC_TRANSPORT`.

mod support;

use daemoneye_ipc::{Crc32Variant, DetectionResult, IpcClient, IpcConfig, TransportKind};
use prost::Message;
use support::sized_server::{SizedServer, describe, processes, sized_task};
use support::*;

/// Sizes of task payloads and of results: empty, small, and about 900 KiB
/// (frames up to the default `max_frame_bytes` of 1 MiB).
const SIZES: [usize; 3] = [0, 100, 900 * 1024];

#[test]
#[ignore = "the server process of the matrix tests, which start it themselves"]
fn sized_server_process() {
    support::sized_server::serve_from_env();
}

each_backend!(every_client_backend_talks_to_this_server_backend);
/// The 3 x 3 matrix, one server backend per test: every client backend, both
/// CRC variants, every pair of task and result sizes, all in flight at once
/// on one connection (twice over: plain results, then views). Each answer is checked to be the one for
/// its task, of the size asked, with the task's payload seen intact.
fn every_client_backend_talks_to_this_server_backend(server_transport: TransportKind) {
    for crc32 in Crc32Variant::ALL {
        let endpoint = Endpoint::fresh();
        let _server = SizedServer::start(server_transport, crc32, 10_000, &endpoint.name);
        for client_transport in transports() {
            let client = IpcClient::new(IpcConfig {
                transport: client_transport,
                crc32_variant: crc32,
                endpoint_path: endpoint.name.clone(),
                ..IpcConfig::default()
            })
            .unwrap();
            let case = format!("{client_transport} client, {server_transport} server, {crc32}");
            block_on(async {
                let mut sends = tokio::task::JoinSet::new();
                for round in 0..2 {
                    for task_size in SIZES {
                        for result_size in SIZES {
                            let client = client.clone();
                            let id = format!("{round}-{task_size}-{result_size}");
                            let payload: String = (0..task_size)
                                .map(|i| char::from(b'a' + (i % 26) as u8))
                                .collect();
                            sends.spawn(async move {
                                let task = sized_task(&id, payload.clone(), result_size);
                                // The second round reads its results as views,
                                // which must carry the same fields.
                                let result = if round == 0 {
                                    client.send(task).await
                                } else {
                                    client.send_view(task).await.map(|view| {
                                        DetectionResult::decode(view.encode_to_vec().as_slice())
                                            .unwrap()
                                    })
                                };
                                (id, payload, result_size, result)
                            });
                        }
                    }
                }
                let mut answered = 0;
                while let Some(joined) = sends.join_next().await {
                    let (id, payload, result_size, result) = joined.unwrap();
                    let result =
                        result.unwrap_or_else(|error| panic!("{case}, task {id}: {error}"));
                    assert_eq!(result.task_id, id, "{case}");
                    assert!(result.success, "{case}, task {id}");
                    assert_eq!(
                        result.error_message.as_deref(),
                        Some(describe(&payload).as_str()),
                        "{case}, task {id}: the task arrived whole"
                    );
                    assert_eq!(
                        result.processes,
                        processes(&id, result_size),
                        "{case}, task {id}: the result of the size asked"
                    );
                    answered += 1;
                }
                assert_eq!(answered, 2 * SIZES.len() * SIZES.len(), "{case}");
            });
        }
    }
}

/// What became of each task the rollback client sent, by task id.
#[cfg(unix)]
#[derive(Default)]
struct Ledger {
    /// Task ids in the order they were sent, with the restart they were
    /// sent after (0: before any).
    sent: Vec<(String, usize)>,
    /// Outcomes by task id: the answer's id, or the error's text.
    outcomes: std::collections::HashMap<String, Vec<Result<String, String>>>,
}

#[cfg(unix)]
each_backend!(a_client_rides_through_restarts_that_switch_the_server_backend);
/// Hot rollback: a client keeps sending (four tasks in flight) while the
/// server is stopped with SIGTERM and started again with
/// `DAEMONEYE_IPC_TRANSPORT=legacy`, then `interprocess`, then `tokio`. The
/// same client reconnects by itself; every task gets exactly one outcome
/// (its own answer, or a lost connection the caller can retry), and tasks
/// sent after each restart are answered by the new server.
#[cfg(unix)]
fn a_client_rides_through_restarts_that_switch_the_server_backend(client_transport: TransportKind) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    let endpoint = Endpoint::fresh();
    let restarts: Vec<TransportKind> = ["legacy", "interprocess", "tokio"]
        .into_iter()
        .filter_map(|name| name.parse::<TransportKind>().ok())
        .filter(|kind| kind.is_compiled())
        .collect();
    let mut server = ServerProcess::start_with_env(&endpoint.name, &[], &[]);
    let client = IpcClient::new(IpcConfig {
        transport: client_transport,
        endpoint_path: endpoint.name.clone(),
        // Long enough to ride through a restart.
        accept_timeout_ms: 20_000,
        ..IpcConfig::default()
    })
    .unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let epoch = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));

    let runtime = runtime();
    let senders: Vec<_> = (0..4)
        .map(|sender| {
            let (client, ledger, epoch, stop) =
                (client.clone(), ledger.clone(), epoch.clone(), stop.clone());
            runtime.spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Acquire) {
                    n += 1;
                    let id = format!("s{sender}-{n}");
                    let sent_after = epoch.load(Ordering::Acquire);
                    ledger.lock().unwrap().sent.push((id.clone(), sent_after));
                    let outcome = match client.send(quick_task(&id)).await {
                        Ok(result) => Ok(result.task_id),
                        Err(error) => Err(error.to_string()),
                    };
                    let mut ledger = ledger.lock().unwrap();
                    ledger.outcomes.entry(id).or_default().push(outcome);
                }
            })
        })
        .collect();

    // Tasks sent after `restart` (and so served by that server) answered.
    let answered_since = |restart: usize| {
        let ledger = ledger.lock().unwrap();
        ledger
            .sent
            .iter()
            .filter(|(id, sent_after)| {
                *sent_after == restart
                    && ledger
                        .outcomes
                        .get(id)
                        .is_some_and(|outcomes| matches!(outcomes[..], [Ok(_)]))
            })
            .count()
    };
    wait_until("answers from the first server", PATIENCE, || {
        (answered_since(0) >= 20).then_some(())
    });
    // What each server read and wrote, by its own counters at exit.
    let (mut frames_in, mut frames_out) = (0, 0);
    for (restart, transport) in restarts.iter().enumerate() {
        assert_eq!(server.terminate().code(), Some(0), "{}", server.logs());
        let counters = server.counters_at_exit();
        frames_in += counters["frames_in"];
        frames_out += counters["frames_out"];
        epoch.store(restart + 1, Ordering::Release);
        server = ServerProcess::start_with_env(
            &endpoint.name,
            &[("DAEMONEYE_IPC_TRANSPORT", transport.name())],
            &[],
        );
        assert!(
            server.logs().contains(&format!("transport={transport}")),
            "the restarted server says which backend it runs: {}",
            server.logs()
        );
        wait_until(
            &format!("answers from the {transport} server"),
            PATIENCE,
            || (answered_since(restart + 1) >= 20).then_some(()),
        );
    }
    stop.store(true, Ordering::Release);
    runtime.block_on(async {
        for sender in senders {
            sender.await.unwrap();
        }
    });
    assert_eq!(server.terminate().code(), Some(0), "{}", server.logs());
    let counters = server.counters_at_exit();
    frames_in += counters["frames_in"];
    frames_out += counters["frames_out"];

    let ledger = ledger.lock().unwrap();
    let mut lost = Vec::new();
    let mut lost_at = std::collections::HashMap::new();
    for (id, sent_after) in &ledger.sent {
        let outcomes = &ledger.outcomes[id];
        assert_eq!(
            outcomes.len(),
            1,
            "task {id}: exactly one outcome, got {outcomes:?}"
        );
        match &outcomes[0] {
            Ok(answered) => assert_eq!(answered, id, "an answer for the wrong task"),
            Err(error) => {
                assert!(
                    error.contains("lost while task") && error.contains("The next send reconnects"),
                    "task {id}: an error the caller can retry, got {error}"
                );
                lost.push(format!("{id} (sent after restart {sent_after}): {error}"));
                // Lost at the restart that followed its send: one sender has
                // one task in flight at a time, so one at most per restart.
                let sender = id.split('-').next().unwrap().to_owned();
                *lost_at.entry((sender, *sent_after)).or_insert(0) += 1;
                assert!(
                    *sent_after < restarts.len(),
                    "task {id} lost after the last restart: {error}"
                );
            }
        }
    }
    assert!(
        lost_at.values().all(|&count| count == 1),
        "more than one task of a sender lost at one restart:\n{}",
        lost.join("\n")
    );
    // The servers' own account agrees: every answer was written by one of
    // them, and no task was read twice (the ids are all different).
    let answered = (ledger.sent.len() - lost.len()) as u64;
    assert!(
        frames_out >= answered && frames_in >= frames_out,
        "the servers read {frames_in} and wrote {frames_out} for {answered} answers"
    );
    assert!(
        frames_in <= answered + lost.len() as u64,
        "the servers read {frames_in} tasks, but only {answered} were answered and {} lost",
        lost.len()
    );
}
