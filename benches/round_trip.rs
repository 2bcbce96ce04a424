//! A task's round trip through each compiled-in backend, server and client
//! in one process and one runtime, per result size. (`daemoneye-ipc
//! compare` measures across real processes; this isolates the code path.)

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use daemoneye_ipc::{DetectionTask, IpcClient, IpcConfig, IpcServer, TransportKind, sample};

const SIZES: [usize; 4] = [64, 1024, 64 * 1024, 1024 * 1024];

fn round_trip(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    #[cfg(unix)]
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("round_trip");
    for transport in TransportKind::compiled() {
        #[cfg(unix)]
        let endpoint = dir
            .path()
            .join(format!("{transport}.sock"))
            .to_string_lossy()
            .into_owned();
        #[cfg(windows)]
        let endpoint = format!(
            r"\\.\pipe\daemoneye-bench-{}-{transport}",
            std::process::id()
        );
        let config = IpcConfig {
            transport,
            endpoint_path: endpoint,
            max_frame_bytes: 2 * 1024 * 1024,
            ..IpcConfig::default()
        };
        // Shared results: the server encodes them without copying, so the
        // figures are the transport and codec, not a handler building data.
        let results: Vec<_> = SIZES
            .iter()
            .map(|&size| (size, Arc::new(sample::detection_result("", size))))
            .collect();
        let (server, client) = runtime.block_on(async {
            let server = IpcServer::bind(config.clone(), move |task: DetectionTask| {
                let size: Option<usize> = task.metadata.as_deref().and_then(|m| m.parse().ok());
                let result = results
                    .iter()
                    .find(|(s, _)| Some(*s) == size)
                    .map(|(_, r)| r.clone())
                    .expect("every task asks for a prepared size");
                async move { result }
            })
            .await
            .unwrap();
            (server, IpcClient::connect(config).await.unwrap())
        });
        for size in SIZES {
            group.throughput(Throughput::Bytes(size as u64));
            let mut n = 0u64;
            let expected_records = sample::detection_result("", size).processes.len();
            group.bench_function(BenchmarkId::new(transport.name(), size), |b| {
                b.iter(|| {
                    n += 1;
                    let task = DetectionTask {
                        task_id: n.to_string(),
                        metadata: Some(size.to_string()),
                        ..Default::default()
                    };
                    let result = runtime.block_on(client.send(task)).unwrap();
                    assert!(
                        result.success && result.processes.len() == expected_records,
                        "the result asked for"
                    );
                    result
                })
            });
        }
        drop(client);
        runtime.block_on(server.shutdown(Duration::from_secs(1)));
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = round_trip
}
criterion_main!(benches);
