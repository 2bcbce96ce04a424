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

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Stdio};

use daemoneye_ipc::proto::ProcessFilter;
use daemoneye_ipc::{
    Crc32Variant, DetectionResult, DetectionTask, IpcConfig, IpcServer, ProcessRecord,
    TransportKind,
};

use super::{PATIENCE, block_on, rerun_test_binary};

/// How the server is told what to serve, in its environment:
/// `TRANSPORT CRC WRITE_TIMEOUT_MS ENDPOINT`.
const SPEC: &str = "DAEMONEYE_TEST_SIZED_SERVER";
/// What it prints once it is listening.
const READY: &str = "sized-server-ready";

/// The child's side: serves as [`SPEC`] says until standard input closes.
pub fn serve_from_env() {
    let spec =
        std::env::var(SPEC).expect("started by a test, with DAEMONEYE_TEST_SIZED_SERVER set");
    let [transport, crc32, write_timeout_ms, endpoint] =
        spec.splitn(4, ' ').collect::<Vec<_>>()[..]
    else {
        panic!("{SPEC} is `TRANSPORT CRC WRITE_TIMEOUT_MS ENDPOINT`, not {spec:?}");
    };
    let config = IpcConfig {
        transport: transport.parse().unwrap(),
        crc32_variant: crc32.parse().unwrap(),
        write_timeout_ms: write_timeout_ms.parse().unwrap(),
        endpoint_path: endpoint.to_owned(),
        ..IpcConfig::default()
    };
    block_on(async {
        let server = IpcServer::bind(config, |task: DetectionTask| async move { answer(&task) })
            .await
            .unwrap();
        println!("{READY}");
        tokio::task::spawn_blocking(|| {
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())
        })
        .await
        .unwrap()
        .unwrap();
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
}

impl SizedServer {
    pub fn start(
        transport: TransportKind,
        crc32: Crc32Variant,
        write_timeout_ms: u64,
        endpoint: &str,
    ) -> SizedServer {
        let mut child = rerun_test_binary("sized_server_process")
            .env(
                SPEC,
                format!("{transport} {crc32} {write_timeout_ms} {endpoint}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let ready = stdout
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains(READY));
        assert!(ready, "the {transport} sized server did not start");
        let stdin = child.stdin.take();
        SizedServer { child, stdin }
    }
}

impl Drop for SizedServer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}
