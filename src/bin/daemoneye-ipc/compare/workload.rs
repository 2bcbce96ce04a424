//! The client side of a comparison, against one server child. Every backend
//! offers the same three things through a [`Session`] (one connection): a
//! round trip, a pipelined run, and being held open. Product backends go
//! through `IpcClient`, exactly as an agent would; the floors speak their
//! bare protocol.

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
    /// Round trips per latency run: as many as fit in the window (counted
    /// after the warm-up), within these bounds.
    pub latency_window_ms: u64,
    pub latency_min: u64,
    pub latency_max: u64,
    /// Length of each throughput run.
    pub throughput_window_ms: u64,
    /// Fresh connections (connect + first round trip) per round.
    pub connects: u64,
    /// Round trips on a connection before it is measured.
    pub warmup: u64,
}

impl Plan {
    pub fn full() -> Plan {
        Plan {
            latency_window_ms: 500,
            latency_min: 100,
            latency_max: 50_000,
            throughput_window_ms: 400,
            connects: 100,
            warmup: 50,
        }
    }

    pub fn quick() -> Plan {
        Plan {
            latency_window_ms: 60,
            latency_min: 100,
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

fn record(latencies: &mut Latencies, started: Instant) {
    let nanos = u64::try_from(started.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1);
    latencies.saturating_record(nanos);
}

/// Tasks completed in a pipelined run.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub tasks: u64,
    pub elapsed: Duration,
}

/// How a product client decodes its results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Results {
    /// `IpcClient::send`: the plain generated types.
    Plain,
    /// `IpcClient::send_view`: text fields as slices of the frame.
    Views,
}

/// When a pipelined run stops sending.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    /// Once this instant has passed (a timed run).
    Deadline(Instant),
    /// Once this many tasks have been sent (a counted run, for instruction
    /// counts).
    Tasks(u64),
}

/// Hands out permission to send one more task, shared by a run's senders.
struct Issuer {
    until: Until,
    issued: AtomicU64,
}

impl Issuer {
    fn new(until: Until) -> Issuer {
        Issuer {
            until,
            issued: AtomicU64::new(0),
        }
    }

    fn another(&self) -> bool {
        match self.until {
            Until::Deadline(deadline) => Instant::now() < deadline,
            Until::Tasks(total) => self.issued.fetch_add(1, Relaxed) < total,
        }
    }
}

/// The payload of the task on each fresh connection (every server prepares
/// an answer of this size, whatever `--sizes` says).
pub const FRESH_CONNECTION_SIZE: usize = 64;

/// A fresh connection for every task.
#[derive(Debug, Clone)]
pub struct FreshConnections {
    /// Connect plus one 64-byte round trip, each.
    pub latencies: Latencies,
    pub tasks: u64,
    pub elapsed: Duration,
}

/// How to reach one server child.
pub enum Driver {
    Product(IpcConfig),
    #[cfg(unix)]
    RawStd(String),
    RawTokio(String),
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

    /// A new connection.
    pub async fn open(&self) -> Result<Session, String> {
        Ok(match self {
            Driver::Product(config) => Session::Product(
                IpcClient::connect(config.clone())
                    .await
                    .map_err(|e| e.to_string())?,
            ),
            #[cfg(unix)]
            Driver::RawStd(endpoint) => Session::RawStd(
                std::os::unix::net::UnixStream::connect(endpoint).map_err(|e| e.to_string())?,
                Vec::new(),
            ),
            Driver::RawTokio(endpoint) => {
                Session::RawTokio(connect_raw_tokio(endpoint).await?, Vec::new())
            }
        })
    }

    /// One task in flight at a time: warm up, then time round trips.
    pub async fn latency(&self, size: usize, plan: &Plan) -> Result<Latencies, String> {
        let mut session = self.open().await?;
        session.warm_up(size, plan.warmup).await?;
        let mut latencies = histogram();
        let window = Duration::from_millis(plan.latency_window_ms);
        let started = Instant::now();
        let mut done = 0;
        while done < plan.latency_min || (done < plan.latency_max && started.elapsed() < window) {
            done += 1;
            let sent = Instant::now();
            session.round_trip(size, done).await?;
            record(&mut latencies, sent);
        }
        Ok(latencies)
    }

    /// A new connection for every task, as some existing clients work:
    /// connect, one 64-byte round trip, close; `plan.connects` times.
    pub async fn fresh_connections(&self, plan: &Plan) -> Result<FreshConnections, String> {
        let mut latencies = histogram();
        let started = Instant::now();
        for i in 0..plan.connects {
            let connecting = Instant::now();
            let mut session = self.open().await?;
            session.round_trip(FRESH_CONNECTION_SIZE, i).await?;
            record(&mut latencies, connecting);
            drop(session);
        }
        Ok(FreshConnections {
            latencies,
            tasks: plan.connects,
            elapsed: started.elapsed(),
        })
    }

    /// `count` connections, each having made one round trip of `size`, held
    /// open until the returned sessions are dropped.
    pub async fn hold(&self, count: usize, size: usize) -> Result<Vec<Session>, String> {
        let mut sessions = Vec::with_capacity(count);
        for i in 0..count {
            let mut session = self.open().await?;
            session.round_trip(size, i as u64).await?;
            sessions.push(session);
        }
        Ok(sessions)
    }
}

/// One connection to a server child.
pub enum Session {
    Product(IpcClient),
    #[cfg(unix)]
    RawStd(std::os::unix::net::UnixStream, Vec<u8>),
    RawTokio(RawTokioStream, Vec<u8>),
}

#[cfg(unix)]
type RawTokioStream = tokio::net::UnixStream;
#[cfg(windows)]
type RawTokioStream = tokio::net::windows::named_pipe::NamedPipeClient;

/// A task asking for a `size`-byte result.
fn task(id: String, size: usize) -> DetectionTask {
    with_metadata(id, format!("size={size}"))
}

/// `"{slot}-{n}"`, without the formatting machinery: the floors' requests
/// are built once, so a product task should not spend more on its id than
/// the digits.
fn task_id(slot: usize, n: u64) -> String {
    let mut id = String::with_capacity(24);
    push_decimal(&mut id, slot as u64);
    id.push('-');
    push_decimal(&mut id, n);
    id
}

fn push_decimal(out: &mut String, value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = value;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend(digits[at..].iter().map(|&digit| char::from(digit)));
}

/// A task with the metadata (`size=N`) built once for a whole run, as the
/// floors build their request once: per task, only the id is new.
fn with_metadata(id: String, metadata: String) -> DetectionTask {
    DetectionTask {
        task_id: id,
        metadata: Some(metadata),
        ..Default::default()
    }
}

impl Session {
    /// One request for `size` bytes and its answer.
    pub async fn round_trip(&mut self, size: usize, id: u64) -> Result<(), String> {
        match self {
            Session::Product(client) => {
                client
                    .send(task(id.to_string(), size))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            #[cfg(unix)]
            Session::RawStd(stream, buf) => {
                use std::io::Write;
                stream
                    .write_all(&floors::request(size))
                    .map_err(|e| e.to_string())?;
                floors::blocking::read_response(stream, buf).map_err(|e| e.to_string())?;
            }
            Session::RawTokio(stream, buf) => {
                use tokio::io::AsyncWriteExt;
                stream
                    .write_all(&floors::request(size))
                    .await
                    .map_err(|e| e.to_string())?;
                floors::read_response_tokio(stream, buf)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    pub async fn warm_up(&mut self, size: usize, round_trips: u64) -> Result<(), String> {
        for i in 0..round_trips {
            self.round_trip(size, u64::MAX - i).await?;
        }
        Ok(())
    }

    /// `in_flight` tasks outstanding at all times until `until`; a product
    /// client decodes the results as `results` says (the floors do not
    /// decode).
    pub async fn pipelined(
        &mut self,
        size: usize,
        in_flight: usize,
        until: Until,
        results: Results,
    ) -> Result<Throughput, String> {
        let started = Instant::now();
        let issuer = Arc::new(Issuer::new(until));
        let tasks = match self {
            Session::Product(client) => {
                // One sender per slot: each has a task outstanding at all times.
                let completed = Arc::new(AtomicU64::new(0));
                let mut senders = tokio::task::JoinSet::new();
                for slot in 0..in_flight {
                    let (client, completed) = (client.clone(), completed.clone());
                    let issuer = issuer.clone();
                    let metadata = format!("size={size}");
                    senders.spawn(async move {
                        let mut n = 0u64;
                        while issuer.another() {
                            n += 1;
                            let task = with_metadata(task_id(slot, n), metadata.clone());
                            match results {
                                Results::Plain => drop(client.send(task).await?),
                                Results::Views => drop(client.send_view(task).await?),
                            }
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
                completed.load(Relaxed)
            }
            // The floors keep a window of requests written ahead of the
            // answers: one more goes out for each that comes back.
            #[cfg(unix)]
            Session::RawStd(stream, buf) => {
                use std::io::Write;
                let request = floors::request(size);
                let mut outstanding = 0;
                while outstanding < in_flight && issuer.another() {
                    stream.write_all(&request).map_err(|e| e.to_string())?;
                    outstanding += 1;
                }
                let mut tasks = 0;
                while outstanding > 0 {
                    floors::blocking::read_response(stream, buf).map_err(|e| e.to_string())?;
                    tasks += 1;
                    if issuer.another() {
                        stream.write_all(&request).map_err(|e| e.to_string())?;
                    } else {
                        outstanding -= 1;
                    }
                }
                tasks
            }
            Session::RawTokio(stream, buf) => {
                use tokio::io::AsyncWriteExt;
                let request = floors::request(size);
                let mut outstanding = 0;
                while outstanding < in_flight && issuer.another() {
                    stream
                        .write_all(&request)
                        .await
                        .map_err(|e| e.to_string())?;
                    outstanding += 1;
                }
                let mut tasks = 0;
                while outstanding > 0 {
                    floors::read_response_tokio(stream, buf)
                        .await
                        .map_err(|e| e.to_string())?;
                    tasks += 1;
                    if issuer.another() {
                        stream
                            .write_all(&request)
                            .await
                            .map_err(|e| e.to_string())?;
                    } else {
                        outstanding -= 1;
                    }
                }
                tasks
            }
        };
        Ok(Throughput {
            tasks,
            elapsed: started.elapsed(),
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_are_the_slot_and_the_count() {
        assert_eq!(task_id(0, 0), "0-0");
        assert_eq!(task_id(7, 1_234_567), "7-1234567");
        assert_eq!(task_id(31, u64::MAX), format!("31-{}", u64::MAX));
    }
}
