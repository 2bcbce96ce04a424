//! A server built with the library, in a child process (this test binary
//! run again): it answers each task with a result of the size the task asks
//! for (`metadata = "result=N"`), saying what payload the task carried so the
//! client can check it arrived whole. For tests that need results of a
//! chosen size from a real process (`serve`'s are real process tables).
//!
//! A test binary that starts one defines the child's entry point:
//!
//! ```ignore
//! #[test]
//! #[ignore = "the server process of this file's tests, which start it themselves"]
//! fn sized_server_process() {
//!     support::sized_server::serve_from_env();
//! }
//! ```

use std::io::{BufRead, BufReader, Lines, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};

use daemoneye_ipc::proto::ProcessFilter;
use daemoneye_ipc::{
    Crc32Variant, DetectionResult, DetectionTask, IpcConfig, IpcServer, ProcessRecord,
    TransportKind,
};

use super::{PATIENCE, block_on, rerun_test_binary};

/// How the server is told what to serve, in its environment:
/// `TRANSPORT CRC WRITE_TIMEOUT_MS MAX_BYTES_IN_FLIGHT ENDPOINT` (0 bytes:
/// the default budget).
const SPEC: &str = "DAEMONEYE_TEST_SIZED_SERVER";
/// What it prints once it is listening.
const READY: &str = "sized-server-ready";
/// What it prints, with its counters as JSON, for each `stats` line read.
const STATS: &str = "sized-server-stats ";

/// The child's side: serves as [`SPEC`] says until standard input closes,
/// printing its counters for each `stats` line it reads there.
pub fn serve_from_env() {
    let spec =
        std::env::var(SPEC).expect("started by a test, with DAEMONEYE_TEST_SIZED_SERVER set");
    let [transport, crc32, write_timeout_ms, budget, endpoint] =
        spec.splitn(5, ' ').collect::<Vec<_>>()[..]
    else {
        panic!(
            "{SPEC} is `TRANSPORT CRC WRITE_TIMEOUT_MS MAX_BYTES_IN_FLIGHT ENDPOINT`, not {spec:?}"
        );
    };
    let config = IpcConfig {
        transport: transport.parse().unwrap(),
        crc32_variant: crc32.parse().unwrap(),
        write_timeout_ms: write_timeout_ms.parse().unwrap(),
        endpoint_path: endpoint.to_owned(),
        ..IpcConfig::default()
    };
    let budget: usize = budget.parse().unwrap();
    block_on(async {
        let mut builder = IpcServer::builder(config);
        if budget > 0 {
            builder = builder.max_bytes_in_flight(budget);
        }
        let server = std::sync::Arc::new(
            builder
                .bind(|task: DetectionTask| async move { answer(&task) })
                .await
                .unwrap(),
        );
        println!("{READY}");
        let watched = server.clone();
        tokio::task::spawn_blocking(move || {
            for line in std::io::stdin().lines().map_while(Result::ok) {
                if line == "stats" {
                    let stats = serde_json::to_string(&watched.stats()).unwrap();
                    println!("{STATS}{stats}");
                }
            }
        })
        .await
        .unwrap();
        let server = std::sync::Arc::into_inner(server).expect("the stats reader is done");
        server.shutdown(PATIENCE).await;
    });
}

/// A task carrying `payload` (in a process filter) and asking for a result
/// of about `result_size` bytes.
pub fn sized_task(task_id: &str, payload: String, result_size: usize) -> DetectionTask {
    DetectionTask {
        task_id: task_id.to_owned(),
        metadata: Some(format!("result={result_size}")),
        process_filter: Some(ProcessFilter {
            process_names: vec![payload],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The answer the server gives `task`.
pub fn answer(task: &DetectionTask) -> DetectionResult {
    let wanted: usize = task
        .metadata
        .as_deref()
        .and_then(|metadata| metadata.strip_prefix("result="))
        .and_then(|size| size.parse().ok())
        .expect("the task names its result size");
    DetectionResult {
        task_id: task.task_id.clone(),
        success: true,
        error_message: Some(describe(payload_of(task))),
        processes: processes(&task.task_id, wanted),
        ..Default::default()
    }
}

/// The process records of a result of about `size` bytes (none for 0).
pub fn processes(task_id: &str, size: usize) -> Vec<ProcessRecord> {
    match size {
        0 => Vec::new(),
        size => daemoneye_ipc::sample::detection_result(task_id, size).processes,
    }
}

fn payload_of(task: &DetectionTask) -> &str {
    task.process_filter
        .as_ref()
        .and_then(|filter| filter.process_names.first())
        .map_or("", String::as_str)
}

/// A short account of a payload that differs when any byte differs.
pub fn describe(payload: &str) -> String {
    let crc = Crc32Variant::Ieee.checksum(payload.as_bytes());
    format!("payload of {} bytes, crc {crc:08x}", payload.len())
}

/// A running sized server; stops when dropped (its standard input closes).
pub struct SizedServer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl SizedServer {
    pub fn start(
        transport: TransportKind,
        crc32: Crc32Variant,
        write_timeout_ms: u64,
        endpoint: &str,
    ) -> SizedServer {
        SizedServer::start_with_budget(transport, crc32, write_timeout_ms, 0, endpoint)
    }

    /// With `max_bytes_in_flight` (0: the default).
    pub fn start_with_budget(
        transport: TransportKind,
        crc32: Crc32Variant,
        write_timeout_ms: u64,
        max_bytes_in_flight: usize,
        endpoint: &str,
    ) -> SizedServer {
        let mut child = rerun_test_binary("sized_server_process")
            .env(
                SPEC,
                format!("{transport} {crc32} {write_timeout_ms} {max_bytes_in_flight} {endpoint}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = stdout
            .by_ref()
            .map_while(Result::ok)
            .any(|line| line.contains(READY));
        assert!(ready, "the {transport} sized server did not start");
        let stdin = child.stdin.take();
        SizedServer {
            child,
            stdin,
            stdout,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's counters now.
    pub fn stats(&mut self) -> serde_json::Value {
        let stdin = self.stdin.as_mut().expect("running");
        writeln!(stdin, "stats").unwrap();
        stdin.flush().unwrap();
        let line = self
            .stdout
            .by_ref()
            .map_while(Result::ok)
            .find_map(|line| line.strip_prefix(STATS).map(str::to_owned))
            .expect("the server answers with its counters");
        serde_json::from_str(&line).unwrap()
    }
}

impl Drop for SizedServer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}
