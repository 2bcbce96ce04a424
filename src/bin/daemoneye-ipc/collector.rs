//! The handler `daemoneye-ipc serve` runs: a real, if small, collector.
//!
//! * `ENUMERATE_PROCESSES`: this machine's processes, filtered by the task's
//!   `process_filter` (pids, names, and an `executable_pattern` glob; empty
//!   parts match everything). Filters are bounded ([`FilterLimits`]).
//! * `CHECK_PROCESS_HASH`: the SHA-256 of `hash_check.executable_path`,
//!   compared with `expected_hash`, for the executable of a running process
//!   or a file under a directory the operator allowed ([`HashPolicy`]).
//! * Anything else: `success = false` naming the unsupported type.
//!
//! Process tables and file hashing are blocking work: it runs on Tokio's
//! blocking pool, at most [`Collector::max_jobs`] jobs at once. A job waits
//! for its turn without holding a thread, so the job of a task whose
//! connection has gone (its future dropped) never starts; a hash that is
//! running stops when its task is dropped (a cancel flag checked between
//! chunks). A process scan holds the process table; a task waits for it no
//! longer than [`Collector::scan_wait`], so one scan stuck in a `/proc` read
//! cannot stall every later task.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use daemoneye_ipc::proto::{HashCheck, HashResult, ProcessFilter};
use daemoneye_ipc::{DetectionResult, DetectionTask, ProcessRecord, TaskType};
use sha2::{Digest, Sha256};
use sysinfo::{Pid, Process, ProcessRefreshKind, ProcessesToUpdate, System, UpdateKind};
use tokio::sync::{Mutex, Semaphore};

/// The hash algorithm this collector computes.
const HASH_ALGORITHM: &str = "sha256";

/// Bytes read from a file at a time while hashing; the cancel flag is
/// checked between reads.
const HASH_CHUNK: usize = 64 * 1024;

/// How much a task's process filter may ask for. Past a limit the task is
/// answered with `success = false` naming it, before any work is done.
#[derive(Debug, Clone, Copy)]
pub struct FilterLimits {
    /// `process_filter.pids` entries.
    pub pids: usize,
    /// `process_filter.process_names` entries.
    pub process_names: usize,
    /// Bytes of `process_filter.executable_pattern`.
    pub pattern_bytes: usize,
}

impl FilterLimits {
    pub const DEFAULT: FilterLimits = FilterLimits {
        pids: 4096,
        process_names: 1024,
        pattern_bytes: 4096,
    };
}

/// Which files `CHECK_PROCESS_HASH` may read, and how much of them.
#[derive(Debug, Clone)]
pub struct HashPolicy {
    /// Files under these directories (resolved) may be hashed, besides the
    /// executables of running processes.
    pub allowed_dirs: Vec<PathBuf>,
    /// Larger files are refused without being read.
    pub max_bytes: u64,
}

/// Shared by every connection.
pub struct Collector {
    /// The process table, reused between scans; a scan holds it.
    system: Arc<Mutex<System>>,
    /// Blocking jobs running or about to.
    jobs: Arc<Semaphore>,
    max_jobs: usize,
    scan_wait: Duration,
    filters: FilterLimits,
    hashing: HashPolicy,
}

impl Collector {
    pub fn new(hashing: HashPolicy) -> Arc<Collector> {
        let max_jobs =
            std::thread::available_parallelism().map_or(2, |cpus| (cpus.get() * 2).clamp(2, 16));
        Collector::with_limits(
            hashing,
            max_jobs,
            Duration::from_secs(5),
            FilterLimits::DEFAULT,
        )
    }

    /// A collector running at most `max_jobs` blocking jobs at once, whose
    /// tasks wait at most `scan_wait` for the process table.
    pub fn with_limits(
        hashing: HashPolicy,
        max_jobs: usize,
        scan_wait: Duration,
        filters: FilterLimits,
    ) -> Arc<Collector> {
        Arc::new(Collector {
            system: Arc::new(Mutex::new(System::new())),
            jobs: Arc::new(Semaphore::new(max_jobs)),
            max_jobs,
            scan_wait,
            filters,
            hashing,
        })
    }

    /// Blocking jobs that may run at once.
    pub fn max_jobs(&self) -> usize {
        self.max_jobs
    }

    /// How long a task waits for a process scan in progress.
    pub fn scan_wait(&self) -> Duration {
        self.scan_wait
    }

    pub async fn handle(self: Arc<Self>, task: DetectionTask) -> DetectionResult {
        let task_id = task.task_id.clone();
        match TaskType::try_from(task.task_type) {
            Ok(TaskType::EnumerateProcesses) => self.enumerate(task).await,
            Ok(TaskType::CheckProcessHash) => self.check_hash(task).await,
            Ok(other) => failure(
                task_id,
                format!(
                    "task type {} is not supported by this collector (supported: ENUMERATE_PROCESSES, \
                     CHECK_PROCESS_HASH)",
                    other.as_str_name()
                ),
            ),
            Err(_) => failure(
                task_id,
                format!("task type {} is unknown to this collector", task.task_type),
            ),
        }
    }

    async fn enumerate(&self, task: DetectionTask) -> DetectionResult {
        let task_id = task.task_id;
        let filter = match Filter::new(task.process_filter.unwrap_or_default(), self.filters) {
            Ok(filter) => filter,
            Err(reason) => return failure(task_id, reason),
        };
        let Ok(job) = self.jobs.clone().acquire_owned().await else {
            unreachable!("the job semaphore is never closed")
        };
        let Ok(mut system) =
            tokio::time::timeout(self.scan_wait, self.system.clone().lock_owned()).await
        else {
            return failure(
                task_id,
                format!(
                    "the process table is busy: a scan has been running for over {} ms; retry later",
                    self.scan_wait.as_millis()
                ),
            );
        };
        let scan = tokio::task::spawn_blocking(move || {
            let _job = job;
            scan(&mut system, &filter)
        });
        match scan.await {
            Ok(processes) => DetectionResult {
                task_id,
                success: true,
                processes,
                ..Default::default()
            },
            Err(error) => failure(task_id, format!("the process scan failed: {error}")),
        }
    }

    async fn check_hash(&self, task: DetectionTask) -> DetectionResult {
        let task_id = task.task_id;
        let Some(check) = task
            .hash_check
            .filter(|check| !check.executable_path.is_empty())
        else {
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
        let Ok(job) = self.jobs.clone().acquire_owned().await else {
            unreachable!("the job semaphore is never closed")
        };
        // Dropping this future (the task timed out, or its connection went)
        // tells the hash loop to stop.
        let cancel = CancelOnDrop::default();
        let cancelled = cancel.flag();
        let policy = self.hashing.clone();
        let id = task_id.clone();
        let hashed = tokio::task::spawn_blocking(move || {
            let _job = job;
            hash_result(id, check, &policy, &cancelled)
        })
        .await;
        drop(cancel);
        hashed.unwrap_or_else(|error| failure(task_id, format!("the hash failed: {error}")))
    }
}

/// A flag set when this guard is dropped: how an async handler tells its
/// blocking work to stop.
#[derive(Default)]
struct CancelOnDrop(Arc<AtomicBool>);

impl CancelOnDrop {
    fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A task's process filter, checked against the limits and made ready to
/// match: pids in a set, names in a set, the pattern compiled once.
struct Filter {
    pids: HashSet<u32>,
    names: HashSet<String>,
    pattern: Option<globset::GlobMatcher>,
}

impl Filter {
    fn new(filter: ProcessFilter, limits: FilterLimits) -> Result<Filter, String> {
        let over = |what: &str, count: usize, limit: usize| {
            format!(
                "process_filter.{what} has {count} entries, over this collector's limit of {limit}; \
                 split the task"
            )
        };
        if filter.pids.len() > limits.pids {
            return Err(over("pids", filter.pids.len(), limits.pids));
        }
        if filter.process_names.len() > limits.process_names {
            return Err(over(
                "process_names",
                filter.process_names.len(),
                limits.process_names,
            ));
        }
        let pattern = match filter.executable_pattern {
            Some(pattern) if pattern.len() > limits.pattern_bytes => {
                return Err(format!(
                    "process_filter.executable_pattern is {} bytes, over this collector's limit of \
                     {}",
                    pattern.len(),
                    limits.pattern_bytes
                ));
            }
            Some(pattern) => Some(
                globset::GlobBuilder::new(&pattern)
                    .literal_separator(false)
                    .build()
                    .map_err(|error| {
                        format!("process_filter.executable_pattern {pattern:?} is not a valid glob: {error}")
                    })?
                    .compile_matcher(),
            ),
            None => None,
        };
        Ok(Filter {
            pids: filter.pids.into_iter().collect(),
            names: filter.process_names.into_iter().collect(),
            pattern,
        })
    }

    fn matches(&self, process: &Process) -> bool {
        let pid_ok = self.pids.is_empty() || self.pids.contains(&process.pid().as_u32());
        let name_ok = self.names.is_empty()
            || self
                .names
                .contains(process.name().to_string_lossy().as_ref());
        let exe_ok = match &self.pattern {
            None => true,
            Some(pattern) => process.exe().is_some_and(|exe| pattern.is_match(exe)),
        };
        pid_ok && name_ok && exe_ok
    }
}

/// Refreshes the table (only the wanted pids, if the filter names some) and
/// returns the matching processes, by pid.
fn scan(system: &mut System, filter: &Filter) -> Vec<ProcessRecord> {
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
    system.refresh_processes_specifics(scope, true, refresh);
    let mut processes: Vec<ProcessRecord> = system
        .processes()
        .values()
        .filter(|process| filter.matches(process))
        .map(|process| record(process, collection_time))
        .collect();
    processes.sort_unstable_by_key(|record| record.pid);
    processes
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

/// The hash of the task's file, as a result, or why there is none.
fn hash_result(
    task_id: String,
    check: HashCheck,
    policy: &HashPolicy,
    cancelled: &AtomicBool,
) -> DetectionResult {
    let path = check.executable_path;
    match hash_file(&path, policy, cancelled) {
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

/// Hashes `path` if the policy allows it: the collector runs as root, so an
/// agent must not learn through it what exists or what a file holds beyond
/// what it may ask about.
///
/// Allowed: the executable of a process running now (`path` exactly as the
/// OS reports it), or a file whose directory, resolved, lies under an
/// allowed directory. Anything else is refused with the same message
/// whether or not the file exists. The file is then opened without
/// following a final symlink, must be a regular file, and is read up to
/// `max_bytes`.
fn hash_file(path: &str, policy: &HashPolicy, cancelled: &AtomicBool) -> Result<String, String> {
    let Some(target) = allowed_target(Path::new(path), policy) else {
        return Err(format!(
            "{path} is neither the executable of a running process nor under a directory this \
             collector allows (serve --hash-allow DIR); refusing to hash it"
        ));
    };
    let mut file = open_regular(&target).map_err(|error| {
        if std::fs::symlink_metadata(&target).is_ok_and(|meta| meta.file_type().is_symlink()) {
            format!(
                "{path} is a symbolic link, which this collector does not follow; ask for the \
                 file it points to"
            )
        } else {
            format!("cannot hash {path}: {error}")
        }
    })?;
    let length = file
        .metadata()
        .map_err(|error| format!("cannot inspect {path}: {error}"))?
        .len();
    if length > policy.max_bytes {
        return Err(format!(
            "{path} is {length} bytes, over this collector's limit of {} (serve --max-hash-bytes); \
             not read",
            policy.max_bytes
        ));
    }
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; HASH_CHUNK];
    let mut read_so_far: u64 = 0;
    loop {
        if cancelled.load(Ordering::Acquire) {
            return Err(format!("hashing {path} was stopped: its task was given up"));
        }
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => {
                read_so_far += count as u64;
                if read_so_far > policy.max_bytes {
                    return Err(format!(
                        "{path} grew past this collector's limit of {} bytes while it was read \
                         (serve --max-hash-bytes)",
                        policy.max_bytes
                    ));
                }
                hasher.update(&buffer[..count]);
            }
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

/// The file to open for `path`, if the policy allows it.
fn allowed_target(path: &Path, policy: &HashPolicy) -> Option<PathBuf> {
    // Only plain absolute paths: no `.` or `..` to step out of a directory.
    if !path.is_absolute()
        || path
            .components()
            .any(|part| matches!(part, Component::CurDir | Component::ParentDir))
    {
        return None;
    }
    if is_running_executable(path) {
        return Some(path.to_owned());
    }
    // The directory is resolved (its symlinks followed) and must lie under
    // an allowed directory, also resolved; the file name itself is opened
    // without following a symlink.
    let name = path.file_name()?;
    let dir = std::fs::canonicalize(path.parent()?).ok()?;
    policy
        .allowed_dirs
        .iter()
        .filter_map(|allowed| std::fs::canonicalize(allowed).ok())
        .any(|allowed| dir.starts_with(allowed))
        .then(|| dir.join(name))
}

/// Whether `path` is exactly the executable of a process running now.
fn is_running_executable(path: &Path) -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return false;
        };
        entries
            .filter_map(Result::ok)
            .filter(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .any(|entry| std::fs::read_link(entry.path().join("exe")).is_ok_and(|exe| exe == path))
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let mut system = System::new();
        system.refresh_processes_specifics(
            ProcessesToUpdate::All,
            true,
            ProcessRefreshKind::nothing().with_exe(UpdateKind::Always),
        );
        system
            .processes()
            .values()
            .any(|process| process.exe() == Some(path))
    }
}

/// Opens `path` for reading without following a final symlink and without
/// blocking (a FIFO without a writer would block an open), and checks it is
/// a regular file.
fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        &mut options,
        (rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOFOLLOW).bits() as i32,
    );
    #[cfg(windows)]
    {
        // FILE_FLAG_OPEN_REPARSE_POINT: open a symlink itself, not its target.
        std::os::windows::fs::OpenOptionsExt::custom_flags(&mut options, 0x0020_0000);
    }
    let not_regular = || std::io::Error::other("not a regular file");
    let file = match options.open(path) {
        Ok(file) => file,
        // Windows refuses to open a directory as a file ("access denied")
        // unless asked for backup semantics, which would also let a
        // privileged collector past the file's ACL. Say what it is instead.
        #[cfg(windows)]
        Err(error)
            if error.kind() == std::io::ErrorKind::PermissionDenied
                && std::fs::symlink_metadata(path).is_ok_and(|metadata| metadata.is_dir()) =>
        {
            return Err(not_regular());
        }
        Err(error) => return Err(error),
    };
    if !file.metadata()?.is_file() {
        return Err(not_regular());
    }
    Ok(file)
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

    fn policy(allowed: &[&Path]) -> HashPolicy {
        HashPolicy {
            allowed_dirs: allowed.iter().map(|dir| dir.to_path_buf()).collect(),
            max_bytes: 1 << 20,
        }
    }

    fn hash_task(path: &Path, expected: &str) -> DetectionTask {
        DetectionTask {
            task_id: "t".into(),
            task_type: TaskType::CheckProcessHash.into(),
            hash_check: Some(HashCheck {
                expected_hash: expected.to_owned(),
                hash_algorithm: "SHA256".into(),
                executable_path: path.to_string_lossy().into_owned(),
            }),
            ..Default::default()
        }
    }

    fn message(result: &DetectionResult) -> &str {
        result.error_message.as_deref().unwrap_or_default()
    }

    #[tokio::test]
    async fn hashes_an_allowed_file_and_compares() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("abc");
        std::fs::write(&file, b"abc").unwrap();
        let collector = Collector::new(policy(&[dir.path()]));
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let matching = collector
            .clone()
            .handle(hash_task(&file, &abc.to_uppercase()))
            .await;
        assert!(matching.success, "{matching:?}");
        assert_eq!(matching.hash_result.as_ref().unwrap().hash_value, abc);
        assert!(matching.hash_result.unwrap().success);

        let mismatch = collector.handle(hash_task(&file, "00")).await;
        assert!(mismatch.success, "the hash was computed");
        let hash = mismatch.hash_result.unwrap();
        assert!(!hash.success);
        assert!(hash.error_message.unwrap().contains("hash mismatch"));
    }

    #[tokio::test]
    async fn a_file_outside_the_allowed_places_is_refused_alike_whether_it_exists_or_not() {
        let allowed = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let existing = elsewhere.path().join("secret");
        std::fs::write(&existing, b"secret").unwrap();
        let missing = elsewhere.path().join("missing");
        let collector = Collector::new(policy(&[allowed.path()]));
        let answers = [
            collector.clone().handle(hash_task(&existing, "")).await,
            collector.clone().handle(hash_task(&missing, "")).await,
        ];
        for answer in &answers {
            assert!(!answer.success);
            assert!(
                message(answer).contains("refusing to hash it"),
                "{answer:?}"
            );
        }
        let [a, b] = &answers;
        assert_eq!(
            message(a).replace("secret", "X"),
            message(b).replace("missing", "X"),
            "the same answer whether or not the file exists"
        );
        // `..` cannot climb out of an allowed directory.
        let climbing = allowed
            .path()
            .join("..")
            .join(elsewhere.path().file_name().unwrap())
            .join("secret");
        assert!(!collector.handle(hash_task(&climbing, "")).await.success);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn symlinks_are_not_followed_out_of_an_allowed_directory() {
        let allowed = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let secret = elsewhere.path().join("secret");
        std::fs::write(&secret, b"secret").unwrap();
        // A final symlink, and a directory symlink, both leading out.
        std::os::unix::fs::symlink(&secret, allowed.path().join("link")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), allowed.path().join("dir")).unwrap();
        let collector = Collector::new(policy(&[allowed.path()]));
        let through_file = collector
            .clone()
            .handle(hash_task(&allowed.path().join("link"), ""))
            .await;
        assert!(!through_file.success);
        assert!(
            message(&through_file)
                .contains("is a symbolic link, which this collector does not follow"),
            "said in words: {through_file:?}"
        );
        let through_dir = collector
            .handle(hash_task(&allowed.path().join("dir").join("secret"), ""))
            .await;
        assert!(!through_dir.success);
        assert!(
            message(&through_dir).contains("refusing to hash it"),
            "{through_dir:?}"
        );
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_executable_of_a_running_process_may_be_hashed() {
        let me = std::fs::read_link("/proc/self/exe").unwrap();
        let collector = Collector::new(HashPolicy {
            max_bytes: u64::MAX,
            ..policy(&[])
        });
        let answer = collector.handle(hash_task(&me, "")).await;
        assert!(answer.success, "{answer:?}");
        assert_eq!(answer.hash_result.unwrap().hash_value.len(), 64);
    }

    #[tokio::test]
    async fn a_file_over_the_size_limit_is_refused_without_being_read() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len((1 << 20) + 1)
            .unwrap();
        let collector = Collector::new(policy(&[dir.path()]));
        let answer = collector.handle(hash_task(&big, "")).await;
        assert!(!answer.success);
        assert!(
            message(&answer).contains("1048577 bytes, over this collector's limit of 1048576"),
            "{answer:?}"
        );
    }

    #[test]
    fn a_cancelled_hash_stops_between_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, vec![0; 4 * HASH_CHUNK]).unwrap();
        let cancelled = AtomicBool::new(true);
        let error =
            hash_file(&file.to_string_lossy(), &policy(&[dir.path()]), &cancelled).unwrap_err();
        assert!(error.contains("was stopped"), "{error}");
    }

    #[tokio::test]
    async fn what_is_not_a_regular_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let collector = Collector::new(policy(&[dir.path()]));
        let answer = collector.handle(hash_task(&sub, "")).await;
        assert!(
            message(&answer).ends_with("not a regular file"),
            "{answer:?}"
        );
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_fifo_without_writer_is_refused_without_blocking() {
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
        let collector = Collector::new(policy(&[dir.path()]));
        let answer = collector.handle(hash_task(&fifo, "")).await;
        assert!(
            message(&answer).ends_with("not a regular file"),
            "{answer:?}"
        );
    }

    fn enumerate(filter: ProcessFilter) -> DetectionTask {
        DetectionTask {
            task_id: "e".into(),
            task_type: TaskType::EnumerateProcesses.into(),
            process_filter: Some(filter),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn filters_over_their_limits_are_answered_naming_the_limit() {
        let limits = FilterLimits {
            pids: 2,
            process_names: 1,
            pattern_bytes: 8,
        };
        let collector = Collector::with_limits(policy(&[]), 2, Duration::from_secs(5), limits);
        for (filter, expected) in [
            (
                ProcessFilter {
                    pids: vec![1, 2, 3],
                    ..Default::default()
                },
                "process_filter.pids has 3 entries, over this collector's limit of 2",
            ),
            (
                ProcessFilter {
                    process_names: vec!["a".into(), "b".into()],
                    ..Default::default()
                },
                "process_filter.process_names has 2 entries, over this collector's limit of 1",
            ),
            (
                ProcessFilter {
                    executable_pattern: Some("/usr/bin/*sshd".into()),
                    ..Default::default()
                },
                "executable_pattern is 14 bytes, over this collector's limit of 8",
            ),
        ] {
            let answer = collector.clone().handle(enumerate(filter)).await;
            assert!(!answer.success);
            assert!(message(&answer).contains(expected), "{answer:?}");
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_pattern_is_a_glob_matched_against_the_executable_path() {
        let me = std::process::id();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let dir = exe.parent().unwrap().to_string_lossy().into_owned();
        let collector = Collector::new(policy(&[]));
        for (pattern, found) in [(format!("{dir}/*"), true), ("/nowhere/*".to_owned(), false)] {
            let answer = collector
                .clone()
                .handle(enumerate(ProcessFilter {
                    pids: vec![me],
                    executable_pattern: Some(pattern.clone()),
                    ..Default::default()
                }))
                .await;
            assert!(answer.success, "{answer:?}");
            assert_eq!(answer.processes.len(), usize::from(found), "{pattern}");
        }
        let invalid = collector
            .handle(enumerate(ProcessFilter {
                executable_pattern: Some("[".into()),
                ..Default::default()
            }))
            .await;
        assert!(
            message(&invalid).contains("is not a valid glob"),
            "{invalid:?}"
        );
    }

    #[tokio::test]
    async fn a_scan_that_holds_the_process_table_stalls_later_tasks_no_longer_than_the_scan_wait() {
        let collector = Collector::with_limits(
            policy(&[]),
            4,
            Duration::from_millis(50),
            FilterLimits::DEFAULT,
        );
        // A scan stuck in a /proc read, as far as the table is concerned.
        let stuck = collector.system.clone().lock_owned().await;
        let answer = collector
            .clone()
            .handle(enumerate(ProcessFilter::default()))
            .await;
        assert!(!answer.success);
        assert!(
            message(&answer).contains("the process table is busy"),
            "{answer:?}"
        );
        drop(stuck);
        assert!(
            collector
                .handle(enumerate(ProcessFilter::default()))
                .await
                .success
        );
    }

    #[tokio::test]
    async fn blocking_jobs_are_bounded_and_a_job_whose_task_is_dropped_never_starts() {
        let collector = Collector::with_limits(
            policy(&[]),
            1,
            Duration::from_secs(5),
            FilterLimits::DEFAULT,
        );
        let only_job = collector.jobs.clone().acquire_owned().await.unwrap();
        // The task waits for a job without starting one.
        let waiting = tokio::spawn(
            collector
                .clone()
                .handle(enumerate(ProcessFilter::default())),
        );
        tokio::task::yield_now().await;
        assert_eq!(collector.jobs.available_permits(), 0);
        waiting.abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
        drop(only_job);
        assert_eq!(
            collector.jobs.available_permits(),
            1,
            "the dropped task took no job with it"
        );
        assert!(
            collector
                .handle(enumerate(ProcessFilter::default()))
                .await
                .success
        );
    }
}
