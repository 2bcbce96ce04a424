//! The client side of a comparison: the workloads, run against one server
//! child. Product backends go through `IpcClient`, exactly as an agent
//! would; the floors speak their bare protocol.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use daemoneye_ipc::{Crc32Variant, DetectionTask, IpcClient, IpcConfig};
use hdrhistogram::Histogram;

use super::Backend;
use super::floors;

/// How long each workload runs.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Plan {
    /// Round trips per latency run: as many as fit in the window, within
    /// these bounds.
    pub latency_window_ms: u64,
    pub latency_min: u64,
    pub latency_max: u64,
    /// Length of each throughput run.
    pub throughput_window_ms: u64,
    /// Fresh connections (connect + first round trip) per round.
    pub connects: u64,
    /// Round trips before any measurement, to warm the path.
    pub warmup: u64,
}

impl Plan {
    pub fn full() -> Plan {
        Plan {
            latency_window_ms: 500,
            latency_min: 200,
            latency_max: 50_000,
            throughput_window_ms: 400,
            connects: 100,
            warmup: 50,
        }
    }

    pub fn quick() -> Plan {
        Plan {
            latency_window_ms: 60,
            latency_min: 30,
            latency_max: 5_000,
            throughput_window_ms: 60,
            connects: 20,
            warmup: 10,
        }
    }
}

/// Round-trip times in nanoseconds.
pub type Latencies = Histogram<u64>;

fn histogram() -> Latencies {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

/// Tasks completed in a pipelined run.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub tasks: u64,
    pub elapsed: Duration,
}

/// Talks to one server child.
pub enum Driver {
    Product(IpcConfig),
    #[cfg(unix)]
    RawStd(String),
    RawTokio(String),
}

/// Connections kept open to load the server (for its memory figure); they
/// are held, never read.
#[allow(dead_code)]
pub enum Held {
    Product(Vec<IpcClient>),
    #[cfg(unix)]
    RawStd(Vec<std::os::unix::net::UnixStream>),
    RawTokio(Vec<RawTokioStream>),
}

#[cfg(unix)]
type RawTokioStream = tokio::net::UnixStream;
#[cfg(windows)]
type RawTokioStream = tokio::net::windows::named_pipe::NamedPipeClient;

fn task(id: String, size: usize) -> DetectionTask {
    DetectionTask {
        task_id: id,
        metadata: Some(format!("size={size}")),
        ..Default::default()
    }
}

impl Driver {
    pub fn new(backend: Backend, endpoint: &str, crc32: Crc32Variant, largest: usize) -> Driver {
        match backend {
            Backend::Product(transport) => Driver::Product(IpcConfig {
                transport,
                endpoint_path: endpoint.to_owned(),
                max_frame_bytes: largest + 64 * 1024,
                crc32_variant: crc32,
                ..IpcConfig::default()
            }),
            #[cfg(unix)]
            Backend::RawStd => Driver::RawStd(endpoint.to_owned()),
            #[cfg(not(unix))]
            Backend::RawStd => unreachable!("raw-std is only offered on Unix"),
            Backend::RawTokio => Driver::RawTokio(endpoint.to_owned()),
        }
    }

    /// One task in flight at a time.
    pub async fn latency(&self, size: usize, plan: &Plan) -> Result<Latencies, String> {
        let mut latencies = histogram();
        let window = Duration::from_millis(plan.latency_window_ms);
        let mut keep_going = {
            let started = Instant::now();
            let mut done = 0;
            move || {
                done += 1;
                done <= plan.latency_min || (done <= plan.latency_max && started.elapsed() < window)
            }
        };
        match self {
            Driver::Product(config) => {
                let client = IpcClient::new(config.clone()).map_err(|e| e.to_string())?;
                for i in 0..plan.warmup {
                    client
                        .send(task(format!("w{i}"), size))
                        .await
                        .map_err(|e| e.to_string())?;
                }
                let mut i = 0u64;
                while keep_going() {
                    i += 1;
                    let started = Instant::now();
                    client
                        .send(task(i.to_string(), size))
                        .await
                        .map_err(|e| e.to_string())?;
                    record(&mut latencies, started);
                }
            }
            #[cfg(unix)]
            Driver::RawStd(endpoint) => {
                use std::io::Write;
                let mut stream =
                    std::os::unix::net::UnixStream::connect(endpoint).map_err(|e| e.to_string())?;
                let request = floors::request(size);
                let mut buf = Vec::new();
                for _ in 0..plan.warmup {
                    stream.write_all(&request).map_err(|e| e.to_string())?;
                    floors::blocking::read_response(&mut stream, &mut buf)
                        .map_err(|e| e.to_string())?;
                }
                while keep_going() {
                    let started = Instant::now();
                    stream.write_all(&request).map_err(|e| e.to_string())?;
                    floors::blocking::read_response(&mut stream, &mut buf)
                        .map_err(|e| e.to_string())?;
                    record(&mut latencies, started);
                }
            }
            Driver::RawTokio(endpoint) => {
                use tokio::io::AsyncWriteExt;
                let mut stream = connect_raw_tokio(endpoint).await?;
                let request = floors::request(size);
                let mut buf = Vec::new();
                for _ in 0..plan.warmup {
                    stream
                        .write_all(&request)
                        .await
                        .map_err(|e| e.to_string())?;
                    floors::read_response_tokio(&mut stream, &mut buf)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                while keep_going() {
                    let started = Instant::now();
                    stream
                        .write_all(&request)
                        .await
                        .map_err(|e| e.to_string())?;
                    floors::read_response_tokio(&mut stream, &mut buf)
                        .await
                        .map_err(|e| e.to_string())?;
                    record(&mut latencies, started);
                }
            }
        }
        Ok(latencies)
    }

    /// `in_flight` tasks outstanding at all times on one connection, for
    /// the plan's throughput window.
    pub async fn throughput(
        &self,
        size: usize,
        in_flight: usize,
        plan: &Plan,
    ) -> Result<Throughput, String> {
        let window = Duration::from_millis(plan.throughput_window_ms);
        match self {
            Driver::Product(config) => {
                let client = IpcClient::new(config.clone()).map_err(|e| e.to_string())?;
                client
                    .send(task("warm".to_owned(), size))
                    .await
                    .map_err(|e| e.to_string())?;
                let completed = Arc::new(AtomicU64::new(0));
                let started = Instant::now();
                let deadline = started + window;
                let mut senders = tokio::task::JoinSet::new();
                for worker in 0..in_flight {
                    let client = client.clone();
                    let completed = completed.clone();
                    senders.spawn(async move {
                        let mut n = 0u64;
                        while Instant::now() < deadline {
                            n += 1;
                            client.send(task(format!("{worker}-{n}"), size)).await?;
                            completed.fetch_add(1, Relaxed);
                        }
                        Ok::<(), daemoneye_ipc::IpcError>(())
                    });
                }
                while let Some(joined) = senders.join_next().await {
                    joined
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                }
                Ok(Throughput {
                    tasks: completed.load(Relaxed),
                    elapsed: started.elapsed(),
                })
            }
            #[cfg(unix)]
            Driver::RawStd(endpoint) => {
                use std::io::Write;
                let mut stream =
                    std::os::unix::net::UnixStream::connect(endpoint).map_err(|e| e.to_string())?;
                let request = floors::request(size);
                let mut buf = Vec::new();
                let started = Instant::now();
                let deadline = started + window;
                for _ in 0..in_flight {
                    stream.write_all(&request).map_err(|e| e.to_string())?;
                }
                let (mut outstanding, mut tasks) = (in_flight, 0);
                while outstanding > 0 {
                    floors::blocking::read_response(&mut stream, &mut buf)
                        .map_err(|e| e.to_string())?;
                    tasks += 1;
                    if Instant::now() < deadline {
                        stream.write_all(&request).map_err(|e| e.to_string())?;
                    } else {
                        outstanding -= 1;
                    }
                }
                Ok(Throughput {
                    tasks,
                    elapsed: started.elapsed(),
                })
            }
            Driver::RawTokio(endpoint) => {
                use tokio::io::AsyncWriteExt;
                let mut stream = connect_raw_tokio(endpoint).await?;
                let request = floors::request(size);
                let mut buf = Vec::new();
                let started = Instant::now();
                let deadline = started + window;
                for _ in 0..in_flight {
                    stream
                        .write_all(&request)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                let (mut outstanding, mut tasks) = (in_flight, 0);
                while outstanding > 0 {
                    floors::read_response_tokio(&mut stream, &mut buf)
                        .await
                        .map_err(|e| e.to_string())?;
                    tasks += 1;
                    if Instant::now() < deadline {
                        stream
                            .write_all(&request)
                            .await
                            .map_err(|e| e.to_string())?;
                    } else {
                        outstanding -= 1;
                    }
                }
                Ok(Throughput {
                    tasks,
                    elapsed: started.elapsed(),
                })
            }
        }
    }

    /// Connect, then one 64-byte round trip, `plan.connects` times.
    pub async fn connections(&self, plan: &Plan) -> Result<Latencies, String> {
        let mut latencies = histogram();
        for i in 0..plan.connects {
            let started = Instant::now();
            match self {
                Driver::Product(config) => {
                    let client = IpcClient::connect(config.clone())
                        .await
                        .map_err(|e| e.to_string())?;
                    client
                        .send(task(format!("c{i}"), 64))
                        .await
                        .map_err(|e| e.to_string())?;
                }
                #[cfg(unix)]
                Driver::RawStd(endpoint) => {
                    use std::io::Write;
                    let mut stream = std::os::unix::net::UnixStream::connect(endpoint)
                        .map_err(|e| e.to_string())?;
                    stream
                        .write_all(&floors::request(64))
                        .map_err(|e| e.to_string())?;
                    floors::blocking::read_response(&mut stream, &mut Vec::new())
                        .map_err(|e| e.to_string())?;
                }
                Driver::RawTokio(endpoint) => {
                    use tokio::io::AsyncWriteExt;
                    let mut stream = connect_raw_tokio(endpoint).await?;
                    stream
                        .write_all(&floors::request(64))
                        .await
                        .map_err(|e| e.to_string())?;
                    floors::read_response_tokio(&mut stream, &mut Vec::new())
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            record(&mut latencies, started);
        }
        Ok(latencies)
    }

    /// `count` clients, each having made one round trip of `size`, kept
    /// connected until the returned value is dropped.
    pub async fn hold(&self, count: usize, size: usize) -> Result<Held, String> {
        match self {
            Driver::Product(config) => {
                let mut clients = Vec::with_capacity(count);
                for i in 0..count {
                    let client = IpcClient::connect(config.clone())
                        .await
                        .map_err(|e| e.to_string())?;
                    client
                        .send(task(format!("h{i}"), size))
                        .await
                        .map_err(|e| e.to_string())?;
                    clients.push(client);
                }
                Ok(Held::Product(clients))
            }
            #[cfg(unix)]
            Driver::RawStd(endpoint) => {
                use std::io::Write;
                let mut streams = Vec::with_capacity(count);
                for _ in 0..count {
                    let mut stream = std::os::unix::net::UnixStream::connect(endpoint)
                        .map_err(|e| e.to_string())?;
                    stream
                        .write_all(&floors::request(size))
                        .map_err(|e| e.to_string())?;
                    floors::blocking::read_response(&mut stream, &mut Vec::new())
                        .map_err(|e| e.to_string())?;
                    streams.push(stream);
                }
                Ok(Held::RawStd(streams))
            }
            Driver::RawTokio(endpoint) => {
                use tokio::io::AsyncWriteExt;
                let mut streams = Vec::with_capacity(count);
                for _ in 0..count {
                    let mut stream = connect_raw_tokio(endpoint).await?;
                    stream
                        .write_all(&floors::request(size))
                        .await
                        .map_err(|e| e.to_string())?;
                    floors::read_response_tokio(&mut stream, &mut Vec::new())
                        .await
                        .map_err(|e| e.to_string())?;
                    streams.push(stream);
                }
                Ok(Held::RawTokio(streams))
            }
        }
    }
}

fn record(latencies: &mut Latencies, started: Instant) {
    let nanos = u64::try_from(started.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1);
    latencies.saturating_record(nanos);
}

#[cfg(unix)]
async fn connect_raw_tokio(endpoint: &str) -> Result<RawTokioStream, String> {
    tokio::net::UnixStream::connect(endpoint)
        .await
        .map_err(|e| e.to_string())
}

/// Named pipes answer `ERROR_PIPE_BUSY` while the server creates its next
/// instance: retry briefly.
#[cfg(windows)]
async fn connect_raw_tokio(endpoint: &str) -> Result<RawTokioStream, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::net::windows::named_pipe::ClientOptions::new().open(endpoint) {
            Ok(client) => return Ok(client),
            Err(e) if e.raw_os_error() == Some(231) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}
