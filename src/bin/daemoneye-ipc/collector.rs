//! The handler `daemoneye-ipc serve` runs: a real, if small, collector.
//!
//! * `ENUMERATE_PROCESSES`: this machine's processes, filtered by the task's
//!   `process_filter` (pids, names, and `executable_pattern` with `*` and `?`
//!   wildcards; empty parts match everything).
//! * `CHECK_PROCESS_HASH`: the SHA-256 of `hash_check.executable_path`,
//!   compared with `expected_hash`.
//! * Anything else: `success = false` naming the unsupported type.
//!
//! Work runs on Tokio's blocking pool: process tables and file hashing are
//! blocking I/O.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use daemoneye_ipc::proto::{HashCheck, HashResult, ProcessFilter};
use daemoneye_ipc::{DetectionResult, DetectionTask, ProcessRecord, TaskType};
use sha2::{Digest, Sha256};
use sysinfo::{Pid, Process, ProcessRefreshKind, ProcessesToUpdate, System, UpdateKind};

/// The hash algorithm this collector computes.
const HASH_ALGORITHM: &str = "sha256";

/// Shared by every connection; the process table is reused between tasks.
pub struct Collector {
    system: Mutex<System>,
}

impl Collector {
    pub fn new() -> Arc<Collector> {
        Arc::new(Collector {
            system: Mutex::new(System::new()),
        })
    }

    pub async fn handle(self: Arc<Self>, task: DetectionTask) -> DetectionResult {
        let task_id = task.task_id.clone();
        match tokio::task::spawn_blocking(move || self.run(task)).await {
            Ok(result) => result,
            Err(error) => failure(
                task_id,
                format!("the task failed inside the collector: {error}"),
            ),
        }
    }

    fn run(&self, task: DetectionTask) -> DetectionResult {
        match TaskType::try_from(task.task_type) {
            Ok(TaskType::EnumerateProcesses) => {
                self.enumerate(task.task_id, task.process_filter.unwrap_or_default())
            }
            Ok(TaskType::CheckProcessHash) => check_hash(task.task_id, task.hash_check),
            Ok(other) => failure(
                task.task_id,
                format!(
                    "task type {} is not supported by this collector (supported: ENUMERATE_PROCESSES, \
                     CHECK_PROCESS_HASH)",
                    other.as_str_name()
                ),
            ),
            Err(_) => failure(
                task.task_id,
                format!("task type {} is unknown to this collector", task.task_type),
            ),
        }
    }

    fn enumerate(&self, task_id: String, filter: ProcessFilter) -> DetectionResult {
        let refresh = ProcessRefreshKind::nothing()
            .with_memory()
            .with_user(UpdateKind::OnlyIfNotSet)
            .with_cmd(UpdateKind::Always)
            .with_exe(UpdateKind::OnlyIfNotSet)
            .without_tasks();
        let pids: Vec<Pid> = filter.pids.iter().map(|&pid| Pid::from_u32(pid)).collect();
        let scope = if pids.is_empty() {
            ProcessesToUpdate::All
        } else {
            ProcessesToUpdate::Some(&pids)
        };
        let collection_time = unix_millis();
        let mut system = self
            .system
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        system.refresh_processes_specifics(scope, true, refresh);
        let mut processes: Vec<ProcessRecord> = system
            .processes()
            .values()
            .filter(|process| matches_filter(process, &filter))
            .map(|process| record(process, collection_time))
            .collect();
        processes.sort_unstable_by_key(|record| record.pid);
        DetectionResult {
            task_id,
            success: true,
            processes,
            ..Default::default()
        }
    }
}

fn matches_filter(process: &Process, filter: &ProcessFilter) -> bool {
    let pid_ok = filter.pids.is_empty() || filter.pids.contains(&process.pid().as_u32());
    let name = process.name().to_string_lossy();
    let name_ok = filter.process_names.is_empty()
        || filter.process_names.iter().any(|wanted| *wanted == name);
    let exe_ok = match &filter.executable_pattern {
        None => true,
        Some(pattern) => process
            .exe()
            .is_some_and(|exe| wildcard_match(pattern, &exe.to_string_lossy())),
    };
    pid_ok && name_ok && exe_ok
}

fn record(process: &Process, collection_time: i64) -> ProcessRecord {
    let exe = process.exe();
    ProcessRecord {
        pid: process.pid().as_u32(),
        ppid: process.parent().map(Pid::as_u32),
        name: process.name().to_string_lossy().into_owned(),
        executable_path: exe.map(|path| path.to_string_lossy().into_owned()),
        command_line: process
            .cmd()
            .iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect(),
        start_time: i64::try_from(process.start_time()).ok(),
        memory_usage: Some(process.memory()),
        user_id: process.user_id().map(|uid| (**uid).to_string()),
        accessible: exe.is_some(),
        file_exists: exe.is_some_and(|path| path.is_file()),
        collection_time,
        ..Default::default()
    }
}

/// `*` matches any run of characters, `?` any one character.
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let (pattern, text): (Vec<char>, Vec<char>) =
        (pattern.chars().collect(), text.chars().collect());
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was, and the text position it is currently matched up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

fn check_hash(task_id: String, check: Option<HashCheck>) -> DetectionResult {
    let Some(check) = check.filter(|check| !check.executable_path.is_empty()) else {
        return failure(
            task_id,
            "CHECK_PROCESS_HASH needs hash_check.executable_path".to_owned(),
        );
    };
    let algorithm = check.hash_algorithm.trim();
    if !(algorithm.is_empty()
        || algorithm.eq_ignore_ascii_case("sha256")
        || algorithm.eq_ignore_ascii_case("sha-256"))
    {
        return failure(
            task_id,
            format!(
                "hash algorithm {algorithm:?} is not supported; this collector computes sha256"
            ),
        );
    }
    let path = check.executable_path;
    match sha256_of_file(&path) {
        Ok(hash_value) => {
            let expected = check.expected_hash.trim();
            let matches = expected.is_empty() || expected.eq_ignore_ascii_case(&hash_value);
            let error_message = (!matches)
                .then(|| format!("hash mismatch: expected {expected}, computed {hash_value}"));
            DetectionResult {
                task_id,
                success: true,
                hash_result: Some(HashResult {
                    hash_value,
                    algorithm: HASH_ALGORITHM.to_owned(),
                    file_path: path,
                    success: matches,
                    error_message,
                }),
                ..Default::default()
            }
        }
        Err(reason) => DetectionResult {
            task_id,
            success: false,
            error_message: Some(reason.clone()),
            hash_result: Some(HashResult {
                algorithm: HASH_ALGORITHM.to_owned(),
                file_path: path,
                success: false,
                error_message: Some(reason),
                ..Default::default()
            }),
            ..Default::default()
        },
    }
}

/// Hashes a regular file. Devices, FIFOs and directories are refused: reading
/// one could block a worker forever. On Unix the file is opened non-blocking,
/// so not even opening a FIFO with no writer can hang.
fn sha256_of_file(path: &str) -> Result<String, String> {
    // Checked before opening too: Windows cannot open a directory as a file.
    let metadata =
        std::fs::metadata(path).map_err(|error| format!("cannot open {path}: {error}"))?;
    if !metadata.is_file() {
        return Err(format!("{path} is not a regular file"));
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        &mut options,
        rustix::fs::OFlags::NONBLOCK.bits() as i32,
    );
    let mut file = options
        .open(path)
        .map_err(|error| format!("cannot open {path}: {error}"))?;
    let metadata = file
        .metadata()
        .map_err(|error| format!("cannot inspect {path}: {error}"))?;
    if !metadata.is_file() {
        return Err(format!("{path} is not a regular file"));
    }
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 64 * 1024];
    loop {
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => hasher.update(&buffer[..count]),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(format!("cannot read {path}: {error}")),
        }
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
}

fn failure(task_id: String, message: String) -> DetectionResult {
    DetectionResult {
        task_id,
        success: false,
        error_message: Some(message),
        ..Default::default()
    }
}

fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard_match("/usr/*", "/usr/bin/sshd"));
        assert!(wildcard_match("*sshd", "/usr/sbin/sshd"));
        assert!(wildcard_match("/usr/?bin/*d", "/usr/sbin/sshd"));
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("a*b*c", "aXXbYYc"));
        assert!(!wildcard_match("/usr/*", "/opt/x"));
        assert!(!wildcard_match("a*b", "aXXc"));
        assert!(!wildcard_match("?", ""));
    }

    #[test]
    fn hashes_a_file_and_compares() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, b"abc").unwrap();
        let path = file.path().to_string_lossy().into_owned();
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_of_file(&path).unwrap(), abc);

        let matching = check_hash(
            "t".into(),
            Some(HashCheck {
                expected_hash: abc.to_uppercase(),
                hash_algorithm: "SHA256".into(),
                executable_path: path.clone(),
            }),
        );
        assert!(matching.success);
        assert!(matching.hash_result.as_ref().unwrap().success);

        let mismatch = check_hash(
            "t".into(),
            Some(HashCheck {
                expected_hash: "00".into(),
                hash_algorithm: String::new(),
                executable_path: path,
            }),
        );
        assert!(mismatch.success, "the hash was computed");
        let hash = mismatch.hash_result.unwrap();
        assert!(!hash.success);
        assert!(hash.error_message.unwrap().contains("hash mismatch"));
    }

    #[test]
    fn refuses_what_is_not_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let error = sha256_of_file(&dir.path().to_string_lossy()).unwrap_err();
        assert!(error.ends_with("is not a regular file"), "{error}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_fifo_without_writer_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let error = sha256_of_file(&fifo.to_string_lossy()).unwrap_err();
        assert!(error.ends_with("is not a regular file"), "{error}");
    }
}
