//! A task's round trip through each compiled-in backend, server and client
//! in one process and one runtime, per result size; and (Unix) the client's
//! side alone, against a bare echo thread that answers each task with a
//! prepared frame, per backend. (`daemoneye-ipc compare` measures across
//! real processes; these isolate the code path, so a regression shows.)

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

/// The client's side of a 64 B round trip on one connection, per backend:
/// the server is a bare thread that reads each task's frame and writes back
/// a prepared result under the task's id (no policy, no handler), so what
/// changes is the client's cost.
#[cfg(unix)]
fn client_round_trip(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("client_round_trip");
    for transport in TransportKind::compiled() {
        let path = dir.path().join(format!("{transport}-echo.sock"));
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let echo = std::thread::spawn(move || echo_results(listener));
        let config = IpcConfig {
            transport,
            endpoint_path: path.to_string_lossy().into_owned(),
            ..IpcConfig::default()
        };
        let client = runtime.block_on(IpcClient::connect(config)).unwrap();
        let mut n = 0u64;
        group.bench_function(BenchmarkId::new(transport.name(), 64), |b| {
            b.iter(|| {
                n += 1;
                let task = DetectionTask {
                    task_id: n.to_string(),
                    ..Default::default()
                };
                let result = runtime.block_on(client.send(task)).unwrap();
                assert!(result.success, "the echo's answer");
                result
            })
        });
        drop(client);
        // The client's driver closes the connection on this runtime; the
        // echo thread ends when it sees that.
        runtime
            .block_on(async move { tokio::task::spawn_blocking(move || echo.join()).await })
            .unwrap()
            .unwrap();
    }
    group.finish();
}

/// Serves one connection: each task frame read is answered with a 64 B
/// result carrying the task's id, until the client leaves.
#[cfg(unix)]
fn echo_results(listener: std::os::unix::net::UnixListener) {
    use daemoneye_ipc::DetectionResult;
    use daemoneye_ipc::frame::{FrameSettings, HEADER_LEN, encode_message};
    use prost::Message;
    use std::io::{Read, Write};

    let (mut stream, _) = listener.accept().unwrap();
    let settings = FrameSettings::DEFAULT;
    let shared = sample::detection_result("", 64);
    let mut header = [0u8; HEADER_LEN];
    let mut body = Vec::new();
    let mut frame = bytes::BytesMut::new();
    while stream.read_exact(&mut header).is_ok() {
        let length = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
        body.resize(length, 0);
        stream.read_exact(&mut body).unwrap();
        let task = DetectionTask::decode(body.as_slice()).unwrap();
        let result = DetectionResult {
            task_id: task.task_id,
            ..shared.clone()
        };
        frame.clear();
        encode_message(&result, settings, &mut frame).unwrap();
        stream.write_all(&frame).unwrap();
    }
}

#[cfg(unix)]
criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = round_trip, client_round_trip
}
#[cfg(not(unix))]
criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = round_trip
}
criterion_main!(benches);
