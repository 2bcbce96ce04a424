//! The crate's encoder and decoder against frames computed independently by
//! `tests/golden/gen_frames.py` (hand-written protobuf, zlib CRC-32, table CRC-32C).

use bytes::BytesMut;
use daemoneye_ipc::frame::codec::{ClientCodec, ServerCodec};
use daemoneye_ipc::frame::{FrameSettings, encode_message};
use daemoneye_ipc::proto::{
    FilesystemFilter, FilesystemRecord, HashCheck, HashResult, NetworkFilter, NetworkRecord,
    PerformanceFilter, PerformanceRecord, ProcessFilter,
};
use daemoneye_ipc::{Crc32Variant, DetectionResult, DetectionTask, ProcessRecord, TaskType};
use tokio_util::codec::Decoder;

const GOLDEN: &str = include_str!("golden/frames.txt");

#[allow(clippy::large_enum_variant, reason = "a handful of test vectors")]
enum Golden {
    Task(DetectionTask),
    Result(DetectionResult),
}

/// The same messages as `gen_frames.py`, built with the generated types.
fn message(name: &str) -> Golden {
    let hash_task = DetectionTask {
        task_id: "task-0001".into(),
        task_type: TaskType::CheckProcessHash.into(),
        hash_check: Some(HashCheck {
            expected_hash: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
                .into(),
            hash_algorithm: "sha256".into(),
            executable_path: "/usr/bin/true".into(),
        }),
        ..Default::default()
    };
    match name {
        "empty_task" => Golden::Task(DetectionTask::default()),
        "empty_result" => Golden::Result(DetectionResult::default()),
        "hash_task" => Golden::Task(hash_task),
        "filter_task" => Golden::Task(DetectionTask {
            task_id: "enum-7".into(),
            task_type: TaskType::EnumerateProcesses.into(),
            process_filter: Some(ProcessFilter {
                process_names: vec!["sshd".into(), "procmond".into()],
                pids: vec![1, 300, 70_000, u32::MAX],
                executable_pattern: Some("/usr/*".into()),
            }),
            hash_check: None,
            metadata: Some("m\u{e9}tadonn\u{e9}es \u{2713}".into()),
            network_filter: None,
            filesystem_filter: None,
            performance_filter: None,
        }),
        "multi_domain_task" => Golden::Task(DetectionTask {
            task_id: "multi-1".into(),
            task_type: TaskType::CollectPerformanceMetrics.into(),
            network_filter: Some(NetworkFilter {
                protocols: vec!["tcp".into(), "udp".into()],
                source_addresses: vec!["10.0.0.0/8".into()],
                destination_addresses: vec!["192.0.2.1:443".into()],
                connection_states: vec!["ESTABLISHED".into()],
            }),
            filesystem_filter: Some(FilesystemFilter {
                path_patterns: vec!["/etc/**".into()],
                operation_types: vec!["write".into()],
                file_extensions: vec!["conf".into()],
            }),
            performance_filter: Some(PerformanceFilter {
                metric_names: vec!["cpu_percent".into()],
                components: vec!["procmond".into()],
                min_thresholds: [("cpu_percent".into(), 0.5)].into(),
                max_thresholds: [("cpu_percent".into(), 99.5)].into(),
            }),
            ..Default::default()
        }),
        "multi_domain_result" => Golden::Result(DetectionResult {
            task_id: "multi-1".into(),
            success: true,
            network_events: vec![NetworkRecord {
                connection_id: "conn-1".into(),
                source_address: "10.0.0.5:51234".into(),
                destination_address: "192.0.2.1:443".into(),
                protocol: "tcp".into(),
                state: "ESTABLISHED".into(),
                pid: Some(4242),
                bytes_sent: 1 << 33,
                bytes_received: 17,
                collection_time: 1_764_441_600_000,
            }],
            filesystem_events: vec![FilesystemRecord {
                operation_id: "op-9".into(),
                path: "/etc/hosts".into(),
                operation_type: "write".into(),
                file_size: Some(0),
                permissions: Some("0644".into()),
                collection_time: 1_764_441_600_001,
                ..Default::default()
            }],
            performance_events: vec![PerformanceRecord {
                metric_id: "m-1".into(),
                metric_name: "cpu_percent".into(),
                value: 37.25,
                unit: "%".into(),
                component: "procmond".into(),
                collection_time: -5,
                ..Default::default()
            }],
            ..Default::default()
        }),
        "result_with_records" => Golden::Result(DetectionResult {
            task_id: "enum-7".into(),
            success: true,
            processes: vec![
                ProcessRecord {
                    pid: 4242,
                    ppid: Some(1),
                    name: "procmond".into(),
                    executable_path: Some("/usr/sbin/procmond".into()),
                    command_line: vec!["procmond".into(), "--config".into(), "x".repeat(150)],
                    start_time: Some(-1),
                    cpu_usage: Some(12.5),
                    memory_usage: Some(1 << 40),
                    user_id: Some("0".into()),
                    accessible: true,
                    file_exists: true,
                    collection_time: 1_764_441_600_000,
                    ssdeep_degraded: true,
                    ..Default::default()
                },
                ProcessRecord {
                    ppid: Some(0),
                    name: "swapper".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }),
        "hash_result" => Golden::Result(DetectionResult {
            task_id: "h".into(),
            success: false,
            error_message: Some(String::new()),
            hash_result: Some(HashResult {
                algorithm: "sha256".into(),
                file_path: "/bin/sh".into(),
                error_message: Some("permission denied".into()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        other => panic!("golden vector {other:?} has no message here: add it to message()"),
    }
}

fn decode_hex(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "odd-length hex");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn vectors() -> Vec<(String, Crc32Variant, Vec<u8>)> {
    GOLDEN
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next().expect("name").to_owned();
            let variant = fields
                .next()
                .expect("variant")
                .parse()
                .expect("crc variant");
            let bytes = decode_hex(fields.next().expect("hex"));
            (name, variant, bytes)
        })
        .collect()
}

fn settings(crc32: Crc32Variant) -> FrameSettings {
    FrameSettings {
        crc32,
        ..FrameSettings::DEFAULT
    }
}

#[test]
fn golden_file_has_the_required_coverage() {
    let vectors = vectors();
    assert!(vectors.len() >= 6, "at least six golden frames");
    assert!(
        vectors.iter().any(|(_, _, bytes)| bytes.len() == 8),
        "a zero-length frame"
    );
    for name in ["multi_domain_task", "multi_domain_result"] {
        assert!(
            vectors.iter().any(|(n, _, _)| n == name),
            "{name}: fields 6 to 8 (network, filesystem, performance) are covered"
        );
    }
    for name in ["hash_task", "result_with_records"] {
        let variants: Vec<_> = vectors
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, v, _)| *v)
            .collect();
        assert!(
            variants.contains(&Crc32Variant::Ieee) && variants.contains(&Crc32Variant::Castagnoli),
            "{name} in both variants"
        );
    }
}

#[test]
fn encoder_produces_exactly_the_golden_bytes() {
    for (name, variant, expected) in vectors() {
        let mut wire = BytesMut::new();
        match message(&name) {
            Golden::Task(task) => encode_message(&task, settings(variant), &mut wire),
            Golden::Result(result) => encode_message(&result, settings(variant), &mut wire),
        }
        .unwrap_or_else(|err| panic!("{name}/{variant}: {err}"));
        assert_eq!(wire.as_ref(), expected.as_slice(), "{name}/{variant}");
    }
}

#[test]
fn decoder_accepts_the_golden_bytes() {
    for (name, variant, bytes) in vectors() {
        let mut wire = BytesMut::from(bytes.as_slice());
        match message(&name) {
            Golden::Task(task) => {
                let decoded = ServerCodec::new(settings(variant)).decode(&mut wire);
                assert_eq!(decoded.expect(&name), Some(task), "{name}/{variant}");
            }
            Golden::Result(result) => {
                let decoded = ClientCodec::new(settings(variant)).decode(&mut wire);
                assert_eq!(decoded.expect(&name), Some(result), "{name}/{variant}");
            }
        }
        assert!(
            wire.is_empty(),
            "{name}/{variant}: the whole frame was consumed"
        );
    }
}

#[test]
fn the_other_variant_reports_a_checksum_mismatch() {
    for (name, variant, bytes) in vectors().into_iter().filter(|(_, _, b)| b.len() > 8) {
        let other = match variant {
            Crc32Variant::Ieee => Crc32Variant::Castagnoli,
            Crc32Variant::Castagnoli => Crc32Variant::Ieee,
        };
        let mut wire = BytesMut::from(bytes.as_slice());
        let err = daemoneye_ipc::frame::FrameDecoder::new(settings(other))
            .decode(&mut wire)
            .expect_err(&name);
        assert!(
            matches!(err, daemoneye_ipc::IpcError::ChecksumMismatch { variant: v, .. } if v == other),
            "{name}: {err}"
        );
        assert!(
            err.to_string().contains("ipc.crc32_variant"),
            "the message names the setting: {err}"
        );
    }
}
