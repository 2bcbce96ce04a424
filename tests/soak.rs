//! Memory under sustained load, on a real `serve` process (Linux, which
//! reports a process's resident memory in `/proc`): sixteen clients with
//! sixteen tasks in flight each for a minute.
#![cfg(target_os = "linux")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use daemoneye_ipc::{IpcClient, TransportKind};
use support::*;

const CLIENTS: usize = 16;
const IN_FLIGHT: usize = 16;
const SOAK: Duration = Duration::from_secs(60);
const MIB: f64 = 1024.0 * 1024.0;

each_backend!(memory_settles_under_a_minute_of_load_and_comes_back_after);
/// The server's RSS settles (over the last third of the run it grows by
/// less than 1 MiB) and, once the clients have gone, comes back to within
/// a few MiB of its idle figure. The figures are printed for the README.
fn memory_settles_under_a_minute_of_load_and_comes_back_after(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let mut server = ServerProcess::start(&endpoint.name, transport, &[]);
    let pid = server.pid();
    let runtime = runtime();
    // Idle, once the process has settled from its start (one round trip).
    let warm_up = IpcClient::new(server.client_config(transport)).unwrap();
    runtime
        .block_on(warm_up.send(quick_task("warm-up")))
        .unwrap();
    drop(warm_up);
    wait_until("the warm-up connection to close", PATIENCE, || {
        (server.counters()["active"] == 0).then_some(())
    });
    let idle = rss_bytes(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for client in 0..CLIENTS {
        let ipc = IpcClient::new(server.client_config(transport)).unwrap();
        for sender in 0..IN_FLIGHT {
            let (ipc, stop, answered) = (ipc.clone(), stop.clone(), answered.clone());
            senders.push(runtime.spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    n += 1;
                    let id = format!("c{client}-s{sender}-{n}");
                    let answer = ipc.send(quick_task(&id)).await.unwrap();
                    assert_eq!(answer.task_id, id);
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }

    // Resident memory once a second; the load runs meanwhile.
    let started = Instant::now();
    let mut samples: Vec<(Duration, u64)> = Vec::new();
    let mut ticks = runtime.block_on(async { tokio::time::interval(Duration::from_secs(1)) });
    while started.elapsed() < SOAK {
        runtime.block_on(ticks.tick());
        samples.push((started.elapsed(), rss_bytes(pid)));
    }
    stop.store(true, Ordering::Release);
    runtime.block_on(async {
        for sender in senders {
            sender.await.unwrap();
        }
    });
    let tasks = answered.load(Ordering::Relaxed);
    wait_until("the clients' connections to close", PATIENCE, || {
        (server.counters()["active"] == 0).then_some(())
    });
    let after = rss_bytes(pid);

    let last_third: Vec<u64> = samples
        .iter()
        .filter(|(at, _)| *at >= SOAK * 2 / 3)
        .map(|(_, rss)| *rss)
        .collect();
    let peak = samples.iter().map(|(_, rss)| *rss).max().unwrap();
    let growth = last_third.last().unwrap().saturating_sub(last_third[0]);
    eprintln!(
        "{transport}: {tasks} tasks in {SOAK:?}; RSS idle {:.1} MiB, peak {:.1} MiB, growth over \
         the last third {:.2} MiB, after {:.1} MiB",
        idle as f64 / MIB,
        peak as f64 / MIB,
        growth as f64 / MIB,
        after as f64 / MIB,
    );
    assert!(tasks > 0);
    assert!(
        growth < 1 << 20,
        "{transport}: RSS grew by {growth} bytes over the last third of the run"
    );
    assert!(
        after < idle + (4 << 20),
        "{transport}: RSS {after} bytes after the load, {idle} idle before"
    );
}
