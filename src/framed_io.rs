//! Whole messages over a byte stream, with deadlines: the I/O loop around the
//! frame codec, shared by the server and the client.
//!
//! [`FrameReader`] and [`FrameWriter`] hold the codec state and buffers but
//! not the stream, which each call borrows. One task can then read and write
//! the same connection (the server), or two tasks can each own a half (the
//! client).
//!
//! The read side keeps one buffer per connection and reads into its spare
//! capacity (no zero-filling, no second copy); the decoder takes frames off
//! the front. The write side encodes each message into one reused buffer and
//! writes it whole, so a frame never goes out in pieces the application
//! chose.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::codec::Decoder;

use crate::error::IpcError;
use crate::frame::codec::MessageCodec;
use crate::frame::{FrameSettings, HEADER_LEN, encode_message_parts};

/// Read buffer set aside per connection before the first read.
const INITIAL_READ_CAPACITY: usize = 8 * 1024;

/// Buffer capacity kept between frames. A frame larger than this grows the
/// buffer for itself; once it has gone, the buffer drops back to this size,
/// so one large result does not pin megabytes per connection for as long as
/// the connection lives.
const RETAINED_CAPACITY: usize = 256 * 1024;

/// Reads messages of type `In`, enforcing the read deadline.
#[derive(Debug)]
pub(crate) struct FrameReader<In> {
    codec: MessageCodec<(), In>,
    buf: BytesMut,
    /// When the first byte of the frame in progress arrived (or when reading
    /// resumed after the caller paused it).
    frame_started: Option<Instant>,
    frame_timeout: Duration,
    /// Every byte read so far, for telemetry.
    bytes_read: u64,
    /// The buffer grew past [`RETAINED_CAPACITY`] for a large frame.
    oversized: bool,
}

impl<In: prost::Message + Default> FrameReader<In> {
    /// `frame_timeout` bounds each frame from its first byte to its last.
    pub(crate) fn new(settings: FrameSettings, frame_timeout: Duration) -> Self {
        FrameReader {
            codec: MessageCodec::new(settings),
            buf: BytesMut::with_capacity(INITIAL_READ_CAPACITY),
            frame_started: None,
            frame_timeout,
            bytes_read: 0,
            oversized: false,
        }
    }

    /// Total bytes read from the stream.
    pub(crate) fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Restarts the clock of a frame in progress. For callers that stopped
    /// reading for a while (backpressure): the time they did not read is
    /// not the peer's delay.
    pub(crate) fn resume(&mut self) {
        if self.frame_started.is_some() {
            self.frame_started = Some(Instant::now());
        }
    }

    /// The next message from `io`, or `None` when the peer closed the stream
    /// between frames.
    ///
    /// While no frame is in progress the wait ends at `idle_deadline`
    /// (`None`: no limit), which callers set `frame_timeout` after the last
    /// activity. Once a frame's first byte has arrived, the whole frame must
    /// arrive within `frame_timeout` of it, however the bytes are spaced.
    /// Cancel-safe: bytes already read stay buffered.
    pub(crate) async fn next<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        idle_deadline: Option<Instant>,
    ) -> Result<Option<In>, IpcError> {
        loop {
            if let Some(message) = self.codec.decode(&mut self.buf)? {
                // Bytes left over belong to the next frame, which has begun.
                self.frame_started = (!self.buf.is_empty()).then(Instant::now);
                if self.oversized && self.buf.is_empty() {
                    self.buf = BytesMut::with_capacity(RETAINED_CAPACITY);
                    self.oversized = false;
                }
                return Ok(Some(message));
            }
            let deadline = match self.frame_started {
                Some(started) => Some(started + self.frame_timeout),
                None => idle_deadline,
            };
            let read = io.read_buf(&mut self.buf);
            let count = match deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline, read).await {
                    Ok(count) => count?,
                    Err(_elapsed) => return Err(self.timed_out()),
                },
                None => read.await?,
            };
            if count == 0 {
                return self.codec.decode_eof(&mut self.buf);
            }
            self.bytes_read += count as u64;
            self.oversized |= self.buf.capacity() > RETAINED_CAPACITY;
            if self.frame_started.is_none() {
                self.frame_started = Some(Instant::now());
            }
        }
    }

    /// Both limits are `read_timeout_ms`: the idle window the caller passes
    /// and the per-frame deadline, so either expiry reports that duration.
    fn timed_out(&self) -> IpcError {
        let received = match self.frame_started {
            Some(_) => {
                self.buf.len()
                    + if self.codec.is_mid_frame() {
                        HEADER_LEN
                    } else {
                        0
                    }
            }
            None => 0,
        };
        IpcError::ReadTimeout {
            waited_ms: self.frame_timeout.as_millis() as u64,
            received,
        }
    }
}

/// Writes messages of type `Out`, each as one buffer, within the write
/// deadline.
#[derive(Debug)]
pub(crate) struct FrameWriter<Out> {
    settings: FrameSettings,
    _messages: std::marker::PhantomData<fn(Out)>,
    buf: BytesMut,
    write_timeout: Duration,
    state: WriterState,
}

/// Whether the stream is still aligned on frames.
#[derive(Debug)]
enum WriterState {
    Ready,
    /// A frame is being written. Still so at the next send means that write
    /// was abandoned part-way (its future dropped).
    Writing,
    /// A write failed: why.
    Broken(String),
}

impl<Out: prost::Message> FrameWriter<Out> {
    pub(crate) fn new(settings: FrameSettings, write_timeout: Duration) -> Self {
        FrameWriter {
            settings,
            _messages: std::marker::PhantomData,
            buf: BytesMut::new(),
            write_timeout,
            state: WriterState::Ready,
        }
    }

    /// Encodes one message from `parts` (see [`encode_message_parts`]) and
    /// writes the frame to `io`. Returns the frame's size.
    ///
    /// A message over `max_frame_bytes` fails with
    /// [`IpcError::MessageTooLarge`] before anything is written, and the
    /// stream stays usable. After any other error the stream is unusable,
    /// and later calls fail with the first error's account.
    pub(crate) async fn send<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        parts: &[&Out],
    ) -> Result<usize, IpcError> {
        let unusable = |cause: &str| {
            IpcError::Io(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("the connection can no longer be written: {cause}"),
            ))
        };
        match &self.state {
            WriterState::Ready => {}
            WriterState::Writing => {
                return Err(unusable(
                    "an earlier write was abandoned part-way through a frame",
                ));
            }
            WriterState::Broken(cause) => return Err(unusable(cause)),
        }
        self.buf.clear();
        encode_message_parts(parts, self.settings, &mut self.buf)?;
        let length = self.buf.len();
        self.state = WriterState::Writing;
        let write = async {
            io.write_all(&self.buf).await?;
            // Every backend's flush is a no-op or cheap; it keeps a buffering
            // writer (should one ever be used) correct.
            io.flush().await
        };
        let outcome = match tokio::time::timeout(self.write_timeout, write).await {
            Ok(Ok(())) => Ok(length),
            Ok(Err(error)) => Err(IpcError::Io(error)),
            Err(_elapsed) => Err(IpcError::WriteTimeout {
                waited_ms: self.write_timeout.as_millis() as u64,
                length,
            }),
        };
        self.state = match &outcome {
            Ok(_) => WriterState::Ready,
            Err(error) => WriterState::Broken(error.to_string()),
        };
        if self.buf.capacity() > RETAINED_CAPACITY {
            // Encoding into an empty buffer allocates exactly what the next
            // large frame needs, without copying anything.
            self.buf = BytesMut::new();
        }
        outcome
    }
}
