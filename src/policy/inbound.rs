//! The frames one side reads: a buffer the driver reads into, the frame
//! decoder, and the per-frame deadline.

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::{RETAINED_CAPACITY, millis};
use crate::error::IpcError;
use crate::frame::codec::decode_shared_message;
use crate::frame::{FrameDecoder, FrameSettings, HEADER_LEN};

/// Room set aside for each read: large enough that a small frame arrives in
/// one read, small enough that an idle connection costs little.
const READ_CHUNK: usize = 8 * 1024;

/// Messages of type `M` arriving on one connection.
///
/// The buffer grows only with bytes that actually arrive, never toward what a
/// header claims; the decoder refuses a header over `max_frame_bytes` before
/// a byte of its body is buffered.
#[derive(Debug)]
pub(crate) struct Inbound<M> {
    decoder: FrameDecoder,
    buf: BytesMut,
    /// Whether `buf` was grown past [`RETAINED_CAPACITY`]. Its `capacity()`
    /// cannot say once a frame is split off the front: it counts from the
    /// split, not the allocation.
    oversized: bool,
    /// The clock of the frame in progress; `None` between frames.
    clock: Option<FrameClock>,
    /// Reading is paused: a frame's clock does not run meanwhile.
    paused: bool,
    frame_timeout: Duration,
    _messages: PhantomData<fn() -> M>,
}

impl<M: prost::Message + Default> Inbound<M> {
    /// `frame_timeout` bounds each frame from its first byte to its last.
    pub(crate) fn new(settings: FrameSettings, frame_timeout: Duration) -> Self {
        Inbound {
            decoder: FrameDecoder::new(settings),
            buf: BytesMut::new(),
            oversized: false,
            clock: None,
            paused: false,
            frame_timeout,
            _messages: PhantomData,
        }
    }

    /// The buffer to read into: bytes go into its spare capacity, and
    /// [`on_read`](Self::on_read) is told how many arrived. There is always
    /// some spare capacity.
    pub(crate) fn read_buffer(&mut self) -> &mut BytesMut {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
            self.buf.reserve(READ_CHUNK);
        }
        &mut self.buf
    }

    /// `count` bytes were appended to the read buffer at `now`.
    pub(crate) fn on_read(&mut self, count: usize, now: Instant) {
        // Drivers may grow the buffer as they read into it (the legacy one
        // sizes its reads to what arrives): looked at after every read.
        self.oversized |= self.buf.capacity() > RETAINED_CAPACITY;
        if count > 0 && self.clock.is_none() {
            self.clock = Some(FrameClock::started(now, self.paused));
        }
    }

    /// Bytes of the stream received and not yet taken as messages.
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
            + if self.decoder.is_mid_frame() {
                HEADER_LEN
            } else {
                0
            }
    }

    /// The size (header included) of the next frame, once its header has
    /// arrived; a header over `max_frame_bytes` is an error.
    pub(crate) fn next_frame_size(&self) -> Result<Option<usize>, IpcError> {
        let length = match self.decoder.pending_length() {
            Some(length) => length,
            None => match self.buf.first_chunk::<HEADER_LEN>() {
                Some(header) => crate::frame::FrameHeader::parse(*header)
                    .check_length(self.decoder.settings().max_frame_bytes)?,
                None => return Ok(None),
            },
        };
        Ok(Some(HEADER_LEN + length))
    }

    /// The next complete message in the buffer, if there is one, with its
    /// frame's size. An error is final: the stream can no longer be trusted
    /// to be aligned on frames. The message is decoded where it will stay,
    /// on the heap: a task is large (every filter inline), and it is handed
    /// on several times before its handler takes it.
    pub(crate) fn next_message(
        &mut self,
        now: Instant,
    ) -> Result<Option<(Box<M>, usize)>, IpcError> {
        let Some(body) = self.decoder.decode(&mut self.buf)? else {
            return Ok(None);
        };
        self.frame_done(now);
        boxed(&body).map(Some)
    }

    /// The peer closed its side: `Ok(None)` if it did so between frames,
    /// [`IpcError::TruncatedFrame`] if inside one.
    pub(crate) fn on_eof(&mut self, now: Instant) -> Result<Option<(Box<M>, usize)>, IpcError> {
        let Some(body) = self.decoder.decode_eof(&mut self.buf)? else {
            return Ok(None);
        };
        self.frame_done(now);
        boxed(&body).map(Some)
    }

    /// Like [`next_message`](Self::next_message), with the frame's body
    /// (which shares the read buffer, without a copy) instead of its size.
    pub(crate) fn next_frame(&mut self, now: Instant) -> Result<Option<(M, Bytes)>, IpcError> {
        let Some(body) = self.decoder.decode(&mut self.buf)? else {
            return Ok(None);
        };
        self.frame_done(now);
        decoded(body)
    }

    /// Like [`on_eof`](Self::on_eof), with the frame's body.
    pub(crate) fn eof_frame(&mut self, now: Instant) -> Result<Option<(M, Bytes)>, IpcError> {
        let Some(body) = self.decoder.decode_eof(&mut self.buf)? else {
            return Ok(None);
        };
        self.frame_done(now);
        decoded(body)
    }

    fn frame_done(&mut self, now: Instant) {
        // Bytes left over belong to the next frame, which has begun.
        self.clock = (!self.buf.is_empty()).then(|| FrameClock::started(now, self.paused));
        self.shrink_after_large_frame();
    }

    /// After a large frame, the buffer goes back to its retained size even
    /// if the peer keeps sending (and so the buffer never empties): what is
    /// left over is copied into a buffer of the retained size.
    fn shrink_after_large_frame(&mut self) {
        let left_over = self.buf.len();
        if self.oversized && left_over <= RETAINED_CAPACITY / 2 {
            let mut smaller = BytesMut::with_capacity(RETAINED_CAPACITY);
            smaller.extend_from_slice(&self.buf);
            self.buf = smaller;
            self.oversized = false;
        }
    }

    /// Whether the read buffer holds an allocation larger than the
    /// retained size.
    #[cfg(test)]
    fn is_oversized(&self) -> bool {
        self.oversized
    }

    /// When the frame in progress must be complete, if one is in progress
    /// and reading is not paused.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        let clock = self.clock.as_ref()?;
        let left = self.frame_timeout.saturating_sub(clock.elapsed);
        clock.running_since.map(|since| since + left)
    }

    /// Stops the frame clock: the reader stopped reading for a while
    /// (backpressure, the memory budget), and the time it does not read is
    /// not the peer's delay. The time the frame has taken so far stands.
    pub(crate) fn pause(&mut self, now: Instant) {
        self.paused = true;
        if let Some(clock) = &mut self.clock {
            clock.stop(now);
        }
    }

    /// Starts the frame clock again where [`pause`](Self::pause) stopped it.
    pub(crate) fn resume(&mut self, now: Instant) {
        self.paused = false;
        if let Some(clock) = &mut self.clock {
            clock.running_since.get_or_insert(now);
        }
    }

    /// True while part of a frame has arrived.
    pub(crate) fn is_mid_frame(&self) -> bool {
        self.clock.is_some()
    }

    /// The error for a frame (or, with `idle`, a connection) whose time ran
    /// out: both limits are the same duration, `read_timeout_ms`.
    pub(crate) fn timed_out(&self) -> IpcError {
        let received = match self.clock {
            Some(_) => {
                self.buf.len()
                    + if self.decoder.is_mid_frame() {
                        HEADER_LEN
                    } else {
                        0
                    }
            }
            None => 0,
        };
        IpcError::ReadTimeout {
            waited_ms: millis(self.frame_timeout),
            received,
        }
    }
}

/// How long the frame in progress has taken, time paused excluded.
#[derive(Debug, Clone, Copy)]
struct FrameClock {
    /// Taken before the last pause.
    elapsed: Duration,
    /// Running since; `None` while paused.
    running_since: Option<Instant>,
}

impl FrameClock {
    fn started(now: Instant, paused: bool) -> FrameClock {
        FrameClock {
            elapsed: Duration::ZERO,
            running_since: (!paused).then_some(now),
        }
    }

    fn stop(&mut self, now: Instant) {
        if let Some(since) = self.running_since.take() {
            self.elapsed += now.saturating_duration_since(since);
        }
    }
}

/// `body` decoded, its `bytes` fields slices of it, and the body itself.
fn decoded<M: prost::Message + Default>(body: BytesMut) -> Result<Option<(M, Bytes)>, IpcError> {
    let body = body.freeze();
    let message = decode_shared_message(body.clone())?;
    Ok(Some((message, body)))
}

/// `body` decoded into a message on the heap, with its frame's size.
fn boxed<M: prost::Message + Default>(body: &[u8]) -> Result<(Box<M>, usize), IpcError> {
    let mut message = Box::<M>::default();
    message
        .merge(body)
        .map_err(|source| IpcError::MalformedMessage {
            message_type: crate::frame::codec::short_type_name::<M>(),
            length: body.len(),
            source,
        })?;
    Ok((message, HEADER_LEN + body.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_message;
    use crate::proto::DetectionTask;

    fn frame(task_id: &str, size: usize) -> Vec<u8> {
        let task = DetectionTask {
            task_id: task_id.to_owned(),
            metadata: Some("x".repeat(size)),
            ..Default::default()
        };
        let mut wire = BytesMut::new();
        encode_message(&task, FrameSettings::DEFAULT, &mut wire).unwrap();
        wire.to_vec()
    }

    fn arrive(inbound: &mut Inbound<DetectionTask>, bytes: &[u8], now: Instant) {
        inbound.read_buffer().extend_from_slice(bytes);
        inbound.on_read(bytes.len(), now);
    }

    #[test]
    fn the_frame_clock_starts_at_the_first_byte_and_restarts_with_the_next_frame() {
        let start = Instant::now();
        let timeout = Duration::from_secs(5);
        let mut inbound = Inbound::<DetectionTask>::new(FrameSettings::DEFAULT, timeout);
        assert_eq!(inbound.deadline(), None, "no frame, no deadline");

        let two = [frame("a", 10), frame("b", 10)].concat();
        let split = two.len() - 3;
        arrive(&mut inbound, &two[..split], start);
        assert_eq!(inbound.deadline(), Some(start + timeout));

        let later = start + Duration::from_secs(1);
        let (first, _) = inbound.next_message(later).unwrap().unwrap();
        assert_eq!(first.task_id, "a");
        assert_eq!(
            inbound.deadline(),
            Some(later + timeout),
            "the second frame began when the first was taken off"
        );
        assert_eq!(inbound.next_message(later).unwrap(), None);

        arrive(&mut inbound, &two[split..], later);
        assert_eq!(inbound.next_message(later).unwrap().unwrap().0.task_id, "b");
        assert_eq!(inbound.deadline(), None, "between frames");
    }

    #[test]
    fn a_buffer_grown_for_a_large_frame_shrinks_even_while_the_peer_keeps_sending() {
        let now = Instant::now();
        let mut inbound =
            Inbound::<DetectionTask>::new(FrameSettings::DEFAULT, Duration::from_secs(5));
        let large = frame("large", 900 * 1024);
        let small = frame("small", 10);
        // The large frame and the start of the next arrive together, so the
        // buffer never empties.
        arrive(&mut inbound, &large, now);
        arrive(&mut inbound, &small[..5], now);
        assert!(inbound.is_oversized());
        let large_allocation = inbound.buf.as_ptr();
        assert_eq!(
            inbound.next_message(now).unwrap().unwrap().0.task_id,
            "large"
        );
        assert!(!inbound.is_oversized());
        assert!(
            inbound.buf.capacity() <= RETAINED_CAPACITY,
            "capacity {} after the large frame",
            inbound.buf.capacity()
        );
        assert!(
            !(large_allocation..large_allocation.wrapping_add(large.len()))
                .contains(&inbound.buf.as_ptr()),
            "the rest of the stream is in a new allocation, not the large one"
        );
        arrive(&mut inbound, &small[5..], now);
        let (small_task, size) = inbound.next_message(now).unwrap().unwrap();
        assert_eq!(small_task.task_id, "small");
        assert_eq!(size, small.len(), "the whole frame's size, header included");
    }

    #[test]
    fn a_header_over_the_limit_is_refused_before_its_body_is_buffered() {
        let now = Instant::now();
        let settings = FrameSettings {
            max_frame_bytes: 1024,
            ..FrameSettings::DEFAULT
        };
        let mut inbound = Inbound::<DetectionTask>::new(settings, Duration::from_secs(5));
        let header = crate::frame::FrameHeader {
            length: 1025,
            checksum: 0,
        };
        arrive(&mut inbound, &header.to_bytes(), now);
        assert!(matches!(
            inbound.next_message(now),
            Err(IpcError::FrameTooLarge {
                length: 1025,
                limit: 1024
            })
        ));
        assert!(inbound.buf.capacity() <= READ_CHUNK * 2);
    }

    #[test]
    fn a_stream_cut_inside_a_frame_is_truncated_and_a_clean_end_is_not() {
        let now = Instant::now();
        let whole = frame("cut", 10);
        let mut inbound =
            Inbound::<DetectionTask>::new(FrameSettings::DEFAULT, Duration::from_secs(5));
        arrive(&mut inbound, &whole[..whole.len() - 1], now);
        assert_eq!(inbound.next_message(now).unwrap(), None);
        assert!(matches!(
            inbound.on_eof(now),
            Err(IpcError::TruncatedFrame { .. })
        ));

        let mut clean =
            Inbound::<DetectionTask>::new(FrameSettings::DEFAULT, Duration::from_secs(5));
        arrive(&mut clean, &whole, now);
        assert!(clean.next_message(now).unwrap().is_some());
        assert_eq!(clean.on_eof(now).unwrap(), None);
    }

    #[test]
    fn a_timeout_reports_what_had_arrived() {
        let now = Instant::now();
        let mut inbound =
            Inbound::<DetectionTask>::new(FrameSettings::DEFAULT, Duration::from_millis(1500));
        arrive(&mut inbound, &[1, 0, 0], now);
        assert!(inbound.next_message(now).unwrap().is_none());
        match inbound.timed_out() {
            IpcError::ReadTimeout {
                waited_ms: 1500,
                received: 3,
            } => {}
            other => panic!("{other:?}"),
        }
    }
}
