//! [`IpcError`]: every way the IPC layer can fail, each message saying what
//! happened and what to do about it.

use std::io;
use std::path::PathBuf;

use crate::config::ConfigOrigin;
use crate::frame::Crc32Variant;

/// Every error of this crate.
///
/// Messages are written for the operator reading a log line: they name the
/// endpoint, the limit or the value involved, and suggest the fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IpcError {
    // ---- wire format ----------------------------------------------------
    /// A frame header announced a body larger than `max_frame_bytes`.
    #[error(
        "frame header announces {length} bytes, over the limit max_frame_bytes = {limit}; \
         the connection is closed (if the peer is legitimate, raise ipc.max_frame_bytes on both sides)"
    )]
    FrameTooLarge {
        /// Body length the header claimed.
        length: u32,
        /// The configured limit.
        limit: u32,
    },

    /// A message to be sent does not fit in one frame.
    #[error(
        "message of {length} bytes does not fit in one frame (max_frame_bytes = {limit}); \
         send less per message or raise ipc.max_frame_bytes on both sides"
    )]
    MessageTooLarge {
        /// Encoded message length.
        length: usize,
        /// The configured limit.
        limit: u32,
    },

    /// A frame's body does not match the checksum in its header.
    #[error(
        "frame checksum mismatch on a {length}-byte body: header says {expected:#010x}, body computes \
         {actual:#010x} with crc32 variant {variant}; the frame is corrupt, or the peers disagree on \
         ipc.crc32_variant (ieee vs castagnoli)"
    )]
    ChecksumMismatch {
        /// Checksum carried in the header.
        expected: u32,
        /// Checksum computed over the received body.
        actual: u32,
        /// Variant used to compute `actual`.
        variant: Crc32Variant,
        /// Body length.
        length: u32,
    },

    /// The byte stream ended in the middle of a frame.
    #[error(
        "connection closed in the middle of a frame ({received} of {expected} bytes arrived); \
         the peer crashed or closed the connection while sending"
    )]
    TruncatedFrame {
        /// Bytes of the frame (header included) that arrived.
        received: usize,
        /// Bytes the frame needed (header included), as far as known.
        expected: usize,
    },

    /// A frame passed its checksum but its body is not the expected message.
    #[error(
        "a {length}-byte frame passed its checksum but is not a valid {message_type}: {source}; \
         the peer speaks another protocol or another version of it"
    )]
    MalformedMessage {
        /// The message type that was expected.
        message_type: &'static str,
        /// Body length.
        length: usize,
        /// What prost found wrong.
        source: prost::DecodeError,
    },

    // ---- configuration --------------------------------------------------
    /// A transport name that this crate does not know at all.
    #[error("unknown transport {given:?}; the transports are: {}", known.join(", "))]
    UnknownTransport {
        /// What was given.
        given: String,
        /// Every transport name this crate knows.
        known: Vec<&'static str>,
    },

    /// A transport this crate knows but this build does not contain.
    #[error(
        "transport {requested:?}{} is not compiled into this build; available: {}. \
         Pick one of those, or rebuild with the Cargo feature ipc-{requested}",
        origin_suffix(origin.as_ref()),
        available.join(", ")
    )]
    TransportNotCompiled {
        /// The transport asked for.
        requested: &'static str,
        /// Where the request came from.
        origin: Option<ConfigOrigin>,
        /// The transports this build has.
        available: Vec<&'static str>,
    },

    /// A CRC variant name that does not exist.
    #[error("unknown crc32 variant {given:?}; use \"ieee\" (the default) or \"castagnoli\"")]
    UnknownCrc32Variant {
        /// What was given.
        given: String,
    },

    /// The config file could not be read.
    #[error("cannot read config file {}: {source}; check the --config path and its permissions", path.display())]
    ConfigFileUnreadable {
        /// The file.
        path: PathBuf,
        /// Why reading failed.
        source: io::Error,
    },

    /// The config file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("invalid config file {}: {message}", path.display())]
    ConfigFileInvalid {
        /// The file.
        path: PathBuf,
        /// The parser's account, which names the key and line.
        message: String,
    },

    /// An environment variable in the `DAEMONEYE_IPC_` namespace that names no setting.
    #[error("unknown environment variable {var}; the IPC settings are: {}", known.join(", "))]
    UnknownEnvVar {
        /// The variable.
        var: String,
        /// Every variable that is read.
        known: Vec<String>,
    },

    /// An environment variable whose value cannot be parsed.
    #[error("environment variable {var}={value:?} is not valid: expected {expected}")]
    InvalidEnvValue {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
        /// What the value should look like.
        expected: String,
    },

    /// A setting whose value is out of range.
    #[error("invalid ipc.{field} = {value}{}: {requirement}", origin_suffix(origin.as_ref()))]
    InvalidConfig {
        /// The setting's key.
        field: &'static str,
        /// The rejected value.
        value: String,
        /// Where the value came from.
        origin: Option<ConfigOrigin>,
        /// What a valid value looks like.
        requirement: String,
    },

    // ---- I/O ------------------------------------------------------------
    /// An I/O error while reading or writing frames.
    #[error("I/O error on the IPC connection: {0}")]
    Io(#[from] io::Error),
}

fn origin_suffix(origin: Option<&ConfigOrigin>) -> String {
    origin
        .map(|origin| format!(" (from {origin})"))
        .unwrap_or_default()
}
