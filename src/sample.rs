//! Realistic messages of a chosen encoded size, for benchmarks and trials.
//!
//! A [`detection_result`] is what a collector sends back for a process
//! enumeration: [`ProcessRecord`]s of about [`RECORD_BYTES`] each (pid, ppid,
//! name, executable path, a command line, times, memory, a SHA-256, a user),
//! as many as the target size holds. Small targets get one smaller record.
//! The encoded size matches the target to within a few bytes.

use prost::Message;

use crate::proto::{DetectionResult, ProcessRecord};

/// Encoded size of each record in a large sample result, like a process
/// with a longish command line.
pub const RECORD_BYTES: usize = 1024;

/// A `DetectionResult` for `task_id` whose encoding is `target_bytes` long
/// (or as close as protobuf's varint lengths allow, never more than a few
/// bytes off, and never below the size of the bare result).
///
/// ```
/// use prost::Message;
/// let result = daemoneye_ipc::sample::detection_result("t", 64 * 1024);
/// assert!(result.encoded_len().abs_diff(64 * 1024) <= 4);
/// assert_eq!(result.processes.len(), 64);
/// ```
pub fn detection_result(task_id: &str, target_bytes: usize) -> DetectionResult {
    let mut result = DetectionResult {
        task_id: task_id.to_owned(),
        success: true,
        ..Default::default()
    };
    let count = (target_bytes / RECORD_BYTES).max(1);
    result.processes = (0..count as u32).map(record).collect();
    if result.encoded_len() > target_bytes {
        // Too small for a full record: one bare record, padded below.
        result.processes = vec![ProcessRecord {
            pid: 4242,
            name: "procmond".to_owned(),
            ..Default::default()
        }];
    }
    // Spread the remainder over the records as padding. Longer strings can
    // need longer length varints, so settle the total by trimming or
    // topping up padding until it lands.
    let base = result.encoded_len();
    let share = target_bytes.saturating_sub(base) / result.processes.len();
    for record in &mut result.processes {
        padding(record).push_str(&"x".repeat(share));
    }
    for _ in 0..8 {
        let length = result.encoded_len();
        if length < target_bytes {
            let last = result.processes.last_mut().expect("at least one record");
            padding(last).push_str(&"x".repeat(target_bytes - length));
        } else if length > target_bytes {
            let mut excess = length - target_bytes;
            for record in result.processes.iter_mut().rev() {
                let pad = padding(record);
                let trailing = pad.len() - pad.trim_end_matches('x').len();
                let cut = excess.min(trailing);
                pad.truncate(pad.len() - cut);
                excess -= cut;
                if excess == 0 {
                    break;
                }
            }
        } else {
            break;
        }
    }
    result
}

/// Where a record takes its padding: its last command-line argument, or
/// the name of a bare record.
fn padding(record: &mut ProcessRecord) -> &mut String {
    match record.command_line.last_mut() {
        Some(argument) => argument,
        None => &mut record.name,
    }
}

/// One process record of a little under [`RECORD_BYTES`] encoded bytes,
/// before padding.
fn record(index: u32) -> ProcessRecord {
    const EXE: &str = "/usr/lib/daemoneye/bin/procmond-worker";
    ProcessRecord {
        pid: 1000 + index,
        ppid: Some(1),
        name: "procmond-worker".to_owned(),
        executable_path: Some(EXE.to_owned()),
        command_line: vec![
            EXE.to_owned(),
            "--config".to_owned(),
            "/etc/daemoneye/procmond.toml".to_owned(),
            format!("--worker-id={index}"),
            format!(
                "--classpath={}",
                "/opt/daemoneye/lib/detector-rules-2026.11.jar:".repeat(10)
            ),
            "--tag=".to_owned(),
        ],
        start_time: Some(1_764_400_000 + i64::from(index)),
        cpu_usage: Some(0.25),
        memory_usage: Some(48 << 20),
        executable_hash: Some(
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".to_owned(),
        ),
        hash_algorithm: Some("sha256".to_owned()),
        user_id: Some("0".to_owned()),
        accessible: true,
        file_exists: true,
        collection_time: 1_764_441_600_000,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_land_on_target() {
        for target in [64, 100, 1024, 4096, 64 * 1024, 1024 * 1024] {
            let result = detection_result("task-000001", target);
            let length = result.encoded_len();
            assert!(
                length.abs_diff(target) <= 4,
                "target {target}, got {length}"
            );
            assert_eq!(
                result.processes.len(),
                (target / RECORD_BYTES).max(1),
                "target {target}"
            );
        }
    }

    #[test]
    fn a_full_record_is_about_record_bytes() {
        let one = detection_result("t", RECORD_BYTES);
        assert_eq!(one.processes.len(), 1);
        assert!(
            !one.processes[0].command_line.is_empty(),
            "a full record, not a bare one"
        );
    }
}
