//! `daemoneye_lib::ipc::codec`: DaemonEye's error type and its frame codec
//! over any tokio reader and writer.
//!
//! The frame is this crate's (u32 LE length, u32 LE checksum, prost
//! message) with DaemonEye's checksum, CRC-32C, built from the same frame
//! core every backend uses.

use std::future::Future;
use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{Crc32Variant, FrameHeader, FrameSettings, HEADER_LEN, encode_message};

/// DaemonEye's checksum.
const CRC: Crc32Variant = Crc32Variant::Castagnoli;

/// A read buffer grown past this for one large frame is let go afterwards,
/// so that one large message does not pin its size for the codec's life.
const RETAINED_BUFFER_BYTES: usize = 256 * 1024;

/// A result of the IPC layer.
pub type IpcResult<T> = Result<T, IpcError>;

/// Every error DaemonEye's IPC layer reports, with its messages.
///
/// This crate's own, more detailed errors ([`crate::IpcError`]) arrive as
/// the nearest variant; where none fits (a configuration this crate
/// refuses, a peer refused for its credentials), as [`IpcError::Io`] with
/// this crate's message, which says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IpcError {
    /// A read or write did not finish within its timeout.
    #[error("Timeout occurred during operation")]
    Timeout,
    /// A frame or message over `max_frame_bytes`.
    #[error("Message too large: {size} bytes (max: {max_size})")]
    TooLarge {
        /// Its size in bytes.
        size: usize,
        /// The limit.
        max_size: usize,
    },
    /// A frame whose body does not match its checksum.
    #[error("CRC32 mismatch: expected {expected:08x}, got {actual:08x}")]
    CrcMismatch {
        /// The checksum in the header.
        expected: u32,
        /// The checksum of the body.
        actual: u32,
    },
    /// An I/O error.
    #[error("IO error: {0}")]
    Io(#[from] io::Error),
    /// A body that is not the expected message.
    #[error("Protobuf decode error: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A message that could not be encoded.
    #[error("Protobuf encode error: {0}")]
    Encode(String),
    /// The peer closed the connection.
    #[error("Peer connection closed")]
    PeerClosed,
    /// A frame length that is not allowed (zero).
    #[error("Invalid message length: {length}")]
    InvalidLength {
        /// The length.
        length: u32,
    },
    /// No server at the endpoint (DaemonEye's resilient client).
    #[error("Server not found at {endpoint} - ensure procmond is running")]
    ServerNotFound {
        /// The endpoint.
        endpoint: String,
    },
    /// The server refused the connection (DaemonEye's resilient client).
    #[error("Connection refused to {endpoint} - server may not be accepting connections")]
    ConnectionRefused {
        /// The endpoint.
        endpoint: String,
    },
    /// Not allowed to connect (DaemonEye's resilient client).
    #[error("Permission denied connecting to {endpoint} - check file permissions")]
    PermissionDenied {
        /// The endpoint.
        endpoint: String,
    },
    /// Connecting took too long (DaemonEye's resilient client).
    #[error("Connection timeout to {endpoint} - server may be overloaded")]
    ConnectionTimeout {
        /// The endpoint.
        endpoint: String,
    },
    /// Too many recent failures (DaemonEye's resilient client).
    #[error("Circuit breaker is open - too many recent failures")]
    CircuitBreakerOpen,
}

impl From<crate::IpcError> for IpcError {
    fn from(error: crate::IpcError) -> Self {
        use crate::IpcError as Native;
        use io::ErrorKind;
        // This crate's message, under an I/O error of `kind`.
        let described =
            |kind: ErrorKind, error: &Native| IpcError::Io(io::Error::new(kind, error.to_string()));
        match error {
            Native::FrameTooLarge { length, limit } => IpcError::TooLarge {
                size: length as usize,
                max_size: limit as usize,
            },
            Native::MessageTooLarge { length, limit } => IpcError::TooLarge {
                size: length,
                max_size: limit as usize,
            },
            Native::ChecksumMismatch {
                expected, actual, ..
            } => IpcError::CrcMismatch { expected, actual },
            Native::MalformedMessage { source, .. } | Native::MalformedResult { source, .. } => {
                IpcError::Decode(source)
            }
            Native::TruncatedFrame { .. } => IpcError::PeerClosed,
            Native::ConnectionLost { ref reason, .. } => {
                tracing::debug!(reason, "connection lost: {error}");
                IpcError::PeerClosed
            }
            Native::ResponseTimeout { .. }
            | Native::InFlightLimit { .. }
            | Native::ReadTimeout { .. }
            | Native::WriteTimeout { .. } => IpcError::Timeout,
            Native::Connect { source, .. } => IpcError::Io(source),
            Native::Io(source) => IpcError::Io(source),
            Native::ConnectTimeout { .. } => described(ErrorKind::TimedOut, &error),
            Native::Refused { .. } => described(ErrorKind::ConnectionRefused, &error),
            Native::UntrustedServer { .. } => described(ErrorKind::PermissionDenied, &error),
            Native::EndpointInUse { .. } => described(ErrorKind::AddrInUse, &error),
            Native::Bind { ref source, .. } | Native::EndpointIo { ref source, .. } => {
                described(source.kind(), &error)
            }
            Native::InsecureSocket { .. }
            | Native::UnsafeEndpointDirectory { .. }
            | Native::SymlinkAtEndpoint { .. }
            | Native::NotASocket { .. } => described(ErrorKind::PermissionDenied, &error),
            Native::TransportNotCompiled { .. } => described(ErrorKind::Unsupported, &error),
            // Configuration this crate refuses, an empty or duplicate task
            // id: the caller's input.
            other => described(ErrorKind::InvalidInput, &other),
        }
    }
}

/// DaemonEye's frame codec: writes and reads one message at a time on any
/// tokio writer and reader, with CRC-32C.
pub struct IpcCodec {
    max_frame_len: usize,
    buffer: Vec<u8>,
}

impl Default for IpcCodec {
    /// A codec for frames of up to 1 MiB.
    fn default() -> Self {
        IpcCodec::new(1024 * 1024)
    }
}

impl IpcCodec {
    /// A codec that writes and reads messages of up to `max_frame_len` bytes.
    pub fn new(max_frame_len: usize) -> Self {
        IpcCodec {
            max_frame_len,
            buffer: Vec::new(),
        }
    }

    /// Writes `message` as one frame, then flushes; each within
    /// `write_timeout`.
    ///
    /// An empty message (every field at its default) is
    /// [`IpcError::InvalidLength`] and one over the limit
    /// [`IpcError::TooLarge`]; neither writes anything.
    pub async fn write_message<T, W>(
        &self,
        writer: &mut W,
        message: &T,
        write_timeout: Duration,
    ) -> IpcResult<()>
    where
        T: prost::Message,
        W: AsyncWrite + Unpin,
    {
        let length = message.encoded_len();
        if length == 0 {
            return Err(IpcError::InvalidLength { length: 0 });
        }
        if length > self.max_frame_len {
            return Err(IpcError::TooLarge {
                size: length,
                max_size: self.max_frame_len,
            });
        }
        let settings = FrameSettings {
            crc32: CRC,
            max_frame_bytes: u32::MAX,
        };
        let mut frame = BytesMut::with_capacity(HEADER_LEN + length);
        encode_message(message, settings, &mut frame).map_err(|error| match error {
            crate::IpcError::MessageTooLarge { length, .. } => IpcError::TooLarge {
                size: length,
                max_size: self.max_frame_len,
            },
            other => IpcError::Encode(other.to_string()),
        })?;
        within(write_timeout, writer.write_all(&frame)).await?;
        within(write_timeout, writer.flush()).await
    }

    /// Reads one frame and decodes it as a `T`: the header within
    /// `read_timeout`, then the body within a fresh `read_timeout`.
    ///
    /// The end of the stream, even within a frame, is
    /// [`IpcError::PeerClosed`]. A header announcing nothing is
    /// [`IpcError::InvalidLength`]; one announcing more than the limit is
    /// [`IpcError::TooLarge`], decided before any body is read, and the
    /// buffer grows only with bytes that arrive.
    pub async fn read_message<T, R>(
        &mut self,
        reader: &mut R,
        read_timeout: Duration,
    ) -> IpcResult<T>
    where
        T: prost::Message + Default,
        R: AsyncRead + Unpin,
    {
        let mut header = [0u8; HEADER_LEN];
        within(read_timeout, reader.read_exact(&mut header))
            .await
            .map_err(end_of_stream)?;
        let header = FrameHeader::parse(header);
        if header.length == 0 {
            return Err(IpcError::InvalidLength { length: 0 });
        }
        let length = header.length as usize;
        if length > self.max_frame_len {
            return Err(IpcError::TooLarge {
                size: length,
                max_size: self.max_frame_len,
            });
        }
        self.buffer.clear();
        let arrived = within(
            read_timeout,
            (&mut *reader)
                .take(length as u64)
                .read_to_end(&mut self.buffer),
        )
        .await?;
        if arrived < length {
            return Err(IpcError::PeerClosed);
        }
        let decoded = match header.verify(&self.buffer, CRC) {
            Ok(()) => T::decode(self.buffer.as_slice()).map_err(IpcError::Decode),
            Err(crate::IpcError::ChecksumMismatch {
                expected, actual, ..
            }) => Err(IpcError::CrcMismatch { expected, actual }),
            Err(other) => Err(other.into()),
        };
        if self.buffer.capacity() > RETAINED_BUFFER_BYTES {
            self.buffer = Vec::new();
        }
        decoded
    }
}

/// `operation`, or [`IpcError::Timeout`] if it takes longer than `limit`.
async fn within<T>(
    limit: Duration,
    operation: impl Future<Output = io::Result<T>>,
) -> IpcResult<T> {
    match tokio::time::timeout(limit, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(IpcError::Io(error)),
        Err(_) => Err(IpcError::Timeout),
    }
}

/// The end of the stream within a header is the peer closing.
fn end_of_stream(error: IpcError) -> IpcError {
    match error {
        IpcError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof => IpcError::PeerClosed,
        other => other,
    }
}

/// DaemonEye's codec trait, implemented by nothing there or here; kept so
/// that its name resolves. Its methods return `Send` futures, as
/// `async_trait`'s do, but the trait is not object-safe.
pub trait AsyncCodec {
    /// Writes one message within `timeout`.
    fn write_msg<T: prost::Message + Send + Sync>(
        &mut self,
        message: &T,
        timeout: Duration,
    ) -> impl Future<Output = IpcResult<()>> + Send;

    /// Reads one message within `timeout`.
    fn read_msg<T: prost::Message + Default + Send>(
        &mut self,
        timeout: Duration,
    ) -> impl Future<Output = IpcResult<T>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{DetectionTask, TaskType};

    fn task(id: &str) -> DetectionTask {
        DetectionTask {
            task_id: id.into(),
            task_type: TaskType::EnumerateProcesses.into(),
            ..Default::default()
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    const PATIENCE: Duration = Duration::from_secs(5);

    #[test]
    fn a_message_written_is_read_back_with_a_crc32c_frame() {
        runtime().block_on(async {
            let (mut near, mut far) = tokio::io::duplex(4096);
            let codec = IpcCodec::default();
            codec
                .write_message(&mut near, &task("t-1"), PATIENCE)
                .await
                .unwrap();
            drop(near);
            let mut wire = Vec::new();
            far.read_to_end(&mut wire).await.unwrap();
            let body = prost::Message::encode_to_vec(&task("t-1"));
            assert_eq!(&wire[..4], &(body.len() as u32).to_le_bytes());
            assert_eq!(&wire[4..8], &crc32c::crc32c(&body).to_le_bytes());
            assert_eq!(&wire[8..], body.as_slice());

            let mut reader = wire.as_slice();
            let read: DetectionTask = IpcCodec::default()
                .read_message(&mut reader, PATIENCE)
                .await
                .unwrap();
            assert_eq!(read, task("t-1"));
        });
    }

    #[test]
    fn empty_and_oversize_messages_are_refused_before_anything_is_written() {
        runtime().block_on(async {
            let mut sink = Vec::new();
            let codec = IpcCodec::new(16);
            let empty = codec
                .write_message(&mut sink, &DetectionTask::default(), PATIENCE)
                .await;
            assert!(matches!(empty, Err(IpcError::InvalidLength { length: 0 })));
            let large = codec
                .write_message(&mut sink, &task(&"x".repeat(40)), PATIENCE)
                .await;
            assert!(
                matches!(
                    large,
                    Err(IpcError::TooLarge {
                        size: 42,
                        max_size: 16
                    })
                ),
                "{large:?}"
            );
            // A message exactly at the limit goes out.
            codec
                .write_message(&mut sink, &task(&"x".repeat(14)), PATIENCE)
                .await
                .unwrap();
            assert_eq!(sink.len(), HEADER_LEN + 16);
        });
    }

    /// Each malformed frame gets the error DaemonEye gives it.
    #[test]
    fn malformed_frames_get_daemoneyes_errors() {
        let body = prost::Message::encode_to_vec(&task("t"));
        let frame = |length: u32, checksum: u32, body: &[u8]| {
            let mut bytes = FrameHeader { length, checksum }.to_bytes().to_vec();
            bytes.extend_from_slice(body);
            bytes
        };
        let good_crc = crc32c::crc32c(&body);
        // Each case's check gets the body's right checksum.
        type Check = fn(&IpcError, u32) -> bool;
        let cases: [(&str, Vec<u8>, Check); 6] = [
            ("zero length", frame(0, 0, &[]), |e, _| {
                matches!(e, IpcError::InvalidLength { length: 0 })
            }),
            (
                "over the limit",
                frame(u32::MAX, 0, &[]),
                |e, _| matches!(e, IpcError::TooLarge { size, max_size: 1024 } if *size == u32::MAX as usize),
            ),
            ("body cut short", frame(10, 0, &[1, 2, 3]), |e, _| {
                matches!(e, IpcError::PeerClosed)
            }),
            ("header cut short", vec![5, 0, 0], |e, _| {
                matches!(e, IpcError::PeerClosed)
            }),
            (
                "checksum",
                frame(body.len() as u32, good_crc ^ 1, &body),
                |e, good| matches!(e, IpcError::CrcMismatch { expected, actual } if *expected == good ^ 1 && *actual == good),
            ),
            (
                "not a message",
                frame(1, crc32c::crc32c(&[0xff]), &[0xff]),
                |e, _| matches!(e, IpcError::Decode(_)),
            ),
        ];
        runtime().block_on(async {
            for (what, bytes, expected) in cases {
                let mut reader = bytes.as_slice();
                let error = IpcCodec::new(1024)
                    .read_message::<DetectionTask, _>(&mut reader, PATIENCE)
                    .await
                    .expect_err(what);
                assert!(expected(&error, good_crc), "{what}: {error:?}");
            }
        });
    }

    #[test]
    fn a_reader_that_sends_nothing_times_out() {
        runtime().block_on(async {
            let (_near, mut far) = tokio::io::duplex(64);
            let error = IpcCodec::default()
                .read_message::<DetectionTask, _>(&mut far, Duration::from_millis(50))
                .await
                .unwrap_err();
            assert!(matches!(error, IpcError::Timeout), "{error:?}");
        });
    }

    #[test]
    fn the_messages_are_daemoneyes() {
        assert_eq!(
            IpcError::CrcMismatch {
                expected: 0xab,
                actual: 0x1234_5678
            }
            .to_string(),
            "CRC32 mismatch: expected 000000ab, got 12345678"
        );
        assert_eq!(
            IpcError::TooLarge {
                size: 2048,
                max_size: 1024
            }
            .to_string(),
            "Message too large: 2048 bytes (max: 1024)"
        );
        assert_eq!(
            IpcError::Encode("No message handler set".into()).to_string(),
            "Protobuf encode error: No message handler set"
        );
        assert_eq!(
            IpcError::ServerNotFound {
                endpoint: "/e".into()
            }
            .to_string(),
            "Server not found at /e - ensure procmond is running"
        );
    }
}
