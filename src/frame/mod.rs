//! The wire format, as pure functions: no sockets, no clocks, no allocation
//! beyond what the caller's buffer needs.
//!
//! Every frame on the wire, whatever backend carries it, is:
//!
//! ```text
//! 0               4               8                         8 + N
//! +---------------+---------------+---------------------------+
//! | length N      | crc32         | N bytes: prost message    |
//! | u32 LE        | u32 LE        |                           |
//! +---------------+---------------+---------------------------+
//! ```
//!
//! * `crc32` covers the N message bytes only, never the header. Its polynomial
//!   is chosen by [`Crc32Variant`].
//! * `N = 0` is a valid frame: an all-default proto3 message encodes to zero
//!   bytes.
//! * `N > max_frame_bytes` is refused as soon as the 8 header bytes are in,
//!   before a single byte of buffer is set aside for the body.
//!
//! [`FrameDecoder`] is the incremental reader used by every backend (through
//! the tokio-util codecs in [`codec`], or driven by hand); [`encode_message`]
//! and [`encode_frame`] are the writers.

pub mod codec;

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use bytes::{Buf, BufMut, BytesMut};
use serde::{Deserialize, Serialize};

use crate::error::IpcError;

/// Size of the frame header: u32 LE length, then u32 LE CRC32.
pub const HEADER_LEN: usize = 8;

/// The CRC-32 polynomial used for the frame checksum.
///
/// Both peers must agree: a mismatch shows up as a checksum error on the very
/// first frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Crc32Variant {
    /// CRC-32/ISO-HDLC (zlib, Ethernet), polynomial 0x04C11DB7 reflected.
    /// The decision record's default.
    #[default]
    Ieee,
    /// CRC-32C (iSCSI), polynomial 0x1EDC6F41 reflected, hardware-accelerated
    /// on x86_64 (SSE4.2) and aarch64. What the upstream agent build ships.
    Castagnoli,
}

impl Crc32Variant {
    /// Every variant, in the order they are documented.
    pub const ALL: [Crc32Variant; 2] = [Crc32Variant::Ieee, Crc32Variant::Castagnoli];

    /// The checksum of `bytes` under this variant.
    #[inline]
    pub fn checksum(self, bytes: &[u8]) -> u32 {
        match self {
            Crc32Variant::Ieee => {
                // `crc32fast::hash` asks which instructions the CPU has on
                // every call, about as many instructions as checksumming a
                // small frame; a hasher set up once is copied instead.
                static IEEE: OnceLock<crc32fast::Hasher> = OnceLock::new();
                let mut hasher = IEEE.get_or_init(crc32fast::Hasher::new).clone();
                hasher.update(bytes);
                hasher.finalize()
            }
            Crc32Variant::Castagnoli => crc32c::crc32c(bytes),
        }
    }

    /// The checksum of `first` followed by `second`, from the checksum of
    /// each and the length of `second` (the length of `first` plays no
    /// part), without reading either again.
    pub fn combine(self, first: u32, second: u32, second_len: usize) -> u32 {
        match self {
            Crc32Variant::Ieee => {
                let mut whole = crc32fast::Hasher::new_with_initial(first);
                whole.combine(&crc32fast::Hasher::new_with_initial_len(
                    second,
                    second_len as u64,
                ));
                whole.finalize()
            }
            Crc32Variant::Castagnoli => crc32c::crc32c_combine(first, second, second_len),
        }
    }

    /// The other variant.
    pub fn other(self) -> Crc32Variant {
        match self {
            Crc32Variant::Ieee => Crc32Variant::Castagnoli,
            Crc32Variant::Castagnoli => Crc32Variant::Ieee,
        }
    }

    /// The name used in config files, flags and logs (`ieee`, `castagnoli`).
    pub fn name(self) -> &'static str {
        match self {
            Crc32Variant::Ieee => "ieee",
            Crc32Variant::Castagnoli => "castagnoli",
        }
    }
}

impl fmt::Display for Crc32Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Crc32Variant {
    type Err = IpcError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Crc32Variant::ALL
            .into_iter()
            .find(|variant| variant.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| IpcError::UnknownCrc32Variant {
                given: s.to_owned(),
            })
    }
}

/// What both ends of a connection must agree on to read each other's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSettings {
    /// Checksum polynomial.
    pub crc32: Crc32Variant,
    /// Largest message body accepted or sent, in bytes (the header is extra).
    pub max_frame_bytes: u32,
}

impl FrameSettings {
    /// The decision record's defaults: IEEE CRC, 1 MiB frames.
    pub const DEFAULT: FrameSettings = FrameSettings {
        crc32: Crc32Variant::Ieee,
        max_frame_bytes: 1024 * 1024,
    };
}

impl Default for FrameSettings {
    fn default() -> Self {
        FrameSettings::DEFAULT
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Length of the message body in bytes.
    pub length: u32,
    /// CRC-32 of the message body.
    pub checksum: u32,
}

impl FrameHeader {
    /// The header that belongs in front of `body`.
    ///
    /// Fails if `body` is longer than `u32::MAX`, which no header can express.
    pub fn for_body(body: &[u8], crc32: Crc32Variant) -> Result<FrameHeader, IpcError> {
        let length = u32::try_from(body.len()).map_err(|_| IpcError::MessageTooLarge {
            length: body.len(),
            limit: u32::MAX,
        })?;
        Ok(FrameHeader {
            length,
            checksum: crc32.checksum(body),
        })
    }

    /// Reads a header from its 8 wire bytes. Every bit pattern is a header;
    /// whether it is acceptable is for [`check_length`](Self::check_length)
    /// and [`verify`](Self::verify) to say.
    #[inline]
    pub fn parse(bytes: [u8; HEADER_LEN]) -> FrameHeader {
        let [l0, l1, l2, l3, c0, c1, c2, c3] = bytes;
        FrameHeader {
            length: u32::from_le_bytes([l0, l1, l2, l3]),
            checksum: u32::from_le_bytes([c0, c1, c2, c3]),
        }
    }

    /// The 8 wire bytes of this header.
    #[inline]
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut bytes = [0; HEADER_LEN];
        bytes[..4].copy_from_slice(&self.length.to_le_bytes());
        bytes[4..].copy_from_slice(&self.checksum.to_le_bytes());
        bytes
    }

    /// Refuses a header whose length exceeds `max_frame_bytes`. Decided from
    /// the header alone, so an oversize frame costs no body buffer.
    #[inline]
    pub fn check_length(self, max_frame_bytes: u32) -> Result<usize, IpcError> {
        if self.length > max_frame_bytes {
            return Err(IpcError::FrameTooLarge {
                length: self.length,
                limit: max_frame_bytes,
            });
        }
        Ok(self.length as usize)
    }

    /// Checks `body` against this header's length and checksum.
    pub fn verify(self, body: &[u8], crc32: Crc32Variant) -> Result<(), IpcError> {
        debug_assert_eq!(
            body.len(),
            self.length as usize,
            "caller passes exactly the body"
        );
        let actual = crc32.checksum(body);
        if actual != self.checksum {
            // Only on this (rare) path: which variant the peer uses, if the
            // disagreement is that rather than a corrupt frame.
            let other = crc32.other();
            return Err(IpcError::ChecksumMismatch {
                expected: self.checksum,
                actual,
                variant: crc32,
                length: self.length,
                peer_variant: (other.checksum(body) == self.checksum).then_some(other),
            });
        }
        Ok(())
    }
}

/// Appends one frame carrying `message` to `dst`: header and body land in one
/// contiguous buffer, the body is encoded in place and never copied, so the
/// frame can go out in a single write.
///
/// Fails, leaving `dst` as it was, if the encoded message exceeds
/// `settings.max_frame_bytes`.
pub fn encode_message<M: prost::Message>(
    message: &M,
    settings: FrameSettings,
    dst: &mut BytesMut,
) -> Result<(), IpcError> {
    encode_message_parts(&[message], settings, dst)
}

/// Appends one frame whose body is the encodings of `parts`, one after the
/// other, each encoded in place.
///
/// Protobuf reads concatenated encodings of a message type as one message,
/// merged field by field (a later scalar wins, repeated fields append). So a
/// small part carrying what is particular to one reply (a `task_id`) can
/// precede a large part shared between replies, without copying the large
/// part into a new message first. Parts must not both set a scalar field.
///
/// Fails, leaving `dst` as it was, if the body would exceed
/// `settings.max_frame_bytes`.
pub fn encode_message_parts<M: prost::Message>(
    parts: &[&M],
    settings: FrameSettings,
    dst: &mut BytesMut,
) -> Result<(), IpcError> {
    let length = parts.iter().map(|part| part.encoded_len()).sum();
    let length = checked_body_length(length, settings.max_frame_bytes)?;
    dst.reserve(HEADER_LEN + length as usize);
    let start = dst.len();
    dst.put_bytes(0, HEADER_LEN);
    for part in parts {
        part.encode_raw(dst);
    }
    finish_header(dst, start, length, settings.crc32);
    Ok(())
}

/// Up to this many bytes, a shared tail's checksum is computed again over
/// the frame rather than combined (callgrind: combining two CRC-32s costs
/// about 600 instructions, checksumming 64 bytes about 100).
const CHECKSUM_RATHER_THAN_COMBINE: usize = 2048;

/// Appends one frame whose body is `head`'s encoding followed by `tail`, an
/// encoding made once (with checksum `tail_crc` under `settings.crc32`) and
/// sent in many frames: only `head` is encoded, the tail is copied, and the
/// checksum is combined rather than computed over the tail again. Protobuf
/// merges the two into one message (see [`encode_message_parts`]).
///
/// Fails, leaving `dst` as it was, if the body would exceed
/// `settings.max_frame_bytes`.
pub fn encode_message_with_tail<M: prost::Message>(
    head: &M,
    tail: &[u8],
    tail_crc: u32,
    settings: FrameSettings,
    dst: &mut BytesMut,
) -> Result<(), IpcError> {
    let head_len = head.encoded_len();
    let length = checked_body_length(head_len + tail.len(), settings.max_frame_bytes)?;
    dst.reserve(HEADER_LEN + length as usize);
    let start = dst.len();
    dst.put_bytes(0, HEADER_LEN);
    head.encode_raw(dst);
    let checksum = if tail.len() <= CHECKSUM_RATHER_THAN_COMBINE {
        // Combining costs about what checksumming a few KiB does: a short
        // tail is cheaper to read again.
        dst.put_slice(tail);
        settings.crc32.checksum(&dst[start + HEADER_LEN..])
    } else {
        let head_crc = settings.crc32.checksum(&dst[start + HEADER_LEN..]);
        dst.put_slice(tail);
        settings.crc32.combine(head_crc, tail_crc, tail.len())
    };
    let header = FrameHeader { length, checksum };
    dst[start..start + HEADER_LEN].copy_from_slice(&header.to_bytes());
    Ok(())
}

/// Appends one frame carrying the already-encoded `body` to `dst` (one copy of
/// the body, into the frame buffer). For callers that hold raw bytes; typed
/// messages should use [`encode_message`], which encodes in place.
pub fn encode_frame(
    body: &[u8],
    settings: FrameSettings,
    dst: &mut BytesMut,
) -> Result<(), IpcError> {
    let length = checked_body_length(body.len(), settings.max_frame_bytes)?;
    dst.reserve(HEADER_LEN + body.len());
    let start = dst.len();
    dst.put_bytes(0, HEADER_LEN);
    dst.put_slice(body);
    finish_header(dst, start, length, settings.crc32);
    Ok(())
}

fn checked_body_length(length: usize, max_frame_bytes: u32) -> Result<u32, IpcError> {
    match u32::try_from(length) {
        Ok(fits) if fits <= max_frame_bytes => Ok(fits),
        _ => Err(IpcError::MessageTooLarge {
            length,
            limit: max_frame_bytes,
        }),
    }
}

/// Fills in the placeholder header at `dst[start..]` once the body after it is
/// complete.
fn finish_header(dst: &mut BytesMut, start: usize, length: u32, crc32: Crc32Variant) {
    let body_start = start + HEADER_LEN;
    debug_assert_eq!(
        dst.len() - body_start,
        length as usize,
        "prost wrote encoded_len bytes"
    );
    let header = FrameHeader {
        length,
        checksum: crc32.checksum(&dst[body_start..]),
    };
    dst[start..body_start].copy_from_slice(&header.to_bytes());
}

/// Incremental frame reader: give it whatever bytes have arrived, it hands
/// back whole, verified message bodies.
///
/// It never reserves space in the caller's buffer. A header announcing a
/// 1 MiB body costs nothing until the body's bytes actually arrive; the buffer
/// grows with the data read into it, not with what the peer claims.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    settings: FrameSettings,
    /// The header of the frame whose body is still arriving.
    pending: Option<FrameHeader>,
}

impl FrameDecoder {
    /// A decoder that enforces `settings`.
    pub fn new(settings: FrameSettings) -> FrameDecoder {
        FrameDecoder {
            settings,
            pending: None,
        }
    }

    /// The settings this decoder enforces.
    pub fn settings(&self) -> FrameSettings {
        self.settings
    }

    /// True while part of a frame has been consumed from the buffer but the
    /// frame is not complete yet.
    pub fn is_mid_frame(&self) -> bool {
        self.pending.is_some()
    }

    /// The body length the frame in progress announced, once its header has
    /// been taken off the buffer.
    pub(crate) fn pending_length(&self) -> Option<usize> {
        self.pending.map(|header| header.length as usize)
    }

    /// Takes one complete frame off the front of `buf` and returns its
    /// verified body, or `Ok(None)` if more bytes are needed.
    ///
    /// Errors are final for the stream: after a checksum or length error the
    /// byte stream can no longer be trusted to be aligned on frames.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, IpcError> {
        let header = match self.pending {
            Some(header) => header,
            None => {
                let Some(header_bytes) = buf.first_chunk::<HEADER_LEN>() else {
                    return Ok(None);
                };
                let header = FrameHeader::parse(*header_bytes);
                header.check_length(self.settings.max_frame_bytes)?;
                buf.advance(HEADER_LEN);
                self.pending = Some(header);
                header
            }
        };
        let length = header.length as usize;
        if buf.len() < length {
            return Ok(None);
        }
        self.pending = None;
        let body = buf.split_to(length);
        header.verify(&body, self.settings.crc32)?;
        Ok(Some(body))
    }

    /// Called when the byte stream has ended: `Ok(None)` if it ended cleanly
    /// between frames, a [`IpcError::TruncatedFrame`] if it ended inside one.
    pub fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, IpcError> {
        if let Some(body) = self.decode(buf)? {
            return Ok(Some(body));
        }
        let (received, expected) = match self.pending {
            // Saturating: on 32-bit targets a u32 length plus the header can
            // exceed usize.
            Some(header) => (
                HEADER_LEN + buf.len(),
                HEADER_LEN.saturating_add(header.length as usize),
            ),
            None if buf.is_empty() => return Ok(None),
            None => (buf.len(), HEADER_LEN),
        };
        Err(IpcError::TruncatedFrame { received, expected })
    }
}
