//! `daemoneye-ipc send`: one task, its result as JSON on stdout.
//!
//! Exit 0 whenever a result came back (check its `success` field); a failure
//! to get one (no server, a deadline, a lost connection) is one line on
//! stderr naming the endpoint and the cause, and exit 1. Bad arguments
//! (an empty task id, filters that do not fit the task type) exit 2. With
//! `--expected-hash`, a hash that came back different (or could not be
//! computed) is a line on stderr saying so, and exit 3, after the result.

use clap::{Args, ValueEnum};
use daemoneye_ipc::proto::{HashCheck, ProcessFilter};
use daemoneye_ipc::{DetectionResult, DetectionTask, IpcClient, IpcError, TaskType};

use crate::{ConfigArgs, Failure};

#[derive(Args)]
pub struct SendCmd {
    #[command(flatten)]
    settings: ConfigArgs,
    /// Unix: also trust a server running as this uid (repeatable). A server
    /// running as our own uid or root is always trusted.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
    /// Correlation id of the task; the result carries it back.
    #[arg(long, value_name = "ID")]
    task_id: String,
    /// What to ask for. Default: check-process-hash when --hash-path is
    /// given, enumerate-processes otherwise.
    #[arg(long, value_enum, value_name = "TYPE")]
    task_type: Option<TaskTypeArg>,
    /// Only these process ids (repeatable).
    #[arg(long = "pid", value_name = "N")]
    pids: Vec<u32>,
    /// Only processes with this name (repeatable).
    #[arg(long = "name", value_name = "NAME")]
    names: Vec<String>,
    /// Only processes whose executable path matches this glob (`*`, `?`,
    /// `[...]`, `{a,b}`).
    #[arg(long, value_name = "PATTERN")]
    executable_pattern: Option<String>,
    /// File to hash for check-process-hash; a relative path is taken from
    /// this directory, as the collector needs an absolute one.
    #[arg(long, value_name = "P")]
    hash_path: Option<String>,
    /// Expected SHA-256 (hex) of --hash-path: exit 3 if the hash differs
    /// (or could not be computed).
    #[arg(long, value_name = "H", requires = "hash_path")]
    expected_hash: Option<String>,
    /// Free-form metadata passed along with the task.
    #[arg(long, value_name = "TEXT")]
    metadata: Option<String>,
}

/// Task types by their proto names, in kebab case.
#[derive(Clone, Copy, ValueEnum)]
enum TaskTypeArg {
    EnumerateProcesses,
    CheckProcessHash,
    MonitorProcessTree,
    VerifyExecutable,
    MonitorNetworkConnections,
    TrackFileOperations,
    CollectPerformanceMetrics,
}

impl From<TaskTypeArg> for TaskType {
    fn from(arg: TaskTypeArg) -> TaskType {
        match arg {
            TaskTypeArg::EnumerateProcesses => TaskType::EnumerateProcesses,
            TaskTypeArg::CheckProcessHash => TaskType::CheckProcessHash,
            TaskTypeArg::MonitorProcessTree => TaskType::MonitorProcessTree,
            TaskTypeArg::VerifyExecutable => TaskType::VerifyExecutable,
            TaskTypeArg::MonitorNetworkConnections => TaskType::MonitorNetworkConnections,
            TaskTypeArg::TrackFileOperations => TaskType::TrackFileOperations,
            TaskTypeArg::CollectPerformanceMetrics => TaskType::CollectPerformanceMetrics,
        }
    }
}

impl SendCmd {
    fn task(&self) -> Result<DetectionTask, Failure> {
        if self.task_id.is_empty() {
            return Err(Failure::usage(IpcError::EmptyTaskId));
        }
        let task_type = match self.task_type {
            Some(explicit) => TaskType::from(explicit),
            None if self.hash_path.is_some() => TaskType::CheckProcessHash,
            None => TaskType::EnumerateProcesses,
        };
        let filters_given =
            !self.pids.is_empty() || !self.names.is_empty() || self.executable_pattern.is_some();
        if filters_given && task_type != TaskType::EnumerateProcesses {
            return Err(Failure::usage(
                "--pid, --name and --executable-pattern only apply to --task-type enumerate-processes",
            ));
        }
        if self.hash_path.is_some() && task_type != TaskType::CheckProcessHash {
            return Err(Failure::usage(
                "--hash-path only applies to --task-type check-process-hash",
            ));
        }
        if task_type == TaskType::CheckProcessHash && self.hash_path.is_none() {
            return Err(Failure::usage(
                "--task-type check-process-hash needs --hash-path FILE: the file to hash",
            ));
        }
        let hash_path = match &self.hash_path {
            Some(path) => Some(absolute(path)?),
            None => None,
        };
        Ok(DetectionTask {
            task_id: self.task_id.clone(),
            task_type: task_type.into(),
            process_filter: filters_given.then(|| ProcessFilter {
                process_names: self.names.clone(),
                pids: self.pids.clone(),
                executable_pattern: self.executable_pattern.clone(),
            }),
            hash_check: hash_path.map(|executable_path| HashCheck {
                expected_hash: self.expected_hash.clone().unwrap_or_default(),
                hash_algorithm: "sha256".to_owned(),
                executable_path,
            }),
            metadata: self.metadata.clone(),
            // `send` asks for the process domain only; the network,
            // filesystem and performance filters stay unset.
            network_filter: None,
            filesystem_filter: None,
            performance_filter: None,
        })
    }

    pub async fn run(self) -> Result<(), Failure> {
        let task = self.task()?;
        let config = self.settings.load().map_err(Failure::usage)?.config;
        let client = IpcClient::builder(config)
            .allow_server_uids(self.allow_uids.iter().copied())
            .build()
            .map_err(Failure::usage)?;
        let result = client.send(task).await.map_err(|err| {
            Failure::runtime(format!("send to {} failed: {err}", client.endpoint()))
        })?;
        let json = serde_json::to_string_pretty(&result).map_err(Failure::runtime)?;
        println!("{}", escape_terminal_controls(&json));
        match &self.expected_hash {
            Some(expected) => confirm_hash(&result, expected),
            None => Ok(()),
        }
    }
}

/// `path` as the collector needs it: absolute, a relative one taken from
/// this process's directory (the collector's is another).
fn absolute(path: &str) -> Result<String, Failure> {
    let absolute = std::path::absolute(path).map_err(|error| {
        Failure::usage(format!(
            "--hash-path {path:?} cannot be made absolute: {error}"
        ))
    })?;
    absolute.into_os_string().into_string().map_err(|path| {
        Failure::usage(format!(
            "--hash-path {path:?} is not valid UTF-8, which a task cannot carry"
        ))
    })
}

/// Whether the hash that came back is `expected`: an error (exit 3) saying
/// how it is not, or that it could not be computed.
fn confirm_hash(result: &DetectionResult, expected: &str) -> Result<(), Failure> {
    let expected = expected.trim();
    let Some(hash) = result.hash_result.as_ref().filter(|_| result.success) else {
        return Err(Failure::hash_mismatch(format!(
            "the hash could not be checked against --expected-hash: {}",
            escape_terminal_controls(
                result
                    .error_message
                    .as_deref()
                    .unwrap_or("the collector sent no hash")
            )
        )));
    };
    if hash.hash_value.eq_ignore_ascii_case(expected) {
        return Ok(());
    }
    Err(Failure::hash_mismatch(format!(
        "the hash of {} is {}, not the expected {} (--expected-hash)",
        escape_terminal_controls(&hash.file_path),
        escape_terminal_controls(&hash.hash_value),
        escape_terminal_controls(expected)
    )))
}

/// The collector's text, as printed, can drive no terminal: serde_json
/// escapes the C0 controls (ESC among them) inside strings, and this escapes
/// what it leaves, DEL and the C1 controls (U+009B is a CSI on its own), as
/// `\uXXXX`. They can only occur inside strings, so the JSON means the same.
fn escape_terminal_controls(json: &str) -> String {
    let mut escaped = String::with_capacity(json.len());
    for c in json.chars() {
        if ('\u{7f}'..='\u{9f}').contains(&c) {
            escaped.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            escaped.push(c);
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_from_the_collector_are_printed_escaped() {
        let result = daemoneye_ipc::DetectionResult {
            task_id: "t".into(),
            error_message: Some("red \u{1b}[31m csi \u{9b}2J del \u{7f} \u{e9}".into()),
            ..Default::default()
        };
        let printed = escape_terminal_controls(&serde_json::to_string_pretty(&result).unwrap());
        assert!(
            !printed.chars().any(|c| c.is_control() && c != '\n'),
            "{printed:?}"
        );
        assert!(
            printed.contains(r"red \u001b[31m csi \u009b2J del \u007f é"),
            "{printed}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&printed).unwrap();
        assert_eq!(
            parsed["error_message"].as_str(),
            result.error_message.as_deref(),
            "the same JSON"
        );
    }
}
