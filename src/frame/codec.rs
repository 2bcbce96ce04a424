//! tokio-util codecs over the frame core, for use with
//! [`Framed`](tokio_util::codec::Framed), [`FramedRead`](tokio_util::codec::FramedRead)
//! and [`FramedWrite`](tokio_util::codec::FramedWrite).
//!
//! * [`FrameCodec`] moves raw message bodies (`Bytes` out, `BytesMut` in).
//! * [`MessageCodec<Out, In>`] prost-encodes `Out` and prost-decodes `In`.
//!   [`ClientCodec`] and [`ServerCodec`] name the two directions of the
//!   collector/agent protocol.
//!
//! Both hand every decoding decision to [`FrameDecoder`], so there is one
//! definition of the wire.

use std::fmt;
use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::{FrameDecoder, FrameSettings, encode_frame, encode_message};
use crate::error::IpcError;
use crate::proto::{DetectionResult, DetectionTask};

/// Frames raw bytes: encodes `Bytes` bodies, decodes verified `BytesMut` bodies.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    decoder: FrameDecoder,
}

impl FrameCodec {
    /// A codec that enforces `settings` in both directions.
    pub fn new(settings: FrameSettings) -> FrameCodec {
        FrameCodec {
            decoder: FrameDecoder::new(settings),
        }
    }

    /// True while a frame has started arriving but is not complete.
    pub fn is_mid_frame(&self) -> bool {
        self.decoder.is_mid_frame()
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = IpcError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, IpcError> {
        self.decoder.decode(src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, IpcError> {
        self.decoder.decode_eof(src)
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = IpcError;

    fn encode(&mut self, body: Bytes, dst: &mut BytesMut) -> Result<(), IpcError> {
        encode_frame(&body, self.decoder.settings(), dst)
    }
}

impl Encoder<&[u8]> for FrameCodec {
    type Error = IpcError;

    fn encode(&mut self, body: &[u8], dst: &mut BytesMut) -> Result<(), IpcError> {
        encode_frame(body, self.decoder.settings(), dst)
    }
}

/// Frames prost messages: sends `Out`, receives `In`.
///
/// A frame that passes its checksum but does not decode as `In` is an
/// [`IpcError::MalformedMessage`].
pub struct MessageCodec<Out, In> {
    decoder: FrameDecoder,
    // fn() -> keeps the codec Send + Sync whatever the message types are.
    _messages: PhantomData<fn(Out) -> In>,
}

/// The agent's side: sends [`DetectionTask`], receives [`DetectionResult`].
pub type ClientCodec = MessageCodec<DetectionTask, DetectionResult>;

/// The collector's side: sends [`DetectionResult`], receives [`DetectionTask`].
pub type ServerCodec = MessageCodec<DetectionResult, DetectionTask>;

impl<Out, In> MessageCodec<Out, In> {
    /// A codec that enforces `settings` in both directions.
    pub fn new(settings: FrameSettings) -> Self {
        MessageCodec {
            decoder: FrameDecoder::new(settings),
            _messages: PhantomData,
        }
    }

    /// The settings this codec enforces.
    pub fn settings(&self) -> FrameSettings {
        self.decoder.settings()
    }

    /// True while a frame has started arriving but is not complete.
    pub fn is_mid_frame(&self) -> bool {
        self.decoder.is_mid_frame()
    }
}

impl<Out, In> Clone for MessageCodec<Out, In> {
    fn clone(&self) -> Self {
        MessageCodec {
            decoder: self.decoder.clone(),
            _messages: PhantomData,
        }
    }
}

impl<Out, In> fmt::Debug for MessageCodec<Out, In> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageCodec")
            .field("out", &std::any::type_name::<Out>())
            .field("in", &std::any::type_name::<In>())
            .field("decoder", &self.decoder)
            .finish()
    }
}

impl<Out, In: prost::Message + Default> MessageCodec<Out, In> {
    fn decode_body(body: Option<BytesMut>) -> Result<Option<In>, IpcError> {
        body.map(|body| decode_message(&body)).transpose()
    }
}

/// Decodes one verified frame body as a message of type `M`.
///
/// Decoding from a plain slice rather than the `BytesMut` it arrived in:
/// prost advances its buffer field by field, which a slice does in one
/// pointer bump and a `BytesMut` in several checks.
pub(crate) fn decode_message<M: prost::Message + Default>(body: &[u8]) -> Result<M, IpcError> {
    M::decode(body).map_err(|source| IpcError::MalformedMessage {
        message_type: short_type_name::<M>(),
        length: body.len(),
        source,
    })
}

/// Decodes one verified frame body as a message of type `M` whose `bytes`
/// fields share `body` rather than copying out of it (the
/// [views](crate::view)).
pub(crate) fn decode_shared_message<M: prost::Message + Default>(
    body: Bytes,
) -> Result<M, IpcError> {
    let length = body.len();
    M::decode(body).map_err(|source| IpcError::MalformedMessage {
        message_type: short_type_name::<M>(),
        length,
        source,
    })
}

impl<Out, In: prost::Message + Default> Decoder for MessageCodec<Out, In> {
    type Item = In;
    type Error = IpcError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, IpcError> {
        Self::decode_body(self.decoder.decode(src)?)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<In>, IpcError> {
        Self::decode_body(self.decoder.decode_eof(src)?)
    }
}

impl<Out: prost::Message, In> Encoder<Out> for MessageCodec<Out, In> {
    type Error = IpcError;

    fn encode(&mut self, message: Out, dst: &mut BytesMut) -> Result<(), IpcError> {
        encode_message(&message, self.decoder.settings(), dst)
    }
}

impl<'a, Out: prost::Message, In> Encoder<&'a Out> for MessageCodec<Out, In> {
    type Error = IpcError;

    fn encode(&mut self, message: &'a Out, dst: &mut BytesMut) -> Result<(), IpcError> {
        encode_message(message, self.decoder.settings(), dst)
    }
}

/// `DetectionTask` rather than `daemoneye_ipc::proto::DetectionTask`, for messages.
pub(crate) fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}
