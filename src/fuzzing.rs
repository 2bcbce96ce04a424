//! Harnesses for the fuzz targets in `fuzz/` (cargo-fuzz, libFuzzer),
//! compiled only with `--cfg fuzzing`, which cargo-fuzz sets. Each takes
//! arbitrary bytes, drives one part of the crate with them, and checks that
//! part's invariants, not only that nothing panics: a broken invariant is a
//! panic, which the fuzzer reports with the input that caused it.

#![allow(missing_docs)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::config::{ConfigField, ConfigLoader};
use crate::error::IpcError;
use crate::frame::codec::decode_message;
use crate::frame::{
    Crc32Variant, FrameDecoder, FrameSettings, HEADER_LEN, encode_frame, encode_message,
};
use crate::policy::budget::Budget;
use crate::policy::client::{ClientConnection, Outcome, Refusal};
use crate::policy::inbound::Inbound;
use crate::policy::server::{ConnectionLimits, Reply, ServerConnection, ServerEvent};
use crate::proto::{DetectionResult, DetectionTask, ProcessRecord};
use crate::telemetry::Counters;

/// Reads the fuzzer's bytes as a little program; past the end, zeros.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        let Some((&first, rest)) = self.data.split_first() else {
            return 0;
        };
        self.data = rest;
        first
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn take(&mut self, count: usize) -> &'a [u8] {
        let (taken, rest) = self.data.split_at(count.min(self.data.len()));
        self.data = rest;
        taken
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// A small string: a length byte, then that many bytes (lossy UTF-8).
    fn string(&mut self) -> String {
        let length = usize::from(self.byte() % 32);
        String::from_utf8_lossy(self.take(length)).into_owned()
    }

    fn settings(&mut self) -> FrameSettings {
        let flags = self.byte();
        FrameSettings {
            crc32: if flags & 1 == 0 {
                Crc32Variant::Ieee
            } else {
                Crc32Variant::Castagnoli
            },
            max_frame_bytes: if flags & 2 == 0 {
                1024
            } else {
                FrameSettings::DEFAULT.max_frame_bytes
            },
        }
    }
}

/// The frame decoder, fed an arbitrary byte stream in arbitrary chunks with
/// either CRC and a small or the default limit.
///
/// * Every frame decoded re-encodes to exactly the bytes it came from.
/// * Bytes held between frames are less than one frame can be (header plus
///   `max_frame_bytes`): nothing accumulates toward what a header claims.
/// * Every error is a documented one: a header over the limit (which is
///   over the limit), a checksum mismatch, or a stream cut inside a frame.
pub fn frame_stream(data: &[u8]) {
    let mut input = Input { data };
    let settings = input.settings();
    let max = settings.max_frame_bytes as usize;
    let mut decoder = FrameDecoder::new(settings);
    let mut stream = Vec::new();
    let mut buf = BytesMut::new();
    let mut consumed = 0;
    let mut frame_start = 0;
    loop {
        let length = usize::from(input_chunk(&mut input));
        let chunk = input.take(length);
        let end = chunk.is_empty() && input.is_empty();
        stream.extend_from_slice(chunk);
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            let decoded = if end {
                decoder.decode_eof(&mut buf)
            } else {
                decoder.decode(&mut buf)
            };
            consumed += before - buf.len();
            match decoded {
                Ok(Some(body)) => {
                    assert!(body.len() <= max, "a body over the limit was accepted");
                    let mut again = BytesMut::new();
                    encode_frame(&body, settings, &mut again).expect("within the limit");
                    assert_eq!(
                        &again[..],
                        &stream[frame_start..consumed],
                        "a decoded frame re-encodes to its own bytes"
                    );
                    frame_start = consumed;
                }
                Ok(None) => {
                    assert!(
                        buf.len() < HEADER_LEN + max,
                        "{} bytes held between reads, over one frame",
                        buf.len()
                    );
                    break;
                }
                Err(IpcError::FrameTooLarge { length, limit }) => {
                    assert!(length > limit && limit as usize == max);
                    return;
                }
                Err(IpcError::ChecksumMismatch { variant, .. }) => {
                    assert_eq!(variant, settings.crc32);
                    return;
                }
                Err(IpcError::TruncatedFrame { received, expected }) if end => {
                    assert!(received < expected);
                    return;
                }
                Err(other) => panic!("an undocumented error from the decoder: {other:?}"),
            }
        }
        if end {
            return;
        }
    }
}

/// How long the next chunk is: mostly short, sometimes a few KiB.
fn input_chunk(input: &mut Input<'_>) -> u16 {
    match input.byte() {
        selector @ 0..=223 => u16::from(selector % 32),
        _ => input.u16() % 8192,
    }
}

/// Typed decoding of `DetectionTask` and `DetectionResult` from frames whose
/// checksum is valid, so protobuf decoding is reached: every body either
/// decodes, and then re-encodes and decodes to the same message, or is a
/// `MalformedMessage` naming the type.
pub fn typed_messages(data: &[u8]) {
    let mut input = Input { data };
    let settings = FrameSettings {
        max_frame_bytes: FrameSettings::DEFAULT.max_frame_bytes,
        ..input.settings()
    };
    let as_result = input.byte() & 1 == 1;
    let body = input.take(usize::MAX);
    let mut wire = BytesMut::new();
    encode_frame(body, settings, &mut wire).expect("a fuzz input fits in a frame");
    if as_result {
        views_agree_with_plain_results(body);
        round_trip::<DetectionResult>(wire, settings, "DetectionResult");
    } else {
        round_trip::<DetectionTask>(wire, settings, "DetectionTask");
    }
}

/// A body the plain `DetectionResult` decodes, its view decodes too, to the
/// same fields (compared by their encodings, identical for `string` and
/// `bytes`); and the text of every view field is the plain string's.
fn views_agree_with_plain_results(body: &[u8]) {
    use prost::Message;
    let Ok(plain) = DetectionResult::decode(body) else {
        return;
    };
    let view = crate::view::DetectionResult::decode(bytes::Bytes::copy_from_slice(body))
        .expect("what the plain type decodes, the view decodes");
    assert_eq!(
        view.encode_to_vec(),
        plain.encode_to_vec(),
        "the same fields"
    );
    assert_eq!(
        crate::view::text(&view.task_id).ok(),
        Some(plain.task_id.as_str())
    );
}

fn round_trip<M: prost::Message + Default>(
    mut wire: BytesMut,
    settings: FrameSettings,
    name: &str,
) {
    let mut inbound = Inbound::<M>::new(settings, Duration::from_secs(1));
    let now = Instant::now();
    inbound.read_buffer().extend_from_slice(&wire);
    inbound.on_read(wire.len(), now);
    match inbound.next_message(now) {
        Ok(Some((message, size))) => {
            assert_eq!(size, wire.len());
            wire.clear();
            encode_message(&message, settings, &mut wire).expect("it fitted before");
            let body = &wire[HEADER_LEN..];
            let again: M = decode_message(body).expect("a message we encoded decodes");
            // Compared by encoding: a NaN (cpu_usage) is not equal to itself,
            // but it encodes to the same bits.
            assert_eq!(
                again.encode_to_vec(),
                body,
                "a message survives a round trip"
            );
        }
        Err(IpcError::MalformedMessage { message_type, .. }) => assert_eq!(message_type, name),
        Err(other) => panic!("a whole frame with a valid checksum gave {other:?}"),
        Ok(None) => panic!("a whole frame with a valid checksum was not decoded"),
    }
}

/// The configuration loader, fed an arbitrary TOML file and environment:
/// it never panics; an error is one line; what it accepts is valid and
/// prints as a file that loads back to the same settings.
pub fn config_loader(data: &[u8]) {
    let mut input = Input { data };
    let mut env = Vec::new();
    for _ in 0..(input.byte() % 4) {
        let field = ConfigField::ALL[usize::from(input.byte()) % ConfigField::ALL.len()];
        env.push((field.env_var(), input.string()));
    }
    let text = String::from_utf8_lossy(input.take(usize::MAX)).into_owned();
    let path = std::path::PathBuf::from("fuzz.toml");
    let loaded = ConfigLoader::new()
        .env(env.clone())
        .load_with_file_text(Some((path.clone(), text)));
    match loaded {
        Ok(loaded) => {
            loaded.config.validate().expect("what was loaded is valid");
            let printed = loaded.to_annotated_toml();
            let reloaded = ConfigLoader::new()
                .load_with_file_text(Some((path, printed.clone())))
                .unwrap_or_else(|error| {
                    panic!("the printed config does not load: {error}\n{printed}")
                });
            assert_eq!(
                reloaded.config, loaded.config,
                "printed and loaded back:\n{printed}"
            );
        }
        Err(error) => {
            let message = error.to_string();
            assert!(
                !message.contains('\n'),
                "an error of more than one line: {message}"
            );
        }
    }
}

/// The server's per-connection policy core, fed an arbitrary sequence of
/// events (task frames, raw bytes, handlers finishing or panicking, partial
/// writes, time passing, the peer leaving, a graceful stop):
///
/// * no more than `max_in_flight` tasks are in flight, and none is started
///   twice;
/// * the output is always whole result frames, each answering a task that
///   was started, at most once;
/// * once closed, it asks for nothing more;
/// * the budget is never exceeded, and all it held is given back.
pub fn server_connection(data: &[u8]) {
    let mut input = Input { data };
    let max_in_flight = usize::from(input.byte() % 8) + 1;
    let limits = ConnectionLimits {
        settings: FrameSettings {
            max_frame_bytes: 4096,
            ..input.settings()
        },
        read_timeout: Duration::from_millis(u64::from(input.byte()) + 1),
        write_timeout: Duration::from_millis(u64::from(input.byte()) + 1),
        task_timeout: Duration::from_millis(u64::from(input.byte()) + 1),
        max_in_flight,
    };
    // The budget as a driver carries it: the least a server accepts, or
    // more.
    let limit = limits.largest_reservation() + usize::from(input.u16());
    let mut budget = Budget::new(limit);
    let counters = Arc::new(Counters::default());
    let mut now = Instant::now();
    let mut connection = ServerConnection::new(limits, counters, Arc::default(), now);
    let mut running: Vec<u64> = Vec::new();
    let mut started: HashMap<u64, String> = HashMap::new();
    let mut answered: HashSet<u64> = HashSet::new();
    let mut written = BytesMut::new();
    let mut results = FrameDecoder::new(limits.settings);
    let mut closed = false;

    while !input.is_empty() {
        match input.byte() % 7 {
            0 => {
                let task = DetectionTask {
                    task_id: input.string(),
                    ..Default::default()
                };
                let mut frame = BytesMut::new();
                encode_message(&task, limits.settings, &mut frame).expect("small");
                let cut = usize::from(input.byte()).min(frame.len());
                for part in [&frame[..cut], &frame[cut..]] {
                    connection.read_buffer().extend_from_slice(part);
                    connection.on_read(part.len(), now);
                }
            }
            1 => {
                let length = usize::from(input.byte());
                let bytes = input.take(length);
                connection.read_buffer().extend_from_slice(bytes);
                connection.on_read(bytes.len(), now);
            }
            2 if !running.is_empty() => {
                let ticket = running.remove(usize::from(input.byte()) % running.len());
                let outcome = match input.byte() % 4 {
                    0 => Err("panicked: fuzz".to_owned()),
                    1 => Ok(Reply::Shared(Arc::new(DetectionResult {
                        success: true,
                        ..Default::default()
                    }))),
                    size => Ok(Reply::Owned(DetectionResult {
                        task_id: "handler's own id".into(),
                        processes: vec![ProcessRecord::default(); usize::from(size) * 100],
                        ..Default::default()
                    })),
                };
                connection.task_finished(ticket, outcome, now);
            }
            3 => {
                let pending = connection.pending_output();
                let count = usize::from(input.u16()).min(pending.len());
                written.extend_from_slice(&pending[..count]);
                connection.on_written(count, now);
            }
            4 => {
                now += Duration::from_millis(u64::from(input.byte()));
                connection.handle_timeout(now);
            }
            5 => connection.on_eof(now),
            _ => connection.stop_reading(now),
        }
        loop {
            budget.release(connection.take_released());
            if let Some(bytes) = connection.budget_request()
                && budget.request(1, bytes)
            {
                connection.on_granted(bytes, now);
                continue;
            }
            match budget.poll_grant() {
                Some((_, bytes)) => connection.on_granted(bytes, now),
                None => break,
            }
        }
        assert!(budget.held() <= limit, "over the budget");
        while let Some(event) = connection.poll_event() {
            assert!(!closed, "an event after the connection closed");
            match event {
                ServerEvent::StartTask { ticket, task } => {
                    assert!(
                        started.insert(ticket, task.task_id).is_none(),
                        "started twice"
                    );
                    running.push(ticket);
                }
                ServerEvent::CancelTask { ticket } => running.retain(|&running| running != ticket),
            }
        }
        assert!(
            connection.in_flight() <= max_in_flight,
            "over the in-flight limit"
        );
        // Whatever was written is whole result frames, each for a task
        // started, none twice.
        while let Some(body) = results
            .decode(&mut written)
            .expect("the server writes valid frames")
        {
            let result: DetectionResult = decode_message(&body).expect("a DetectionResult");
            let ticket = started
                .iter()
                .find(|(ticket, id)| **id == result.task_id && !answered.contains(ticket))
                .map(|(ticket, _)| *ticket)
                .unwrap_or_else(|| panic!("an answer to no task in flight: {:?}", result.task_id));
            answered.insert(ticket);
        }
        if connection.poll_close().is_some() {
            assert!(!closed, "closed twice");
            closed = true;
        }
        if closed {
            assert!(!connection.wants_read() && connection.poll_timeout().is_none());
        }
    }
    budget.release(connection.release_all());
    assert_eq!(budget.held(), 0, "every byte held is given back");
}

/// The client's per-connection policy core, fed arbitrary tasks, tasks
/// given up on, result frames (for tasks sent or not, repeated, or
/// garbled), writes, time and the server leaving:
///
/// * each caller gets at most one outcome, and an answer only ever carries
///   its own task's id;
/// * no more than `max_in_flight` tasks are outstanding;
/// * once closed, every caller still waiting has been told.
pub fn client_connection(data: &[u8]) {
    let mut input = Input { data };
    let max_in_flight = usize::from(input.byte() % 8) + 1;
    let settings = FrameSettings {
        max_frame_bytes: 4096,
        ..input.settings()
    };
    let mut now = Instant::now();
    let timeout = Duration::from_millis(u64::from(input.byte()) + 1);
    let mut connection =
        ClientConnection::<u32>::new(settings, timeout, timeout, max_in_flight, now);
    let mut next_caller = 0u32;
    // Callers waiting: caller -> (task id, ticket).
    let mut waiting: HashMap<u32, (String, u64)> = HashMap::new();
    let mut told: HashSet<u32> = HashSet::new();

    while !input.is_empty() {
        match input.byte() % 7 {
            0 => {
                let task = DetectionTask {
                    task_id: format!("t{}", input.byte() % 16),
                    ..Default::default()
                };
                next_caller += 1;
                match connection.begin(&task, next_caller, now + timeout, now) {
                    Ok(ticket) => {
                        waiting.insert(next_caller, (task.task_id, ticket));
                    }
                    Err((Refusal::Closed | Refusal::Duplicate | Refusal::Full, caller)) => {
                        assert_eq!(caller, next_caller);
                    }
                    Err((Refusal::TooLarge(error), _)) => panic!("a small task refused: {error}"),
                }
            }
            1 if !waiting.is_empty() => {
                let callers: Vec<u32> = waiting.keys().copied().collect();
                let caller = callers[usize::from(input.byte()) % callers.len()];
                let (task_id, ticket) = waiting.remove(&caller).expect("listed");
                connection.abandon(&task_id, ticket);
            }
            2 => {
                let result = DetectionResult {
                    task_id: format!("t{}", input.byte() % 16),
                    success: true,
                    ..Default::default()
                };
                let mut frame = BytesMut::new();
                encode_message(&result, settings, &mut frame).expect("small");
                connection.read_buffer().extend_from_slice(&frame);
                connection.on_read(frame.len(), now);
            }
            3 => {
                let length = usize::from(input.byte());
                let bytes = input.take(length);
                connection.read_buffer().extend_from_slice(bytes);
                connection.on_read(bytes.len(), now);
            }
            4 => {
                let count = usize::from(input.u16()).min(connection.pending_output().len());
                connection.on_written(count, now);
            }
            5 => {
                now += Duration::from_millis(u64::from(input.byte()));
                connection.handle_timeout(now);
            }
            _ if input.byte() % 2 == 0 => connection.on_eof(now),
            _ => connection.retire(),
        }
        assert!(
            connection.in_flight() <= max_in_flight,
            "over the in-flight limit"
        );
        for delivery in connection.take_deliveries() {
            assert!(told.insert(delivery.waiter), "a caller told twice");
            let (task_id, _) = waiting
                .remove(&delivery.waiter)
                .expect("only a waiting caller is told");
            if let Outcome::Answered(body) = delivery.outcome {
                // The connection read the id; the caller decodes the rest,
                // here as a view, which does not check the text of other
                // fields (only a nested message that is not one fails).
                if let Ok(result) = <crate::view::DetectionResult as prost::Message>::decode(body) {
                    assert_eq!(
                        result.task_id,
                        task_id.as_bytes(),
                        "an answer for another task"
                    );
                }
            }
        }
        if connection.closed_reason().is_some() {
            assert!(waiting.is_empty(), "closed with callers never told");
        }
    }
}
