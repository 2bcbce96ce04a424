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
    #[error("{}", describe_checksum_mismatch(*expected, *actual, *variant, *length, *peer_variant))]
    ChecksumMismatch {
        /// Checksum carried in the header.
        expected: u32,
        /// Checksum computed over the received body.
        actual: u32,
        /// Variant used to compute `actual`.
        variant: Crc32Variant,
        /// Body length.
        length: u32,
        /// The other variant, if the body matches the header under it: the
        /// peers disagree on `ipc.crc32_variant`, and this is the peer's.
        peer_variant: Option<Crc32Variant>,
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

    /// A result arrived for a task, with its id intact, but its fields do
    /// not decode as the type the caller asked for. This task failed; the
    /// connection, whose framing is intact, carries on.
    #[error(
        "the result for task {task_id:?} from {endpoint} is not a valid {message_type} \
         ({length} bytes: {source}); the collector speaks another version of the protocol or \
         is broken. This task failed; other tasks on the connection are unaffected"
    )]
    MalformedResult {
        /// The endpoint.
        endpoint: String,
        /// The task whose result it was.
        task_id: String,
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

    // ---- endpoints --------------------------------------------------------
    /// A Linux abstract-namespace socket name was given.
    #[error(
        "endpoint {name:?} is an abstract-namespace socket name; those are refused because they carry \
         no file permissions (any process in the network namespace could connect). Use a filesystem \
         path such as /run/daemoneye/procmond.sock"
    )]
    AbstractSocketRefused {
        /// The name given.
        name: String,
    },

    /// A Unix socket path longer than the platform's `sun_path` allows.
    #[error(
        "endpoint path {} is {length} bytes; Unix socket paths are limited to {limit} bytes on this \
         platform. Choose a shorter path",
        path.display()
    )]
    EndpointPathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        length: usize,
        /// The platform limit.
        limit: usize,
    },

    /// A Windows pipe name that points at another machine, or at no pipe.
    #[error(
        "endpoint {name:?} is not a local named pipe; give a name such as daemoneye\\procmond or \
         \\\\.\\pipe\\daemoneye\\procmond (remote pipes are refused: this transport is local only)"
    )]
    NotALocalPipe {
        /// The name given.
        name: String,
    },

    /// The directory that holds the socket, or one of its parents, could be
    /// tampered with by another user.
    #[error(
        "refusing to use directory {} for the socket: {reason}. The socket's directory must be owned \
         by uid {expected_owner} or root and writable by no one else (its parents likewise, unless \
         sticky like /tmp), and must not be a symbolic link. Fix it with chmod/chown, or choose another \
         --endpoint",
        dir.display()
    )]
    UnsafeEndpointDirectory {
        /// The directory.
        dir: PathBuf,
        /// What is wrong with it.
        reason: String,
        /// The uid that may own it besides root (the server's effective uid).
        expected_owner: u32,
    },

    /// Something other than a socket is at the endpoint path.
    #[error(
        "{} exists and is a {kind}, not a socket; refusing to remove it. Move it away or choose \
         another --endpoint",
        path.display()
    )]
    NotASocket {
        /// The path.
        path: PathBuf,
        /// What is there ("regular file", "directory", ...).
        kind: &'static str,
    },

    /// A symbolic link is at the endpoint path.
    #[error(
        "{} is a symbolic link; refusing to follow or remove it (a link could redirect the socket \
         elsewhere). Remove the link or choose another --endpoint",
        path.display()
    )]
    SymlinkAtEndpoint {
        /// The path.
        path: PathBuf,
    },

    /// Another server answers at the endpoint.
    #[error(
        "endpoint {endpoint} is in use by a running server; stop that server first or choose another \
         --endpoint"
    )]
    EndpointInUse {
        /// The endpoint.
        endpoint: String,
    },

    /// The socket file did not come out as restricted as it should.
    #[error(
        "socket {} was created with mode {mode:04o}, owner uid {owner} and group {group}, not at most \
         {expected_mode:04o}, uid {expected_owner}{}; refusing to serve on it",
        path.display(),
        expected_group.map(|gid| format!(" and group {gid}")).unwrap_or_default()
    )]
    InsecureSocket {
        /// The socket path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// The most open its permission bits may be.
        expected_mode: u32,
        /// Its owner.
        owner: u32,
        /// Its group.
        group: u32,
        /// The uid that should own it.
        expected_owner: u32,
        /// The group that should own it (`socket_group`), if any.
        expected_group: Option<u32>,
    },

    /// Preparing the endpoint (directory, stale socket, permissions) failed.
    #[error("cannot prepare endpoint {endpoint}: {action} failed: {source}")]
    EndpointIo {
        /// The endpoint.
        endpoint: String,
        /// What was being done ("create directory /run/daemoneye", ...).
        action: String,
        /// The OS error.
        source: io::Error,
    },

    /// Binding the listener failed.
    #[error("cannot listen on {endpoint} with transport {transport}: {source}")]
    Bind {
        /// The endpoint.
        endpoint: String,
        /// The transport.
        transport: &'static str,
        /// The OS error.
        source: io::Error,
    },

    // ---- client -----------------------------------------------------------
    /// No server answered within the connect deadline.
    #[error(
        "no server answered at {endpoint} within {waited_ms} ms (transport {transport}; last attempt: \
         {last_error}); is the collector running, and is the endpoint right? (How long to keep \
         trying is ipc.accept_timeout_ms: --accept-timeout-ms, DAEMONEYE_IPC_ACCEPT_TIMEOUT_MS.)"
    )]
    ConnectTimeout {
        /// The endpoint.
        endpoint: String,
        /// The transport.
        transport: &'static str,
        /// How long the client kept trying.
        waited_ms: u64,
        /// Why the last attempt failed.
        last_error: String,
    },

    /// Connecting failed for a reason that retrying will not fix.
    #[error("cannot connect to {endpoint} with transport {transport}: {source}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The transport.
        transport: &'static str,
        /// The OS error.
        source: io::Error,
    },

    /// The process serving the endpoint is not one this client trusts.
    #[error("{}", describe_untrusted_server(endpoint, reason))]
    UntrustedServer {
        /// The endpoint.
        endpoint: String,
        /// Why the server is not trusted.
        reason: String,
    },

    /// The server refused the connection and said why (its notice: the
    /// agent's credentials, no slot free); the task did not run.
    #[error(
        "the collector at {endpoint} refused this connection: {reason}; task {task_id:?} did not \
         run"
    )]
    Refused {
        /// The endpoint.
        endpoint: String,
        /// The task that was not run.
        task_id: String,
        /// The server's words.
        reason: String,
    },

    /// A task was sent without a `task_id`.
    #[error(
        "refusing to send a task with an empty task_id: the id is what matches the result to the \
         request; give each task an id unique among those in flight"
    )]
    EmptyTaskId,

    /// A task was sent with the id of a task still in flight on this client.
    #[error(
        "task_id {task_id:?} is still outstanding on this connection (in flight, or given up on after \
         a timeout and not answered yet); ids must be unique among outstanding tasks, so wait for the \
         first result or pick another id"
    )]
    DuplicateTaskId {
        /// The id.
        task_id: String,
    },

    /// The connection dropped while a task was in flight.
    #[error(
        "connection to {endpoint} lost while task {task_id:?} was in flight ({reason}); the task may or \
         may not have run. The next send reconnects"
    )]
    ConnectionLost {
        /// The endpoint.
        endpoint: String,
        /// The task that got no answer.
        task_id: String,
        /// What ended the connection.
        reason: String,
    },

    /// No answer arrived within the read deadline.
    #[error(
        "no result for task {task_id:?} from {endpoint} within {waited_ms} ms (read_timeout_ms); the \
         collector is overloaded or stuck"
    )]
    ResponseTimeout {
        /// The endpoint.
        endpoint: String,
        /// The task.
        task_id: String,
        /// How long the client waited.
        waited_ms: u64,
    },

    /// Every in-flight slot of the connection stayed taken for the whole
    /// read deadline, so the task was not sent.
    #[error(
        "task {task_id:?} was not sent to {endpoint}: the connection's in-flight limit ({in_flight}) \
         was reached and no task finished within {waited_ms} ms (read_timeout_ms); the collector is \
         overloaded or stuck"
    )]
    InFlightLimit {
        /// The endpoint.
        endpoint: String,
        /// The task that was not sent.
        task_id: String,
        /// The client's in-flight limit, all of it taken.
        in_flight: usize,
        /// How long the task waited for a slot.
        waited_ms: u64,
    },

    // ---- deadlines on a connection ------------------------------------------
    /// A frame did not arrive whole within the read deadline, or the
    /// connection sat idle past it.
    #[error("{}", describe_read_timeout(*waited_ms, *received))]
    ReadTimeout {
        /// The deadline that passed.
        waited_ms: u64,
        /// Bytes of the unfinished frame that had arrived (0: the connection was idle).
        received: usize,
    },

    /// A frame could not be written within the write deadline.
    #[error(
        "writing a {length}-byte frame took longer than {waited_ms} ms (write_timeout_ms); the peer is \
         not reading"
    )]
    WriteTimeout {
        /// The deadline that passed.
        waited_ms: u64,
        /// Frame size, header included.
        length: usize,
    },

    // ---- I/O ------------------------------------------------------------
    /// An I/O error while reading or writing frames.
    #[error("I/O error on the IPC connection: {0}")]
    Io(#[from] io::Error),
}

fn describe_checksum_mismatch(
    expected: u32,
    actual: u32,
    variant: Crc32Variant,
    length: u32,
    peer_variant: Option<Crc32Variant>,
) -> String {
    match peer_variant {
        Some(theirs) => format!(
            "frame checksum mismatch: this side uses crc32_variant = {variant} and the peer's \
             frames are checksummed with {theirs}; set ipc.crc32_variant (DAEMONEYE_IPC_CRC32_VARIANT, \
             --crc32) to the same on both sides"
        ),
        None => format!(
            "frame checksum mismatch on a {length}-byte body: header says {expected:#010x}, body \
             computes {actual:#010x} with crc32 variant {variant} (nor does the other variant \
             match); the frame is corrupt"
        ),
    }
}

fn describe_untrusted_server(endpoint: &str, reason: &str) -> String {
    let remedy = if cfg!(windows) {
        "stop whatever holds the pipe name, then restart the collector"
    } else {
        "if that server is legitimate, allow its uid (--allow-uid)"
    };
    format!(
        "refusing to send tasks to the server at {endpoint}: {reason}. Another user may be squatting \
         the endpoint; {remedy}"
    )
}

fn describe_read_timeout(waited_ms: u64, received: usize) -> String {
    if received == 0 {
        format!(
            "connection idle for {waited_ms} ms (read_timeout_ms) with nothing in flight; closing it"
        )
    } else {
        format!(
            "a frame started arriving but was not complete within {waited_ms} ms (read_timeout_ms; \
             {received} bytes arrived); the peer is stalled or trickling bytes"
        )
    }
}

fn origin_suffix(origin: Option<&ConfigOrigin>) -> String {
    origin
        .map(|origin| format!(" (from {origin})"))
        .unwrap_or_default()
}
