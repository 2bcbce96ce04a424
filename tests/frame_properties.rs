//! Property tests of the frame core and the message codecs.

use bytes::BytesMut;
use daemoneye_ipc::frame::codec::{ClientCodec, MessageCodec, ServerCodec};
use daemoneye_ipc::frame::{FrameDecoder, FrameSettings, HEADER_LEN, encode_frame, encode_message};
use daemoneye_ipc::proto::{HashCheck, HashResult, ProcessFilter};
use daemoneye_ipc::{Crc32Variant, DetectionResult, DetectionTask, IpcError, ProcessRecord};
use proptest::collection::vec;
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
        text(),
        0..7i32,
        option::of(filter),
        option::of(hash_check),
        option::of(text()),
    )
        .prop_map(
            |(task_id, task_type, process_filter, hash_check, metadata)| DetectionTask {
                task_id,
                task_type,
                process_filter,
                hash_check,
                metadata,
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
            // Not NaN: NaN != NaN would fail the equality check, not the codec.
            option::of(-1e12f64..1e12),
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
        text(),
        any::<bool>(),
        option::of(text()),
        vec(record(), 0..4),
        option::of(hash_result),
    )
        .prop_map(
            |(task_id, success, error_message, processes, hash_result)| DetectionResult {
                task_id,
                success,
                error_message,
                processes,
                hash_result,
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
    fn raw_bodies_round_trip(body in vec(any::<u8>(), 0..2048), crc32 in variant()) {
        let mut wire = BytesMut::new();
        encode_frame(&body, settings(crc32), &mut wire).unwrap();
        let decoded = FrameDecoder::new(settings(crc32)).decode(&mut wire).unwrap();
        prop_assert_eq!(decoded.as_deref(), Some(body.as_slice()));
    }

    #[test]
    fn random_bytes_never_panic(
        bytes in vec(any::<u8>(), 0..4096),
        chunk in 1usize..64,
        max_frame_bytes in prop_oneof![Just(0u32), 1u32..512, Just(u32::MAX)],
        crc32 in variant(),
    ) {
        let settings = FrameSettings { crc32, max_frame_bytes };
        let mut tasks = ServerCodec::new(settings);
        let mut results = ClientCodec::new(settings);
        let (mut task_buf, mut result_buf) = (BytesMut::new(), BytesMut::new());
        let (mut task_failed, mut result_failed) = (false, false);
        for piece in bytes.chunks(chunk) {
            task_buf.extend_from_slice(piece);
            result_buf.extend_from_slice(piece);
            while !task_failed {
                match tasks.decode(&mut task_buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(_) => task_failed = true,
                }
            }
            while !result_failed {
                match results.decode(&mut result_buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(_) => result_failed = true,
                }
            }
        }
        if !task_failed {
            let _ = tasks.decode_eof(&mut task_buf);
        }
        if !result_failed {
            let _ = results.decode_eof(&mut result_buf);
        }
    }
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
