//! The frames one side writes: every frame that is ready, back to back in one
//! buffer, so that a driver writes them all with one system call.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};

use super::{RETAINED_CAPACITY, millis};
use crate::error::IpcError;
use crate::frame::{FrameSettings, encode_message_parts, encode_message_with_tail};

/// Messages of type `M` waiting to be written on one connection.
///
/// Each frame has `write_timeout` from the moment it reaches the head of
/// the queue (the moment the peer's reading is what holds it up) until its
/// last byte is written; a peer that reads nothing for that long fails the
/// connection.
#[derive(Debug)]
pub(crate) struct Outbound<M> {
    settings: FrameSettings,
    buf: BytesMut,
    /// Whether `buf` was grown past [`RETAINED_CAPACITY`]. Its `capacity()`
    /// cannot say, once written bytes are advanced past: it counts from the
    /// first unwritten byte, not the allocation.
    oversized: bool,
    /// Unwritten bytes of each queued frame, oldest first.
    frames: VecDeque<usize>,
    /// Whether some of the head frame's bytes have been written.
    head_started: bool,
    /// When the frame at the head of the queue became the head.
    head_since: Option<Instant>,
    write_timeout: Duration,
    _messages: PhantomData<fn(M)>,
}

impl<M: prost::Message> Outbound<M> {
    pub(crate) fn new(settings: FrameSettings, write_timeout: Duration) -> Self {
        Outbound {
            settings,
            buf: BytesMut::new(),
            oversized: false,
            frames: VecDeque::new(),
            head_started: false,
            head_since: None,
            write_timeout,
            _messages: PhantomData,
        }
    }

    /// Queues one frame whose body is the encodings of `parts` (see
    /// [`encode_message_parts`]), and returns its size. A message over
    /// `max_frame_bytes` fails with [`IpcError::MessageTooLarge`] and queues
    /// nothing.
    pub(crate) fn push(&mut self, parts: &[&M], now: Instant) -> Result<usize, IpcError> {
        let before = self.buf.len();
        encode_message_parts(parts, self.settings, &mut self.buf)?;
        Ok(self.queued(before, now))
    }

    /// Queues one frame carrying `message`, framed under `settings` rather
    /// than the connection's own (a notice in the peer's checksum variant),
    /// and returns its size.
    pub(crate) fn push_in(
        &mut self,
        message: &M,
        settings: FrameSettings,
        now: Instant,
    ) -> Result<usize, IpcError> {
        let before = self.buf.len();
        encode_message_parts(&[message], settings, &mut self.buf)?;
        Ok(self.queued(before, now))
    }

    /// Queues one frame whose body is `head`'s encoding followed by `tail`,
    /// encoded beforehand with checksum `tail_crc` (see
    /// [`encode_message_with_tail`]), and returns its size.
    pub(crate) fn push_with_tail(
        &mut self,
        head: &M,
        tail: &[u8],
        tail_crc: u32,
        now: Instant,
    ) -> Result<usize, IpcError> {
        let before = self.buf.len();
        encode_message_with_tail(head, tail, tail_crc, self.settings, &mut self.buf)?;
        Ok(self.queued(before, now))
    }

    fn queued(&mut self, before: usize, now: Instant) -> usize {
        let length = self.buf.len() - before;
        self.oversized |= self.buf.capacity() > RETAINED_CAPACITY;
        if self.frames.is_empty() {
            self.head_since = Some(now);
        }
        self.frames.push_back(length);
        length
    }

    /// Drops every frame not written yet (the peer is gone).
    pub(crate) fn discard(&mut self) {
        self.buf = BytesMut::new();
        self.oversized = false;
        self.frames.clear();
        self.head_started = false;
        self.head_since = None;
    }

    /// Every byte not written yet.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Whole frames not completely written yet.
    pub(crate) fn queued_frames(&self) -> usize {
        self.frames.len()
    }

    /// Frames of which not one byte has been written: the newest
    /// `untouched_frames()` queued never reached the peer.
    pub(crate) fn untouched_frames(&self) -> usize {
        self.frames.len() - usize::from(self.head_started)
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Where the write buffer's allocation starts (to tell a new one from
    /// the old).
    #[cfg(test)]
    fn allocation(&mut self) -> *const u8 {
        // Reclaims the space before the first unwritten byte, if any, so
        // that the pointer is the allocation's start.
        self.buf.reserve(1);
        self.buf.as_ptr()
    }

    /// The first `count` pending bytes were written at `now`; returns how
    /// many frames that completed.
    pub(crate) fn on_written(&mut self, count: usize, now: Instant) -> usize {
        debug_assert!(count <= self.buf.len(), "wrote more than was pending");
        let count = count.min(self.buf.len());
        self.buf.advance(count);
        let mut left = count;
        let mut completed = 0;
        while left > 0 {
            let Some(head) = self.frames.front_mut() else {
                break;
            };
            if left < *head {
                *head -= left;
                self.head_started = true;
                break;
            }
            left -= *head;
            self.frames.pop_front();
            self.head_started = false;
            completed += 1;
        }
        if completed > 0 {
            self.head_since = (!self.frames.is_empty()).then_some(now);
        }
        if self.frames.is_empty() && self.oversized {
            // The large allocation goes; the next frame is encoded into a
            // buffer of its own size.
            self.buf = BytesMut::new();
            self.oversized = false;
        }
        completed
    }

    /// When the frame at the head must be written by.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.head_since.map(|since| since + self.write_timeout)
    }

    /// The error for a head frame whose time ran out.
    pub(crate) fn timed_out(&self) -> IpcError {
        IpcError::WriteTimeout {
            waited_ms: millis(self.write_timeout),
            length: self.frames.front().copied().unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::DetectionResult;

    fn result(id: &str) -> DetectionResult {
        DetectionResult {
            task_id: id.to_owned(),
            success: true,
            ..Default::default()
        }
    }

    #[test]
    fn frames_queue_back_to_back_and_complete_as_their_last_byte_is_written() {
        let start = Instant::now();
        let timeout = Duration::from_secs(10);
        let mut out = Outbound::new(FrameSettings::DEFAULT, timeout);
        let first = out.push(&[&result("a")], start).unwrap();
        let second = out
            .push(&[&result("bb")], start + Duration::from_secs(1))
            .unwrap();
        assert_eq!(out.pending().len(), first + second);
        assert_eq!(
            out.deadline(),
            Some(start + timeout),
            "the head frame's clock"
        );

        let later = start + Duration::from_secs(3);
        assert_eq!(out.on_written(first - 1, later), 0);
        assert_eq!(out.deadline(), Some(start + timeout), "no frame completed");
        assert_eq!(out.on_written(2, later), 1);
        assert_eq!(
            out.deadline(),
            Some(later + timeout),
            "the next frame's clock starts when it becomes the head"
        );
        assert_eq!(out.queued_frames(), 1);
        assert_eq!(out.on_written(second - 1, later), 1);
        assert!(out.is_empty());
        assert_eq!(out.deadline(), None);
    }

    #[test]
    fn a_large_frame_does_not_keep_its_buffer_once_written() {
        let now = Instant::now();
        let mut out = Outbound::new(FrameSettings::DEFAULT, Duration::from_secs(1));
        let large = DetectionResult {
            error_message: Some("x".repeat(900 * 1024)),
            ..result("large")
        };
        let size = out.push(&[&large], now).unwrap();
        let large_allocation = out.pending().as_ptr();
        // Written in two pieces, as a socket takes it.
        out.on_written(size / 2, now);
        out.on_written(size - size / 2, now);
        out.push(&[&result("small")], now).unwrap();
        assert_ne!(
            out.allocation(),
            large_allocation,
            "the small frame went into a new, small buffer"
        );
        assert!(
            out.buf.capacity() <= RETAINED_CAPACITY,
            "{}",
            out.buf.capacity()
        );
    }

    #[test]
    fn small_frames_keep_reusing_one_buffer() {
        let now = Instant::now();
        let mut out = Outbound::new(FrameSettings::DEFAULT, Duration::from_secs(1));
        let size = out.push(&[&result("first")], now).unwrap();
        let first = out.allocation();
        out.on_written(size, now);
        out.push(&[&result("again")], now).unwrap();
        assert_eq!(out.allocation(), first);
    }

    #[test]
    fn a_message_over_the_limit_queues_nothing() {
        let now = Instant::now();
        let settings = FrameSettings {
            max_frame_bytes: 1024,
            ..FrameSettings::DEFAULT
        };
        let mut out = Outbound::new(settings, Duration::from_secs(1));
        let huge = DetectionResult {
            error_message: Some("x".repeat(2000)),
            ..result("huge")
        };
        assert!(matches!(
            out.push(&[&huge], now),
            Err(IpcError::MessageTooLarge { limit: 1024, .. })
        ));
        assert!(out.is_empty() && out.pending().is_empty());
        assert_eq!(out.deadline(), None);
    }

    #[test]
    fn a_timed_out_head_names_its_size_and_the_limit() {
        let now = Instant::now();
        let mut out = Outbound::new(FrameSettings::DEFAULT, Duration::from_millis(250));
        let size = out.push(&[&result("a")], now).unwrap();
        match out.timed_out() {
            IpcError::WriteTimeout {
                waited_ms: 250,
                length,
            } => assert_eq!(length, size),
            other => panic!("{other:?}"),
        }
    }
}
