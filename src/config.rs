//! [`IpcConfig`]: the decision record's eight settings plus the task
//! deadline and the per-peer connection cap, where they come from, and what
//! values they may take.
//!
//! Values are layered, each layer overriding the one before:
//!
//! 1. built-in defaults ([`IpcConfig::default`]);
//! 2. the `[ipc]` table of a TOML file;
//! 3. environment variables `DAEMONEYE_IPC_<FIELD>` (for example
//!    `DAEMONEYE_IPC_TRANSPORT=tokio`);
//! 4. command-line flags ([`ConfigOverrides`]).
//!
//! [`ConfigLoader`] does the layering and remembers where each value came
//! from ([`LoadedConfig::origin`]), so that errors and `daemoneye-ipc config`
//! can say it.
//!
//! ```toml
//! [ipc]
//! transport = "interprocess"      # or "tokio", or "legacy"
//! endpoint_path = "/run/daemoneye/procmond.sock"
//! max_frame_bytes = 1048576
//! accept_timeout_ms = 5000
//! read_timeout_ms = 30000
//! write_timeout_ms = 10000
//! task_timeout_ms = 25000
//! max_connections = 16
//! max_connections_per_peer = 0    # 0: no cap beyond max_connections
//! crc32_variant = "ieee"          # or "castagnoli"
//! socket_group = ""               # Unix: a group whose members may connect
//! ```

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::endpoint::Endpoint;
use crate::error::IpcError;
use crate::frame::{Crc32Variant, FrameSettings};

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "DAEMONEYE_IPC_";

/// Smallest accepted `max_frame_bytes`: below this even the server's error
/// answer ("result too large") might not fit in a frame.
pub const MIN_FRAME_BYTES: usize = 1024;

/// Largest accepted `max_frame_bytes`: 64 MiB. A frame is held whole in
/// memory, by both ends; a larger limit only lets one peer make the other
/// allocate more.
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Largest accepted `max_connections`.
pub const MAX_CONNECTIONS_LIMIT: usize = 65_536;

/// Largest `max_connections` the `legacy` backend serves: it runs a thread
/// per connection (each with a [`LEGACY_THREAD_STACK_BYTES`] stack).
pub const LEGACY_MAX_CONNECTIONS: usize = 1024;

/// The stack of each `legacy` connection thread, the server's and the
/// client's: 1 MiB of address space, of which only what is used is memory.
/// A handler's synchronous part (up to its first await) runs on it.
pub const LEGACY_THREAD_STACK_BYTES: usize = 1024 * 1024;

/// Largest accepted timeout: one day. Anything longer is almost certainly a
/// unit mistake (seconds or microseconds written as milliseconds).
pub const MAX_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;

/// Which backend carries the bytes. The wire format is the same for all of
/// them, so the two ends of a connection may use different ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub enum TransportKind {
    /// `interprocess::local_socket` (Phase 2): one code path for Unix sockets
    /// and Windows named pipes. Cargo feature `ipc-interprocess`.
    Interprocess,
    /// `tokio::net` Unix sockets and named pipes (Phase 1). Cargo feature
    /// `ipc-tokio`.
    Tokio,
    /// The rollback backend: the operating system's blocking sockets and
    /// pipes on threads of its own, sharing no socket code with the other
    /// two. Cargo feature `ipc-legacy`.
    Legacy,
}

impl TransportKind {
    /// Every transport this crate knows, compiled in or not.
    pub const ALL: [TransportKind; 3] = [
        TransportKind::Interprocess,
        TransportKind::Tokio,
        TransportKind::Legacy,
    ];

    /// The name used in config files, flags, logs and telemetry.
    pub const fn name(self) -> &'static str {
        match self {
            TransportKind::Interprocess => "interprocess",
            TransportKind::Tokio => "tokio",
            TransportKind::Legacy => "legacy",
        }
    }

    /// Whether this build contains the transport.
    pub const fn is_compiled(self) -> bool {
        match self {
            TransportKind::Interprocess => cfg!(feature = "ipc-interprocess"),
            TransportKind::Tokio => cfg!(feature = "ipc-tokio"),
            TransportKind::Legacy => cfg!(feature = "ipc-legacy"),
        }
    }

    /// The transports this build contains, in preference order.
    pub fn compiled() -> impl Iterator<Item = TransportKind> {
        TransportKind::ALL
            .into_iter()
            .filter(|kind| kind.is_compiled())
    }

    /// `interprocess` (the decision record's default) when compiled in,
    /// otherwise the first transport this build has.
    pub fn default_for_build() -> TransportKind {
        TransportKind::compiled()
            .next()
            .expect("lib.rs refuses to compile without a backend feature")
    }

    fn compiled_names() -> Vec<&'static str> {
        TransportKind::compiled().map(TransportKind::name).collect()
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TransportKind {
    type Err = IpcError;

    /// Parses a transport name. Knowing the name does not mean this build has
    /// it: [`IpcConfig::validate`] checks that.
    fn from_str(s: &str) -> Result<Self, IpcError> {
        TransportKind::ALL
            .into_iter()
            .find(|kind| kind.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| IpcError::UnknownTransport {
                given: s.to_owned(),
                known: TransportKind::ALL.map(TransportKind::name).to_vec(),
            })
    }
}

impl TryFrom<String> for TransportKind {
    type Error = IpcError;

    fn try_from(s: String) -> Result<Self, IpcError> {
        s.parse()
    }
}

impl TryFrom<String> for Crc32Variant {
    type Error = IpcError;

    fn try_from(s: String) -> Result<Self, IpcError> {
        s.parse()
    }
}

/// The IPC settings, exactly as the decision record defines them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpcConfig {
    /// Backend that carries the bytes.
    pub transport: TransportKind,
    /// Unix socket path, or Windows pipe name (with or without `\\.\pipe\`).
    pub endpoint_path: String,
    /// Largest message body accepted or sent, in bytes. Default 1 MiB.
    pub max_frame_bytes: usize,
    /// Server: how long an excess connection waits for a free slot.
    /// Client: how long to keep trying to connect. Default 5000.
    pub accept_timeout_ms: u64,
    /// Deadline for a whole frame once its first byte has arrived, and the
    /// idle limit between frames. Default 30000.
    pub read_timeout_ms: u64,
    /// Deadline for writing one frame. Default 10000.
    pub write_timeout_ms: u64,
    /// Server: how long a handler may take over one task before the task is
    /// answered with an error and its work stopped. Default 25000, at most
    /// five sixths of `read_timeout_ms`, so that the answer reaches the
    /// agent before the agent stops waiting for it (see
    /// [`task_timeout_answerable`](Self::task_timeout_answerable));
    /// [`ConfigLoader`] lowers the default to five sixths of a lower
    /// `read_timeout_ms`.
    pub task_timeout_ms: u64,
    /// Connections served at once. Default 16.
    pub max_connections: usize,
    /// Server: connections one peer (one uid) may hold at once, served or
    /// waiting for a slot; 0 (the default) sets no cap beyond
    /// `max_connections`. With several agents or a `socket_group`, a cap
    /// keeps one peer from holding every slot.
    pub max_connections_per_peer: usize,
    /// Frame checksum polynomial. Default IEEE.
    pub crc32_variant: Crc32Variant,
    /// Unix: the group (name or gid) whose members may connect: the socket
    /// is made 0660 and its directory 0750, both owned by this group.
    /// `None` (the default; an empty string means the same): socket 0600
    /// in a 0700 directory, only the server's user and root.
    pub socket_group: Option<String>,
}

impl Default for IpcConfig {
    /// The decision record's defaults; the endpoint depends on the platform,
    /// the effective user and `XDG_RUNTIME_DIR` (see [`default_endpoint_path`]).
    fn default() -> Self {
        let runtime_dir = std::env::var_os("XDG_RUNTIME_DIR");
        IpcConfig::defaults_with_runtime_dir(runtime_dir.as_deref().map(Path::new))
    }
}

impl IpcConfig {
    fn defaults_with_runtime_dir(runtime_dir: Option<&Path>) -> IpcConfig {
        IpcConfig {
            transport: TransportKind::default_for_build(),
            endpoint_path: default_endpoint_path(runtime_dir),
            max_frame_bytes: FrameSettings::DEFAULT.max_frame_bytes as usize,
            accept_timeout_ms: 5_000,
            read_timeout_ms: 30_000,
            write_timeout_ms: 10_000,
            task_timeout_ms: 25_000,
            max_connections: 16,
            max_connections_per_peer: 0,
            crc32_variant: Crc32Variant::Ieee,
            socket_group: None,
        }
    }

    /// Checks every value against its range and the transport against this
    /// build. [`ConfigLoader::load`] calls this for you.
    pub fn validate(&self) -> Result<(), IpcError> {
        self.validate_with_origins(|_| None)
    }

    fn validate_with_origins(
        &self,
        origin_of: impl Fn(ConfigField) -> Option<ConfigOrigin>,
    ) -> Result<(), IpcError> {
        let invalid =
            |field: ConfigField, value: String, requirement: String| IpcError::InvalidConfig {
                field: field.key(),
                value,
                origin: origin_of(field),
                requirement,
            };

        if !self.transport.is_compiled() {
            return Err(IpcError::TransportNotCompiled {
                requested: self.transport.name(),
                origin: origin_of(ConfigField::Transport),
                available: TransportKind::compiled_names(),
            });
        }
        if self.endpoint_path.trim().is_empty() || self.endpoint_path.contains('\0') {
            return Err(invalid(
                ConfigField::EndpointPath,
                format!("{:?}", self.endpoint_path),
                "must be a non-empty socket path or pipe name without NUL bytes".into(),
            ));
        }
        // Its form (abstract names, length, the pipe prefix) is configuration
        // too: refused here, by every command, before anything binds.
        Endpoint::parse(&self.endpoint_path)?;
        if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&self.max_frame_bytes) {
            return Err(invalid(
                ConfigField::MaxFrameBytes,
                self.max_frame_bytes.to_string(),
                format!(
                    "must be between {MIN_FRAME_BYTES} and {MAX_FRAME_BYTES} (64 MiB: every frame \
                     is held whole in memory on both sides)"
                ),
            ));
        }
        if let Some(group) = &self.socket_group {
            crate::endpoint::SocketGroup::resolve(group).map_err(|reason| {
                invalid(ConfigField::SocketGroup, format!("{group:?}"), reason)
            })?;
        }
        if !(1..=MAX_CONNECTIONS_LIMIT).contains(&self.max_connections) {
            return Err(invalid(
                ConfigField::MaxConnections,
                self.max_connections.to_string(),
                format!("must be between 1 and {MAX_CONNECTIONS_LIMIT}"),
            ));
        }
        if self.max_connections_per_peer > self.max_connections {
            return Err(invalid(
                ConfigField::MaxConnectionsPerPeer,
                self.max_connections_per_peer.to_string(),
                format!(
                    "must be between 0 (no cap) and max_connections = {}",
                    self.max_connections
                ),
            ));
        }
        for (field, value) in [
            (ConfigField::AcceptTimeoutMs, self.accept_timeout_ms),
            (ConfigField::ReadTimeoutMs, self.read_timeout_ms),
            (ConfigField::WriteTimeoutMs, self.write_timeout_ms),
            (ConfigField::TaskTimeoutMs, self.task_timeout_ms),
        ] {
            if !(1..=MAX_TIMEOUT_MS).contains(&value) {
                return Err(invalid(
                    field,
                    value.to_string(),
                    format!("must be between 1 and {MAX_TIMEOUT_MS} milliseconds (one day)"),
                ));
            }
        }
        Ok(())
    }

    /// What a server checks beyond [`validate`](Self::validate): with the
    /// `legacy` transport, `max_connections` at most
    /// [`LEGACY_MAX_CONNECTIONS`] (it runs a thread per connection).
    pub fn validate_server(&self) -> Result<(), IpcError> {
        self.validate_server_with_origins(|_| None)
    }

    fn validate_server_with_origins(
        &self,
        origin_of: impl Fn(ConfigField) -> Option<ConfigOrigin>,
    ) -> Result<(), IpcError> {
        self.validate_with_origins(&origin_of)?;
        if self.transport == TransportKind::Legacy && self.max_connections > LEGACY_MAX_CONNECTIONS
        {
            return Err(IpcError::InvalidConfig {
                field: ConfigField::MaxConnections.key(),
                value: self.max_connections.to_string(),
                origin: origin_of(ConfigField::MaxConnections),
                requirement: format!(
                    "must be at most {LEGACY_MAX_CONNECTIONS} with transport = \"legacy\", which \
                     runs a thread per connection; use interprocess or tokio for more"
                ),
            });
        }
        Ok(())
    }

    /// Whether the answer to a task that runs out of time reaches an agent
    /// with the same `read_timeout_ms` before it gives up: `task_timeout_ms`
    /// at most five sixths of `read_timeout_ms`. The agent's clock starts at
    /// its send, before the collector's; the sixth left is for the answer to
    /// travel. Without it the agent gives up first, retires the connection
    /// and never learns why. (A collector whose agents wait longer than it
    /// does may ignore this; `serve` warns.)
    pub fn task_timeout_answerable(&self) -> bool {
        self.task_timeout_ms <= answerable_within(self.read_timeout_ms)
    }

    /// The frame settings both ends must share. Saturates an out-of-range
    /// `max_frame_bytes`; [`validate`](Self::validate) refuses those first.
    pub fn frame_settings(&self) -> FrameSettings {
        FrameSettings {
            crc32: self.crc32_variant,
            max_frame_bytes: u32::try_from(self.max_frame_bytes).unwrap_or(u32::MAX),
        }
    }

    /// `accept_timeout_ms` as a duration.
    pub fn accept_timeout(&self) -> Duration {
        Duration::from_millis(self.accept_timeout_ms)
    }

    /// `read_timeout_ms` as a duration.
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }

    /// `write_timeout_ms` as a duration.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    /// `task_timeout_ms` as a duration.
    pub fn task_timeout(&self) -> Duration {
        Duration::from_millis(self.task_timeout_ms)
    }

    /// The current value of `field`, formatted as in a TOML file.
    pub fn value_as_toml(&self, field: ConfigField) -> String {
        match field {
            ConfigField::Transport => format!("{:?}", self.transport.name()),
            ConfigField::EndpointPath => toml::Value::from(self.endpoint_path.as_str()).to_string(),
            ConfigField::MaxFrameBytes => self.max_frame_bytes.to_string(),
            ConfigField::AcceptTimeoutMs => self.accept_timeout_ms.to_string(),
            ConfigField::ReadTimeoutMs => self.read_timeout_ms.to_string(),
            ConfigField::WriteTimeoutMs => self.write_timeout_ms.to_string(),
            ConfigField::TaskTimeoutMs => self.task_timeout_ms.to_string(),
            ConfigField::MaxConnections => self.max_connections.to_string(),
            ConfigField::MaxConnectionsPerPeer => self.max_connections_per_peer.to_string(),
            ConfigField::Crc32Variant => format!("{:?}", self.crc32_variant.name()),
            ConfigField::SocketGroup => {
                toml::Value::from(self.socket_group.as_deref().unwrap_or_default()).to_string()
            }
        }
    }
}

/// The longest task deadline whose answer still reaches an agent that
/// waits `read_timeout_ms`: five sixths of it, the last sixth left for the
/// answer to travel.
pub(crate) fn answerable_within(read_timeout_ms: u64) -> u64 {
    read_timeout_ms.saturating_mul(5) / 6
}

/// The default endpoint for this platform and user.
///
/// * Unix, effective uid 0: `/run/daemoneye/procmond.sock`.
/// * Unix, other users: `$XDG_RUNTIME_DIR/daemoneye/procmond.sock`; without an
///   absolute `XDG_RUNTIME_DIR`, `<temp dir>/daemoneye-<uid>/procmond.sock`
///   (the server creates that directory 0700 and refuses it if another user
///   owns it).
/// * Windows: `\\.\pipe\daemoneye\procmond`.
pub fn default_endpoint_path(xdg_runtime_dir: Option<&Path>) -> String {
    #[cfg(unix)]
    {
        let uid = rustix::process::geteuid();
        if uid.is_root() {
            return "/run/daemoneye/procmond.sock".to_owned();
        }
        let base = match xdg_runtime_dir {
            Some(dir) if dir.is_absolute() => dir.join("daemoneye"),
            _ => std::env::temp_dir().join(format!("daemoneye-{}", uid.as_raw())),
        };
        base.join("procmond.sock").to_string_lossy().into_owned()
    }
    #[cfg(windows)]
    {
        let _ = xdg_runtime_dir;
        r"\\.\pipe\daemoneye\procmond".to_owned()
    }
}

/// One of the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConfigField {
    /// `transport`
    Transport,
    /// `endpoint_path`
    EndpointPath,
    /// `max_frame_bytes`
    MaxFrameBytes,
    /// `accept_timeout_ms`
    AcceptTimeoutMs,
    /// `read_timeout_ms`
    ReadTimeoutMs,
    /// `write_timeout_ms`
    WriteTimeoutMs,
    /// `task_timeout_ms`
    TaskTimeoutMs,
    /// `max_connections`
    MaxConnections,
    /// `max_connections_per_peer`
    MaxConnectionsPerPeer,
    /// `crc32_variant`
    Crc32Variant,
    /// `socket_group`
    SocketGroup,
}

impl ConfigField {
    /// Every setting, in the decision record's order.
    pub const ALL: [ConfigField; 11] = [
        ConfigField::Transport,
        ConfigField::EndpointPath,
        ConfigField::MaxFrameBytes,
        ConfigField::AcceptTimeoutMs,
        ConfigField::ReadTimeoutMs,
        ConfigField::WriteTimeoutMs,
        ConfigField::TaskTimeoutMs,
        ConfigField::MaxConnections,
        ConfigField::MaxConnectionsPerPeer,
        ConfigField::Crc32Variant,
        ConfigField::SocketGroup,
    ];

    /// The key under `[ipc]`.
    pub const fn key(self) -> &'static str {
        match self {
            ConfigField::Transport => "transport",
            ConfigField::EndpointPath => "endpoint_path",
            ConfigField::MaxFrameBytes => "max_frame_bytes",
            ConfigField::AcceptTimeoutMs => "accept_timeout_ms",
            ConfigField::ReadTimeoutMs => "read_timeout_ms",
            ConfigField::WriteTimeoutMs => "write_timeout_ms",
            ConfigField::TaskTimeoutMs => "task_timeout_ms",
            ConfigField::MaxConnections => "max_connections",
            ConfigField::MaxConnectionsPerPeer => "max_connections_per_peer",
            ConfigField::Crc32Variant => "crc32_variant",
            ConfigField::SocketGroup => "socket_group",
        }
    }

    /// The environment variable that overrides it, e.g. `DAEMONEYE_IPC_TRANSPORT`.
    pub fn env_var(self) -> String {
        format!("{ENV_PREFIX}{}", self.key().to_ascii_uppercase())
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigOrigin {
    /// The built-in default.
    Default,
    /// The `[ipc]` table of this file.
    File(PathBuf),
    /// This environment variable.
    Env(String),
    /// A command-line flag.
    Flag,
}

impl fmt::Display for ConfigOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigOrigin::Default => f.write_str("default"),
            ConfigOrigin::File(path) => write!(f, "file {}", path.display()),
            ConfigOrigin::Env(var) => write!(f, "env {var}"),
            ConfigOrigin::Flag => f.write_str("command-line flag"),
        }
    }
}

/// A size in bytes as people write it: a whole number, optionally with a
/// unit, `K` (1024), `M` (1024 K) or `G` (1024 M), also as `KB`/`KiB` and
/// so on, in any case. The error says what was expected.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    const EXPECTED: &str = "a whole number of bytes, optionally with a unit \
                            (1K = 1024, 1M = 1024K, 1G = 1024M; e.g. 65536, 64K, 1M)";
    let trimmed = text.trim();
    let trimmed = trimmed.strip_prefix('+').unwrap_or(trimmed);
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(EXPECTED.to_owned()),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|number| number.checked_mul(scale))
        .ok_or_else(|| EXPECTED.to_owned())
}

/// Numbers in a config file, read with errors that say what was expected
/// rather than the Rust type ("a whole number of connections", not
/// "usize").
mod whole {
    use serde::de::{self, Deserializer, Visitor};

    struct Whole {
        expected: &'static str,
        sizes: bool,
    }

    impl Visitor<'_> for Whole {
        type Value = u64;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.expected)
        }

        fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
            Ok(value)
        }

        fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
            u64::try_from(value)
                .map_err(|_| E::custom(format!("expected {}, not {value}", self.expected)))
        }

        fn visit_f64<E: de::Error>(self, value: f64) -> Result<u64, E> {
            Err(E::custom(format!(
                "expected {}, not {value}",
                self.expected
            )))
        }

        fn visit_str<E: de::Error>(self, value: &str) -> Result<u64, E> {
            if self.sizes {
                return super::parse_byte_size(value)
                    .map_err(|expected| E::custom(format!("expected {expected}, not {value:?}")));
            }
            Err(E::custom(format!(
                "expected {}, not {value:?}",
                self.expected
            )))
        }

        fn visit_bool<E: de::Error>(self, value: bool) -> Result<u64, E> {
            Err(E::custom(format!(
                "expected {}, not {value}",
                self.expected
            )))
        }
    }

    /// An optional setting: absent or null leaves it unset (formats other
    /// than TOML have a null), anything else must be a whole number.
    struct Setting(Whole);

    impl<'de> Visitor<'de> for Setting {
        type Value = Option<u64>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            self.0.expecting(f)
        }

        fn visit_none<E: de::Error>(self) -> Result<Option<u64>, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Option<u64>, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<u64>, D::Error> {
            d.deserialize_any(self.0).map(Some)
        }
    }

    fn read<'de, D: Deserializer<'de>>(
        deserializer: D,
        expected: &'static str,
        sizes: bool,
    ) -> Result<Option<u64>, D::Error> {
        deserializer.deserialize_option(Setting(Whole { expected, sizes }))
    }

    fn as_usize(value: u64) -> usize {
        usize::try_from(value).unwrap_or(usize::MAX)
    }

    pub(super) fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        let bytes = read(
            d,
            "a whole number of bytes (or a size such as \"64K\")",
            true,
        )?;
        Ok(bytes.map(as_usize))
    }

    pub(super) fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        read(d, "a whole number of milliseconds", false)
    }

    pub(super) fn connections<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        Ok(read(d, "a whole number of connections", false)?.map(as_usize))
    }
}

/// A partial set of settings: one layer (file table, environment, flags).
/// `None` leaves the value of the layer below.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigOverrides {
    /// See [`IpcConfig::transport`].
    pub transport: Option<TransportKind>,
    /// See [`IpcConfig::endpoint_path`].
    pub endpoint_path: Option<String>,
    /// See [`IpcConfig::max_frame_bytes`]. In a file: a number, or a
    /// string with a unit (`"64K"`, `"1M"`).
    #[serde(default, deserialize_with = "whole::bytes")]
    pub max_frame_bytes: Option<usize>,
    /// See [`IpcConfig::accept_timeout_ms`].
    #[serde(default, deserialize_with = "whole::millis")]
    pub accept_timeout_ms: Option<u64>,
    /// See [`IpcConfig::read_timeout_ms`].
    #[serde(default, deserialize_with = "whole::millis")]
    pub read_timeout_ms: Option<u64>,
    /// See [`IpcConfig::write_timeout_ms`].
    #[serde(default, deserialize_with = "whole::millis")]
    pub write_timeout_ms: Option<u64>,
    /// See [`IpcConfig::task_timeout_ms`].
    #[serde(default, deserialize_with = "whole::millis")]
    pub task_timeout_ms: Option<u64>,
    /// See [`IpcConfig::max_connections`].
    #[serde(default, deserialize_with = "whole::connections")]
    pub max_connections: Option<usize>,
    /// See [`IpcConfig::max_connections_per_peer`].
    #[serde(default, deserialize_with = "whole::connections")]
    pub max_connections_per_peer: Option<usize>,
    /// See [`IpcConfig::crc32_variant`].
    pub crc32_variant: Option<Crc32Variant>,
    /// See [`IpcConfig::socket_group`].
    pub socket_group: Option<String>,
}

impl ConfigOverrides {
    /// Reads one `DAEMONEYE_IPC_<FIELD>` variable into this layer.
    fn set_from_env(&mut self, var: &str, value: &str) -> Result<(), IpcError> {
        let field = ConfigField::ALL
            .into_iter()
            .find(|field| field.env_var() == var)
            .ok_or_else(|| IpcError::UnknownEnvVar {
                var: var.to_owned(),
                known: ConfigField::ALL.map(ConfigField::env_var).to_vec(),
            })?;
        fn parse<T: FromStr>(var: &str, value: &str, expected: &str) -> Result<T, IpcError> {
            value.trim().parse().map_err(|_| IpcError::InvalidEnvValue {
                var: var.to_owned(),
                value: value.to_owned(),
                expected: expected.to_owned(),
            })
        }
        const MILLIS: &str = "a whole number of milliseconds";
        match field {
            ConfigField::Transport => {
                let names = TransportKind::ALL.map(TransportKind::name).join(" or ");
                self.transport = Some(parse(var, value, &names)?);
            }
            ConfigField::EndpointPath => self.endpoint_path = Some(value.to_owned()),
            ConfigField::MaxFrameBytes => {
                let bytes =
                    parse_byte_size(value).map_err(|expected| IpcError::InvalidEnvValue {
                        var: var.to_owned(),
                        value: value.to_owned(),
                        expected,
                    })?;
                self.max_frame_bytes = Some(usize::try_from(bytes).unwrap_or(usize::MAX));
            }
            ConfigField::AcceptTimeoutMs => {
                self.accept_timeout_ms = Some(parse(var, value, MILLIS)?)
            }
            ConfigField::ReadTimeoutMs => self.read_timeout_ms = Some(parse(var, value, MILLIS)?),
            ConfigField::WriteTimeoutMs => self.write_timeout_ms = Some(parse(var, value, MILLIS)?),
            ConfigField::TaskTimeoutMs => self.task_timeout_ms = Some(parse(var, value, MILLIS)?),
            ConfigField::MaxConnections => {
                self.max_connections = Some(parse(var, value, "a whole number of connections")?);
            }
            ConfigField::MaxConnectionsPerPeer => {
                self.max_connections_per_peer = Some(parse(
                    var,
                    value,
                    "a whole number of connections (0: no cap)",
                )?);
            }
            ConfigField::Crc32Variant => {
                self.crc32_variant = Some(parse(var, value, "ieee or castagnoli")?);
            }
            ConfigField::SocketGroup => self.socket_group = Some(value.to_owned()),
        }
        Ok(())
    }
}

/// The top level of a config file: our `[ipc]` table, beside tables that
/// belong to other components.
#[derive(Deserialize)]
struct ConfigFile {
    ipc: Option<ConfigOverrides>,
    #[serde(flatten)]
    other: toml::Table,
}

/// Settings after layering, with the origin of each value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedConfig {
    /// The effective, validated settings.
    pub config: IpcConfig,
    origins: [ConfigOrigin; ConfigField::ALL.len()],
}

impl LoadedConfig {
    /// [`IpcConfig::validate_server`], naming where a refused value came
    /// from.
    pub fn validate_server(&self) -> Result<(), IpcError> {
        self.config
            .validate_server_with_origins(|field| Some(self.origin(field).clone()))
    }

    /// Where the value of `field` came from.
    pub fn origin(&self, field: ConfigField) -> &ConfigOrigin {
        &self.origins[field.index()]
    }

    /// The effective config as a TOML document, each value commented with its
    /// origin. What `daemoneye-ipc config` prints.
    pub fn to_annotated_toml(&self) -> String {
        let rows: Vec<(String, String)> = ConfigField::ALL
            .into_iter()
            .map(|field| {
                let assignment = format!("{} = {}", field.key(), self.config.value_as_toml(field));
                (assignment, self.origin(field).to_string())
            })
            .collect();
        let width = rows
            .iter()
            .map(|(assignment, _)| assignment.len())
            .max()
            .unwrap_or(0);
        let mut out = String::from("[ipc]\n");
        for (assignment, origin) in rows {
            out.push_str(&format!("{assignment:<width$}  # {origin}\n"));
        }
        out
    }
}

/// Builds an [`IpcConfig`] from defaults, a file, the environment and flags.
///
/// ```
/// use daemoneye_ipc::config::{ConfigField, ConfigLoader, ConfigOrigin, ConfigOverrides};
///
/// let loaded = ConfigLoader::new()
///     .env([("DAEMONEYE_IPC_MAX_CONNECTIONS", "4")])
///     .flags(ConfigOverrides { read_timeout_ms: Some(2_000), ..Default::default() })
///     .load()?;
/// assert_eq!(loaded.config.max_connections, 4);
/// assert_eq!(loaded.config.read_timeout_ms, 2_000);
/// assert_eq!(loaded.origin(ConfigField::WriteTimeoutMs), &ConfigOrigin::Default);
/// # Ok::<(), daemoneye_ipc::IpcError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct ConfigLoader {
    file: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
    flags: ConfigOverrides,
}

impl ConfigLoader {
    /// A loader with no file, no environment and no flags: defaults only.
    pub fn new() -> ConfigLoader {
        ConfigLoader::default()
    }

    /// Reads the `[ipc]` table of this TOML file.
    pub fn file(mut self, path: impl Into<PathBuf>) -> ConfigLoader {
        self.file = Some(path.into());
        self
    }

    /// Uses these variables as the environment (`DAEMONEYE_IPC_*` overrides,
    /// and `XDG_RUNTIME_DIR` for the default endpoint). Other variables are
    /// ignored.
    pub fn env<I, K, V>(mut self, vars: I) -> ConfigLoader
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        self.env = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        self
    }

    /// Uses this process's environment.
    pub fn env_from_process(self) -> ConfigLoader {
        self.env(std::env::vars_os())
    }

    /// The top layer, usually from command-line flags.
    pub fn flags(mut self, flags: ConfigOverrides) -> ConfigLoader {
        self.flags = flags;
        self
    }

    /// Layers defaults, file, environment and flags, then validates.
    pub fn load(self) -> Result<LoadedConfig, IpcError> {
        let file = match &self.file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| {
                    IpcError::ConfigFileUnreadable {
                        path: path.to_owned(),
                        source,
                    }
                })?;
                Some((path.clone(), text))
            }
            None => None,
        };
        self.load_with_file_text(file)
    }

    /// [`load`](Self::load), with the file's text already read.
    pub(crate) fn load_with_file_text(
        self,
        file: Option<(PathBuf, String)>,
    ) -> Result<LoadedConfig, IpcError> {
        let runtime_dir = self
            .env
            .iter()
            .find(|(key, _)| key == "XDG_RUNTIME_DIR")
            .map(|(_, value)| PathBuf::from(value));
        let mut loaded = LoadedConfig {
            config: IpcConfig::defaults_with_runtime_dir(runtime_dir.as_deref()),
            origins: std::array::from_fn(|_| ConfigOrigin::Default),
        };

        if let Some((path, text)) = file {
            let table = parse_config_file(&path, &text)?;
            loaded.apply(table, |_| ConfigOrigin::File(path.clone()));
        }

        let mut env_layer = ConfigOverrides::default();
        for (key, value) in &self.env {
            let Some(key) = key.to_str().filter(|key| key.starts_with(ENV_PREFIX)) else {
                continue;
            };
            let value = value.to_str().ok_or_else(|| IpcError::InvalidEnvValue {
                var: key.to_owned(),
                value: value.to_string_lossy().into_owned(),
                expected: "valid UTF-8".to_owned(),
            })?;
            env_layer.set_from_env(key, value)?;
        }
        loaded.apply(env_layer, |field| ConfigOrigin::Env(field.env_var()));

        loaded.apply(self.flags, |_| ConfigOrigin::Flag);

        // The default task deadline keeps within a read timeout set lower.
        if loaded.origin(ConfigField::TaskTimeoutMs) == &ConfigOrigin::Default {
            let config = &mut loaded.config;
            config.task_timeout_ms = config
                .task_timeout_ms
                .min(answerable_within(config.read_timeout_ms))
                .max(1);
        }

        loaded
            .config
            .validate_with_origins(|field| Some(loaded.origin(field).clone()))?;
        Ok(loaded)
    }
}

impl LoadedConfig {
    /// Applies one layer, recording `origin(field)` for every value it sets.
    fn apply(&mut self, layer: ConfigOverrides, origin: impl Fn(ConfigField) -> ConfigOrigin) {
        macro_rules! take_set_values {
            ($($key:ident => $field:ident),* $(,)?) => {$(
                if let Some(value) = layer.$key {
                    self.config.$key = value;
                    self.origins[ConfigField::$field.index()] = origin(ConfigField::$field);
                }
            )*};
        }
        take_set_values!(
            transport => Transport,
            endpoint_path => EndpointPath,
            max_frame_bytes => MaxFrameBytes,
            accept_timeout_ms => AcceptTimeoutMs,
            read_timeout_ms => ReadTimeoutMs,
            write_timeout_ms => WriteTimeoutMs,
            task_timeout_ms => TaskTimeoutMs,
            max_connections => MaxConnections,
            max_connections_per_peer => MaxConnectionsPerPeer,
            crc32_variant => Crc32Variant,
        );
        if let Some(group) = layer.socket_group {
            // An empty value clears a group set by a lower layer.
            self.config.socket_group = (!group.trim().is_empty()).then_some(group);
            self.origins[ConfigField::SocketGroup.index()] = origin(ConfigField::SocketGroup);
        }
    }
}

/// Parses the file and returns its `[ipc]` table (empty if there is none).
fn parse_config_file(path: &Path, text: &str) -> Result<ConfigOverrides, IpcError> {
    let invalid = |message: String| IpcError::ConfigFileInvalid {
        path: path.to_owned(),
        message,
    };
    let file: ConfigFile = toml::from_str(text).map_err(|err| {
        // One line, for logs, quoting the offending line so the key is named:
        // "line 2, column 19 (`max_connections = "lots"`): expected a whole
        // number of connections, not "lots"".
        let message = err.message().trim_end().replace('\n', " ");
        match err.span() {
            Some(span) => {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                let source = text.lines().nth(line - 1).unwrap_or_default().trim();
                invalid(format!(
                    "line {line}, column {column} (`{source}`): {message}"
                ))
            }
            None => invalid(message),
        }
    })?;
    // Other components' tables may share the file, but a bare key at the top
    // level is a setting that was meant for [ipc] and would otherwise be
    // silently ignored.
    if let Some((key, _)) = file.other.iter().find(|(_, value)| !value.is_table()) {
        return Err(invalid(format!(
            "top-level key `{key}` is outside any table; IPC settings go under [ipc]"
        )));
    }
    Ok(file.ipc.unwrap_or_default())
}
