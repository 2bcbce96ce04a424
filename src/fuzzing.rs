//! Harnesses for the fuzz targets in `fuzz/` (cargo-fuzz, libFuzzer),
//! compiled with `--cfg fuzzing`, which cargo-fuzz sets, and in the unit
//! tests, which replay every input kept in `fuzz/regressions/` and a few
//! thousand seeded random ones on stable Rust. Each takes
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
use crate::proto::{DetectionResult, DetectionTask};
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

fn round_trip<M: prost::Message + Default + Comparable>(
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
            assert_eq!(
                again.comparable(),
                message.comparable(),
                "a message survives a round trip"
            );
        }
        Err(IpcError::MalformedMessage { message_type, .. }) => assert_eq!(message_type, name),
        Err(other) => panic!("a whole frame with a valid checksum gave {other:?}"),
        Ok(None) => panic!("a whole frame with a valid checksum was not decoded"),
    }
}

/// A message as the round trip compares it: by its encoding, since a NaN
/// (a `cpu_usage`, a threshold) is not equal to itself but encodes to the
/// same bits; with map entries apart and sorted, since a map goes out in
/// its `HashMap`'s order, which two maps with the same entries need not
/// share.
trait Comparable {
    fn comparable(&self) -> (Vec<u8>, Vec<(String, u64)>);
}

impl Comparable for DetectionResult {
    fn comparable(&self) -> (Vec<u8>, Vec<(String, u64)>) {
        (prost::Message::encode_to_vec(self), Vec::new())
    }
}

impl Comparable for DetectionTask {
    fn comparable(&self) -> (Vec<u8>, Vec<(String, u64)>) {
        let mut bare = self.clone();
        let mut entries = Vec::new();
        if let Some(filter) = &mut bare.performance_filter {
            for (bound, map) in [
                ("min", &mut filter.min_thresholds),
                ("max", &mut filter.max_thresholds),
            ] {
                entries.extend(
                    map.drain()
                        .map(|(key, value)| (format!("{bound} {key}"), value.to_bits())),
                );
            }
        }
        entries.sort_unstable();
        (prost::Message::encode_to_vec(&bare), entries)
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
/// events (task frames, raw bytes, handlers finishing or panicking with
/// results from nothing to over `max_frame_bytes`, partial writes, time
/// passing, the peer leaving, a graceful stop), with the budget carried as
/// a driver carries it:
///
/// * no more than `max_in_flight` tasks are in flight, and none is started
///   twice;
/// * the output is always whole result frames, each answering a task that
///   was started, at most once; or, when the connection's first frame was
///   checksummed with the other CRC-32 variant, one notice framed in that
///   variant and nothing after it, and the connection ends with the
///   mismatch;
/// * once closed, it asks for nothing more;
/// * the budget is never exceeded, and all it held is given back;
/// * in the end, once time has run past every deadline and everything is
///   written, every task started was answered, or the connection closed
///   with an error.
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
    // The budget: the least a server accepts, or more.
    let limit = limits.largest_reservation() + usize::from(input.u16());
    let now = Instant::now();
    let mut served = Served {
        connection: ServerConnection::new(
            limits,
            Arc::new(Counters::default()),
            Arc::default(),
            now,
        ),
        budget: Budget::new(limit),
        limit,
        max_in_flight,
        now,
        running: Vec::new(),
        started: HashMap::new(),
        answered: HashSet::new(),
        written: BytesMut::new(),
        results: FrameDecoder::new(limits.settings),
        told_other_variant: false,
        closed: None,
    };

    while !input.is_empty() {
        let connection = &mut served.connection;
        let now = served.now;
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
                let length = usize::from(input.byte()).min(connection.read_window());
                let bytes = input.take(length);
                connection.read_buffer().extend_from_slice(bytes);
                connection.on_read(bytes.len(), now);
            }
            2 if !served.running.is_empty() => {
                let index = usize::from(input.byte()) % served.running.len();
                let ticket = served.running.remove(index);
                let outcome = match input.byte() % 4 {
                    0 => Err("panicked: fuzz".to_owned()),
                    1 => Ok(Reply::Shared(Arc::new(DetectionResult {
                        success: true,
                        ..Default::default()
                    }))),
                    // Up to twice the frame limit: the oversize answer too.
                    _ => Ok(Reply::Owned(crate::sample::detection_result(
                        "handler's own id",
                        usize::from(input.u16() % 8192),
                    ))),
                };
                connection.task_finished(ticket, outcome, now);
            }
            3 => {
                let count = usize::from(input.u16());
                served.write(count);
            }
            4 => {
                served.now += Duration::from_millis(u64::from(input.byte()));
                let now = served.now;
                served.connection.handle_timeout(now);
            }
            5 => connection.on_eof(now),
            _ => connection.stop_reading(now),
        }
        served.settle();
    }

    // The end: time runs past every deadline, handlers that never finish
    // are stopped and answered, everything is written, frames waiting for
    // room are taken, until the connection closes (at the latest when it
    // has sat idle for read_timeout).
    let longest = limits
        .read_timeout
        .max(limits.write_timeout)
        .max(limits.task_timeout);
    let mut rounds = 0;
    while served.closed.is_none() {
        rounds += 1;
        assert!(rounds < 100_000, "the connection never settles");
        served.write(usize::MAX);
        served.now += longest + Duration::from_millis(1);
        let now = served.now;
        served.connection.handle_timeout(now);
        served.settle();
    }
    // Closing for idleness is an error, but one that may only come with
    // nothing in flight: it excuses nothing.
    let failed = matches!(
        served.closed,
        Some(Err(ref error)) if !matches!(error, IpcError::ReadTimeout { received: 0, .. })
    );
    if !failed {
        let unanswered: Vec<&String> = served
            .started
            .iter()
            .filter(|(ticket, _)| !served.answered.contains(ticket))
            .map(|(_, id)| id)
            .collect();
        assert!(
            unanswered.is_empty(),
            "tasks never answered, on a connection not closed with an error: {unanswered:?}"
        );
    }
    served.budget.release(served.connection.release_all());
    assert_eq!(served.budget.held(), 0, "every byte held is given back");
}

/// A server connection as the fuzzer drives it, and what it has seen.
struct Served {
    connection: ServerConnection,
    budget: Budget,
    limit: usize,
    max_in_flight: usize,
    now: Instant,
    running: Vec<u64>,
    started: HashMap<u64, String>,
    answered: HashSet<u64>,
    written: BytesMut,
    results: FrameDecoder,
    /// Whether the server told the peer, in the peer's own variant, that
    /// their CRC-32 variants differ.
    told_other_variant: bool,
    /// How the connection ended, once it has.
    closed: Option<Result<(), IpcError>>,
}

impl Served {
    /// Writes up to `count` bytes of the output.
    fn write(&mut self, count: usize) {
        let pending = self.connection.pending_output();
        let count = count.min(pending.len());
        self.written.extend_from_slice(&pending[..count]);
        self.connection.on_written(count, self.now);
        self.settle();
    }

    /// Carries the budget, takes the events, and checks the invariants.
    fn settle(&mut self) {
        let now = self.now;
        loop {
            self.budget.release(self.connection.take_released());
            if let Some(bytes) = self.connection.budget_request()
                && self.budget.request(1, bytes)
            {
                self.connection.on_granted(bytes, now);
                continue;
            }
            match self.budget.poll_grant() {
                Some((_, bytes)) => self.connection.on_granted(bytes, now),
                None => break,
            }
        }
        assert!(self.budget.held() <= self.limit, "over the budget");
        while let Some(event) = self.connection.poll_event() {
            assert!(
                self.closed.is_none(),
                "an event after the connection closed"
            );
            match event {
                ServerEvent::StartTask { ticket, task } => {
                    assert!(
                        self.started.insert(ticket, task.task_id).is_none(),
                        "started twice"
                    );
                    self.running.push(ticket);
                }
                ServerEvent::CancelTask { ticket } => {
                    self.running.retain(|&running| running != ticket)
                }
            }
        }
        assert!(
            self.connection.in_flight() <= self.max_in_flight,
            "over the in-flight limit"
        );
        // Whatever was written is whole result frames, each for a task
        // started, none twice; or the one notice about the checksum variant.
        loop {
            assert!(
                !self.told_other_variant || self.written.is_empty(),
                "output after the notice about the checksum variant"
            );
            // The notice can only be the first frame: keep it whole until
            // one has been read. The decoder keeps a header it has read
            // apart from the buffer, so the first frame is decoded only once
            // all of it has been written (the server writes in pieces).
            let first = self.answered.is_empty().then(|| self.written.clone());
            if first.is_some() && !whole_frame(&self.written) {
                break;
            }
            let body = match self.results.decode(&mut self.written) {
                Ok(Some(body)) => body,
                Ok(None) => break,
                Err(IpcError::ChecksumMismatch {
                    peer_variant: Some(theirs),
                    ..
                }) if first.is_some() => {
                    self.read_variant_notice(first.unwrap(), theirs);
                    continue;
                }
                Err(error) => panic!("the server writes valid frames: {error:?}"),
            };
            let result: DetectionResult = decode_message(&body).expect("a DetectionResult");
            let ticket = self
                .started
                .iter()
                .find(|(ticket, id)| **id == result.task_id && !self.answered.contains(ticket))
                .map(|(ticket, _)| *ticket)
                .unwrap_or_else(|| panic!("an answer to no task in flight: {:?}", result.task_id));
            self.answered.insert(ticket);
        }
        if let Some(outcome) = self.connection.poll_close() {
            assert!(self.closed.is_none(), "closed twice");
            self.closed = Some(outcome);
        }
        if self.closed.is_some() {
            assert!(
                !self.connection.wants_read() && self.connection.poll_timeout().is_none(),
                "a closed connection asks for nothing"
            );
        }
        if self.told_other_variant
            && let Some(outcome) = &self.closed
        {
            assert!(
                matches!(outcome, Err(IpcError::ChecksumMismatch { .. })),
                "after the notice the connection ends with the mismatch: {outcome:?}"
            );
        }
    }

    /// Reads the notice a server writes, framed in the peer's variant
    /// `theirs`, when the connection's first frame was checksummed with it:
    /// an error result naming both variants, before any task was started.
    fn read_variant_notice(&mut self, mut written: BytesMut, theirs: Crc32Variant) {
        assert!(
            self.started.is_empty(),
            "a frame in another checksum variant after tasks were started"
        );
        let mut decoder = FrameDecoder::new(FrameSettings {
            crc32: theirs,
            ..self.results.settings()
        });
        let body = decoder
            .decode(&mut written)
            .expect("the notice is framed in the peer's variant")
            .expect("the notice is whole");
        let notice: DetectionResult = decode_message(&body).expect("a DetectionResult");
        assert!(
            !notice.success
                && notice.task_id.is_empty()
                && notice
                    .error_message
                    .as_deref()
                    .is_some_and(|message| message.contains("crc32_variant")),
            "the notice names the setting: {notice:?}"
        );
        self.written = written;
        self.told_other_variant = true;
    }
}

/// The client's per-connection policy core, fed arbitrary tasks, tasks
/// given up on, result frames (for tasks sent or not, repeated, or
/// garbled), writes, time and the server leaving:
///
/// * each caller gets at most one outcome, and an answer only ever carries
///   its own task's id;
/// * no more than `max_in_flight` tasks are outstanding;
/// * once closed, every caller still waiting has been told;
/// * in the end, once time has run past every deadline and the server has
///   gone, every caller was answered or told why not (none is told after
///   giving up).
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

    let mut ended = false;
    loop {
        let op = if !input.is_empty() {
            input.byte() % 7
        } else if !ended {
            // The end: past every deadline, then the server goes.
            ended = true;
            now += timeout + Duration::from_millis(1);
            connection.handle_timeout(now);
            connection.on_eof(now);
            7
        } else {
            break;
        };
        match op {
            7 => {}
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
                    Err((Refusal::Late, _)) => panic!("a deadline still to come refused as past"),
                }
            }
            1 if !waiting.is_empty() => {
                let callers: Vec<u32> = waiting.keys().copied().collect();
                let caller = callers[usize::from(input.byte()) % callers.len()];
                let (_, ticket) = waiting.remove(&caller).expect("listed");
                connection.abandon(ticket);
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
            _ if input.byte().is_multiple_of(2) => connection.on_eof(now),
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
            assert_eq!(delivery.task_id, task_id, "told with another task's id");
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
    assert!(
        waiting.is_empty(),
        "callers never answered nor told, after the server went"
    );
}

/// `buf` begins with a whole frame: its header and all the body the header
/// announces.
fn whole_frame(buf: &[u8]) -> bool {
    buf.first_chunk::<HEADER_LEN>().is_some_and(|header| {
        buf.len() - HEADER_LEN >= crate::frame::FrameHeader::parse(*header).length as usize
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::simulation::Rng;

    /// A harness: one fuzz input in, a panic if an oracle fails.
    type Harness = fn(&[u8]);

    /// Every harness, by the name of its target in `fuzz/`.
    const TARGETS: [(&str, Harness); 5] = [
        ("frame_stream", frame_stream),
        ("typed_messages", typed_messages),
        ("config_loader", config_loader),
        ("server_policy", server_connection),
        ("client_policy", client_connection),
    ];

    #[test]
    fn every_kept_regression_input_passes_its_harness() {
        let kept = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
        let mut replayed = 0;
        for (target, harness) in TARGETS {
            let Ok(inputs) = std::fs::read_dir(kept.join(target)) else {
                continue;
            };
            for input in inputs {
                let path = input.unwrap().path();
                harness(&std::fs::read(&path).unwrap());
                replayed += 1;
            }
        }
        assert!(replayed >= 2, "the kept inputs were found ({replayed})");
    }

    #[test]
    fn seeded_random_inputs_pass_every_harness() {
        let mut rng = Rng(0x5eed);
        for (_, harness) in TARGETS {
            for _ in 0..2000 {
                let length = rng.below(600) as usize;
                let input: Vec<u8> = (0..length).map(|_| rng.next() as u8).collect();
                harness(&input);
            }
        }
    }
}
