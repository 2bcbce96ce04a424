//! Property tests of the frame core and the message codecs.

use bytes::BytesMut;
use daemoneye_ipc::frame::codec::{ClientCodec, MessageCodec, ServerCodec};
use daemoneye_ipc::frame::{FrameDecoder, FrameSettings, HEADER_LEN, encode_frame, encode_message};
use daemoneye_ipc::proto::{
    FilesystemFilter, FilesystemRecord, HashCheck, HashResult, NetworkFilter, NetworkRecord,
    PerformanceFilter, PerformanceRecord, ProcessFilter,
};
use daemoneye_ipc::{Crc32Variant, DetectionResult, DetectionTask, IpcError, ProcessRecord};
use proptest::collection::{hash_map, vec};
use proptest::option;
use proptest::prelude::*;
use tokio_util::codec::Decoder;

fn variant() -> impl Strategy<Value = Crc32Variant> {
    prop_oneof![Just(Crc32Variant::Ieee), Just(Crc32Variant::Castagnoli)]
}

fn settings(crc32: Crc32Variant) -> FrameSettings {
    FrameSettings {
        crc32,
        ..FrameSettings::DEFAULT
    }
}

fn text() -> impl Strategy<Value = String> {
    // Mostly ASCII, some multi-byte characters, lengths that cross the
    // one-byte varint boundary.
    prop_oneof![".{0,12}", "[a-z/._-]{100,200}"]
}

fn task() -> impl Strategy<Value = DetectionTask> {
    let filter = (
        vec(text(), 0..4),
        vec(any::<u32>(), 0..6),
        option::of(text()),
    )
        .prop_map(|(process_names, pids, executable_pattern)| ProcessFilter {
            process_names,
            pids,
            executable_pattern,
        });
    let hash_check =
        (text(), text(), text()).prop_map(|(expected_hash, hash_algorithm, executable_path)| {
            HashCheck {
                expected_hash,
                hash_algorithm,
                executable_path,
            }
        });
    (
        (
            text(),
            0..7i32,
            option::of(filter),
            option::of(hash_check),
            option::of(text()),
        ),
        (
            option::of(network_filter()),
            option::of(filesystem_filter()),
            option::of(performance_filter()),
        ),
    )
        .prop_map(
            |(
                (task_id, task_type, process_filter, hash_check, metadata),
                (network_filter, filesystem_filter, performance_filter),
            )| DetectionTask {
                task_id,
                task_type,
                process_filter,
                hash_check,
                metadata,
                network_filter,
                filesystem_filter,
                performance_filter,
            },
        )
}

fn network_filter() -> impl Strategy<Value = NetworkFilter> {
    (
        vec(text(), 0..3),
        vec(text(), 0..3),
        vec(text(), 0..3),
        vec(text(), 0..3),
    )
        .prop_map(
            |(protocols, source_addresses, destination_addresses, connection_states)| {
                NetworkFilter {
                    protocols,
                    source_addresses,
                    destination_addresses,
                    connection_states,
                }
            },
        )
}

fn filesystem_filter() -> impl Strategy<Value = FilesystemFilter> {
    (vec(text(), 0..3), vec(text(), 0..3), vec(text(), 0..3)).prop_map(
        |(path_patterns, operation_types, file_extensions)| FilesystemFilter {
            path_patterns,
            operation_types,
            file_extensions,
        },
    )
}

/// A finite double: NaN != NaN would fail the equality check, not the codec.
fn finite() -> impl Strategy<Value = f64> {
    -1e12f64..1e12
}

fn performance_filter() -> impl Strategy<Value = PerformanceFilter> {
    (
        vec(text(), 0..3),
        vec(text(), 0..3),
        hash_map(text(), finite(), 0..3),
        hash_map(text(), finite(), 0..3),
    )
        .prop_map(
            |(metric_names, components, min_thresholds, max_thresholds)| PerformanceFilter {
                metric_names,
                components,
                min_thresholds,
                max_thresholds,
            },
        )
}

fn network_record() -> impl Strategy<Value = NetworkRecord> {
    (
        (text(), text(), text(), text(), text()),
        (
            option::of(any::<u32>()),
            any::<u64>(),
            any::<u64>(),
            any::<i64>(),
        ),
    )
        .prop_map(
            |(
                (connection_id, source_address, destination_address, protocol, state),
                (pid, bytes_sent, bytes_received, collection_time),
            )| NetworkRecord {
                connection_id,
                source_address,
                destination_address,
                protocol,
                state,
                pid,
                bytes_sent,
                bytes_received,
                collection_time,
            },
        )
}

fn filesystem_record() -> impl Strategy<Value = FilesystemRecord> {
    (
        (text(), text(), text(), option::of(any::<u32>())),
        (
            option::of(any::<u64>()),
            option::of(text()),
            option::of(text()),
            any::<i64>(),
        ),
    )
        .prop_map(
            |(
                (operation_id, path, operation_type, pid),
                (file_size, permissions, file_hash, collection_time),
            )| FilesystemRecord {
                operation_id,
                path,
                operation_type,
                pid,
                file_size,
                permissions,
                file_hash,
                collection_time,
            },
        )
}

fn performance_record() -> impl Strategy<Value = PerformanceRecord> {
    (
        (text(), text(), finite(), text()),
        (option::of(any::<u32>()), text(), any::<i64>()),
    )
        .prop_map(
            |((metric_id, metric_name, value, unit), (pid, component, collection_time))| {
                PerformanceRecord {
                    metric_id,
                    metric_name,
                    value,
                    unit,
                    pid,
                    component,
                    collection_time,
                }
            },
        )
}

fn record() -> impl Strategy<Value = ProcessRecord> {
    (
        (
            any::<u32>(),
            option::of(any::<u32>()),
            text(),
            option::of(text()),
            vec(text(), 0..4),
        ),
        (
            option::of(any::<i64>()),
            option::of(finite()),
            option::of(any::<u64>()),
            option::of(text()),
            option::of(text()),
            option::of(text()),
        ),
        (
            any::<bool>(),
            any::<bool>(),
            any::<i64>(),
            option::of(text()),
            any::<bool>(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (pid, ppid, name, executable_path, command_line),
                (start_time, cpu_usage, memory_usage, executable_hash, hash_algorithm, user_id),
                (
                    accessible,
                    file_exists,
                    collection_time,
                    ssdeep_hash,
                    on_disk_mismatch,
                    ssdeep_degraded,
                ),
            )| ProcessRecord {
                pid,
                ppid,
                name,
                executable_path,
                command_line,
                start_time,
                cpu_usage,
                memory_usage,
                executable_hash,
                hash_algorithm,
                user_id,
                accessible,
                file_exists,
                collection_time,
                ssdeep_hash,
                on_disk_mismatch,
                ssdeep_degraded,
            },
        )
}

fn result() -> impl Strategy<Value = DetectionResult> {
    let hash_result = (text(), text(), text(), any::<bool>(), option::of(text())).prop_map(
        |(hash_value, algorithm, file_path, success, error_message)| HashResult {
            hash_value,
            algorithm,
            file_path,
            success,
            error_message,
        },
    );
    (
        (
            text(),
            any::<bool>(),
            option::of(text()),
            vec(record(), 0..4),
            option::of(hash_result),
        ),
        (
            vec(network_record(), 0..3),
            vec(filesystem_record(), 0..3),
            vec(performance_record(), 0..3),
        ),
    )
        .prop_map(
            |(
                (task_id, success, error_message, processes, hash_result),
                (network_events, filesystem_events, performance_events),
            )| DetectionResult {
                task_id,
                success,
                error_message,
                processes,
                hash_result,
                network_events,
                filesystem_events,
                performance_events,
            },
        )
}

fn frame_of<M: prost::Message>(message: &M, crc32: Crc32Variant) -> BytesMut {
    let mut wire = BytesMut::new();
    encode_message(message, settings(crc32), &mut wire).expect("fits in the default limit");
    wire
}

/// Decodes a complete byte stream the way a connection does: frame after
/// frame, then end of stream.
fn decode_stream<In: prost::Message + Default>(
    codec: &mut MessageCodec<(), In>,
    bytes: &[u8],
) -> Result<Vec<In>, IpcError> {
    let mut buf = BytesMut::from(bytes);
    let mut messages = Vec::new();
    while let Some(message) = codec.decode(&mut buf)? {
        messages.push(message);
    }
    while let Some(message) = codec.decode_eof(&mut buf)? {
        messages.push(message);
    }
    Ok(messages)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_task_round_trips(task in task(), crc32 in variant()) {
        let mut wire = frame_of(&task, crc32);
        let frame_len = wire.len();
        let decoded = ServerCodec::new(settings(crc32)).decode(&mut wire).unwrap();
        prop_assert_eq!(decoded, Some(task.clone()));
        prop_assert!(wire.is_empty());
        prop_assert_eq!(frame_len, HEADER_LEN + prost::Message::encoded_len(&task));
    }

    #[test]
    fn any_result_round_trips(result in result(), crc32 in variant()) {
        let mut wire = frame_of(&result, crc32);
        let decoded = ClientCodec::new(settings(crc32)).decode(&mut wire).unwrap();
        prop_assert_eq!(decoded, Some(result));
        prop_assert!(wire.is_empty());
    }

    #[test]
    fn any_single_bit_flip_is_detected(task in task(), crc32 in variant(), bit in any::<prop::sample::Index>()) {
        let mut wire = frame_of(&task, crc32).to_vec();
        let bit = bit.index(wire.len() * 8);
        wire[bit / 8] ^= 1 << (bit % 8);
        let outcome = decode_stream(&mut MessageCodec::<(), DetectionTask>::new(settings(crc32)), &wire);
        prop_assert!(outcome.is_err(), "flipping bit {} went unnoticed: {:?}", bit, outcome);
    }

    #[test]
    fn a_frame_fed_one_byte_at_a_time_decodes_the_same(task in task(), crc32 in variant()) {
        let wire = frame_of(&task, crc32);
        let mut codec = ServerCodec::new(settings(crc32));
        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        for byte in wire.iter() {
            buf.extend_from_slice(&[*byte]);
            decoded.extend(codec.decode(&mut buf).unwrap());
        }
        prop_assert_eq!(decoded, vec![task]);
    }

    #[test]
    fn back_to_back_frames_decode_in_order(tasks in vec(task(), 0..6), crc32 in variant()) {
        let mut wire = BytesMut::new();
        for task in &tasks {
            encode_message(task, settings(crc32), &mut wire).unwrap();
        }
        let decoded = decode_stream(&mut MessageCodec::<(), DetectionTask>::new(settings(crc32)), &wire).unwrap();
        prop_assert_eq!(decoded, tasks);
    }

    #[test]
    fn parts_decode_as_one_merged_message(task_id in text(), result in result(), crc32 in variant()) {
        // What the server sends for a shared result: the task's id, then the
        // shared body (which carries no id of its own).
        let shared = DetectionResult { task_id: String::new(), ..result };
        let head = DetectionResult { task_id: task_id.clone(), ..Default::default() };
        let mut wire = BytesMut::new();
        daemoneye_ipc::frame::encode_message_parts(&[&head, &shared], settings(crc32), &mut wire).unwrap();
        let decoded = ClientCodec::new(settings(crc32)).decode(&mut wire).unwrap().unwrap();
        prop_assert_eq!(decoded, DetectionResult { task_id, ..shared });
    }

    #[test]
    fn checksums_combine_as_if_computed_over_both(
        first in vec(any::<u8>(), 0..512),
        second in vec(any::<u8>(), 0..512),
        crc32 in variant(),
    ) {
        let whole = [first.as_slice(), second.as_slice()].concat();
        let combined = crc32.combine(crc32.checksum(&first), crc32.checksum(&second), second.len());
        prop_assert_eq!(combined, crc32.checksum(&whole));
    }

    #[test]
    fn a_tail_encoded_once_makes_the_same_frame_as_encoding_both_parts(
        task_id in text(),
        result in result(),
        // Both ways of checksumming the tail: read again (short) or
        // combined (long).
        padding in 0usize..6000,
        crc32 in variant(),
    ) {
        let shared = DetectionResult {
            task_id: String::new(),
            error_message: Some("p".repeat(padding)),
            ..result
        };
        let head = DetectionResult { task_id, ..Default::default() };
        let mut parts = BytesMut::new();
        daemoneye_ipc::frame::encode_message_parts(&[&head, &shared], settings(crc32), &mut parts).unwrap();
        let tail = prost::Message::encode_to_vec(&shared);
        let mut with_tail = BytesMut::new();
        daemoneye_ipc::frame::encode_message_with_tail(
            &head,
            &tail,
            crc32.checksum(&tail),
            settings(crc32),
            &mut with_tail,
        )
        .unwrap();
        prop_assert_eq!(with_tail, parts);
    }

    #[test]
    fn raw_bodies_round_trip(body in vec(any::<u8>(), 0..2048), crc32 in variant()) {
        let mut wire = BytesMut::new();
        encode_frame(&body, settings(crc32), &mut wire).unwrap();
        let decoded = FrameDecoder::new(settings(crc32)).decode(&mut wire).unwrap();
        prop_assert_eq!(decoded.as_deref(), Some(body.as_slice()));
    }

    /// Random bodies in valid frames (the right length and checksum), so
    /// that every one reaches protobuf decoding, in random chunks, into both
    /// codecs; some are real encodings, so that many decode. Each frame is
    /// a message that re-encodes and decodes to itself, or, at once and for
    /// that frame, a body that is not the message. (The test below rarely
    /// gets past the checksum with random bytes.)
    #[test]
    fn random_bodies_in_valid_frames_decode_to_messages_that_round_trip_or_are_refused(
        bodies in vec(
            prop_oneof![
                vec(any::<u8>(), 0..64),
                task().prop_map(|task| prost::Message::encode_to_vec(&task)),
                result().prop_map(|result| prost::Message::encode_to_vec(&result)),
            ],
            1..8,
        ),
        chunk in 1usize..64,
        crc32 in variant(),
    ) {
        let settings = FrameSettings {
            crc32,
            max_frame_bytes: u32::MAX,
        };
        let mut bytes = BytesMut::new();
        for body in &bodies {
            encode_frame(body, settings, &mut bytes).unwrap();
        }
        let tasks = outcomes(ServerCodec::new(settings), &bytes, chunk);
        let results = outcomes(ClientCodec::new(settings), &bytes, chunk);
        for (decoded, reencode, error) in [
            (tasks.0.len(), tasks.0.iter().all(|task| reencoded(task, settings)), tasks.1),
            (results.0.len(), results.0.iter().all(|result| reencoded(result, settings)), results.1),
        ] {
            prop_assert!(reencode, "a message changed on its way back");
            match error {
                None => prop_assert_eq!(decoded, bodies.len(), "every frame a message"),
                Some(IpcError::MalformedMessage { length, .. }) => {
                    prop_assert_eq!(length, bodies[decoded].len(), "the frame that failed is named");
                }
                Some(other) => prop_assert!(false, "a valid frame gave {other:?}"),
            }
        }
    }

    /// Random bytes, in random chunks, into both codecs: whatever comes out
    /// is one of the documented outcomes. A message that decodes re-encodes
    /// and decodes to itself; an error is a header over the limit (which is
    /// over it), a checksum mismatch, a body that is not the message, or
    /// (at the end) a stream cut inside a frame; after an error the stream
    /// is not read again.
    #[test]
    fn random_bytes_give_only_documented_outcomes(
        bytes in vec(any::<u8>(), 0..4096),
        chunk in 1usize..64,
        max_frame_bytes in prop_oneof![Just(0u32), 1u32..512, Just(u32::MAX)],
        crc32 in variant(),
    ) {
        let settings = FrameSettings { crc32, max_frame_bytes };
        let tasks = outcomes(ServerCodec::new(settings), &bytes, chunk);
        let results = outcomes(ClientCodec::new(settings), &bytes, chunk);
        for (messages, error) in [
            (tasks.0.iter().map(|task| reencoded(task, settings)).collect::<Vec<bool>>(), tasks.1),
            (results.0.iter().map(|result| reencoded(result, settings)).collect(), results.1),
        ] {
            prop_assert!(messages.iter().all(|&same| same), "a message changed on its way back");
            match error {
                None => {}
                Some(IpcError::FrameTooLarge { length, limit }) => {
                    prop_assert!(length > limit);
                    prop_assert_eq!(limit, max_frame_bytes);
                }
                Some(IpcError::ChecksumMismatch { variant, .. }) => prop_assert_eq!(variant, crc32),
                Some(IpcError::MalformedMessage { .. }) | Some(IpcError::TruncatedFrame { .. }) => {}
                Some(other) => prop_assert!(false, "an undocumented error: {other:?}"),
            }
        }
    }
}

/// Everything a codec makes of `bytes` fed in chunks: the messages, then the
/// error that ended the stream, if one did.
fn outcomes<In: prost::Message + Default, Out>(
    mut codec: MessageCodec<Out, In>,
    bytes: &[u8],
    chunk: usize,
) -> (Vec<In>, Option<IpcError>) {
    let mut buf = BytesMut::new();
    let mut messages = Vec::new();
    for piece in bytes.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(message)) => messages.push(message),
                Ok(None) => break,
                Err(error) => return (messages, Some(error)),
            }
        }
    }
    match codec.decode_eof(&mut buf) {
        Ok(Some(message)) => messages.push(message),
        Ok(None) => {}
        Err(error) => return (messages, Some(error)),
    }
    (messages, None)
}

/// Whether `message` survives encoding and decoding unchanged.
fn reencoded<M: prost::Message + Default + PartialEq>(
    message: &M,
    settings: FrameSettings,
) -> bool {
    let mut wire = BytesMut::new();
    encode_message(
        message,
        FrameSettings {
            max_frame_bytes: u32::MAX,
            ..settings
        },
        &mut wire,
    )
    .unwrap();
    let mut decoder = FrameDecoder::new(FrameSettings {
        max_frame_bytes: u32::MAX,
        ..settings
    });
    let body = decoder.decode(&mut wire).unwrap().unwrap();
    M::decode(&body[..]).unwrap() == *message
}

proptest! {
    // Each case decodes its frame once per byte boundary (thousands of
    // decodes), so fewer cases cover it; the slowest test under emulation.
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn a_frame_split_at_any_byte_decodes_the_same(result in result(), crc32 in variant()) {
        let wire = frame_of(&result, crc32);
        for split in 0..=wire.len() {
            let mut codec = ClientCodec::new(settings(crc32));
            let mut buf = BytesMut::from(&wire[..split]);
            let first = codec.decode(&mut buf).unwrap();
            if split < wire.len() {
                prop_assert_eq!(first, None, "incomplete at {}", split);
                buf.extend_from_slice(&wire[split..]);
                prop_assert_eq!(codec.decode(&mut buf).unwrap(), Some(result.clone()), "split at {}", split);
            } else {
                prop_assert_eq!(first, Some(result.clone()));
            }
            prop_assert!(buf.is_empty());
        }
    }
}
