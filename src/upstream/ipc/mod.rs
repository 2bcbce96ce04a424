//! `daemoneye_lib::ipc`: the configuration, and the codec and transport
//! modules.
//!
//! `ipc::client` (DaemonEye's `ResilientIpcClient`) is not part of this
//! facade: a trial build keeps DaemonEye's own, which runs over
//! [`codec::IpcCodec`] here (see the README, "Trial build in DaemonEye").

pub mod codec;
pub mod interprocess_transport;

pub use codec::{IpcCodec, IpcError, IpcResult};
pub use interprocess_transport::{InterprocessClient, InterprocessServer};

use crate::{Crc32Variant, TransportKind};

/// DaemonEye's IPC settings: exactly its eight public fields, with its
/// defaults, so that a struct literal written for DaemonEye builds here.
///
/// The checksum is not a setting: DaemonEye always uses CRC-32C.
#[derive(Debug, Clone)]
pub struct IpcConfig {
    /// Which backend carries the bytes. DaemonEye has only
    /// [`TransportType::Interprocess`]; this crate adds the Tokio-native and
    /// legacy backends, for rollback. `DAEMONEYE_IPC_TRANSPORT`
    /// (`interprocess`, `tokio`, `legacy`), when set, takes precedence:
    /// see [`TRANSPORT_VARIABLE`].
    pub transport: TransportType,
    /// Unix socket path, or Windows pipe name (with or without
    /// `\\.\pipe\`).
    pub endpoint_path: String,
    /// Largest message body accepted or sent, in bytes (1 MiB).
    pub max_frame_bytes: usize,
    /// How long a client keeps trying to reach a server (5000 ms). A server
    /// does not make connections over `max_connections` wait: they are
    /// refused at once, as DaemonEye's are.
    pub accept_timeout_ms: u64,
    /// Deadline for reading a frame, the idle limit of a connection, and
    /// (five sixths of it) how long a handler may take (30000 ms).
    pub read_timeout_ms: u64,
    /// Deadline for writing a frame (10000 ms).
    pub write_timeout_ms: u64,
    /// Connections a server serves at once (16).
    pub max_connections: usize,
    /// What a panic should do ([`PanicStrategy::Unwind`]). Informational, as
    /// in DaemonEye: no panic hook is installed. A handler that panics is
    /// answered with an error and its connection carries on.
    pub panic_strategy: PanicStrategy,
}

impl Default for IpcConfig {
    fn default() -> Self {
        IpcConfig {
            transport: TransportType::Interprocess,
            endpoint_path: default_endpoint_path().to_owned(),
            max_frame_bytes: 1024 * 1024,
            accept_timeout_ms: 5000,
            read_timeout_ms: 30_000,
            write_timeout_ms: 10_000,
            max_connections: 16,
            panic_strategy: PanicStrategy::Unwind,
        }
    }
}

impl IpcConfig {
    /// The defaults, with [`PanicStrategy::Abort`].
    pub fn production() -> Self {
        IpcConfig::default().with_panic_strategy(PanicStrategy::Abort)
    }

    /// The same settings with `strategy`.
    #[must_use]
    pub const fn with_panic_strategy(mut self, strategy: PanicStrategy) -> Self {
        self.panic_strategy = strategy;
        self
    }

    /// This crate's configuration for a client (`for_server` false) or a
    /// server, checked: CRC-32C; the handler's deadline five sixths of
    /// `read_timeout_ms`, so that its error answer reaches a client that
    /// waits `read_timeout_ms`; and, for a server, no waiting room.
    pub(crate) fn native(&self, for_server: bool) -> IpcResult<crate::IpcConfig> {
        let transport = self.transport_to_use(std::env::var(TRANSPORT_VARIABLE).ok().as_deref())?;
        let config = crate::IpcConfig {
            transport,
            endpoint_path: self.endpoint_path.clone(),
            max_frame_bytes: self.max_frame_bytes,
            // DaemonEye refuses a connection over the limit at once; a
            // client waiting on it would be served later than its caller
            // expects, and DaemonEye's own tests rely on the refusal.
            accept_timeout_ms: if for_server {
                1
            } else {
                self.accept_timeout_ms
            },
            read_timeout_ms: self.read_timeout_ms,
            write_timeout_ms: self.write_timeout_ms,
            task_timeout_ms: crate::config::answerable_within(self.read_timeout_ms).max(1),
            max_connections: self.max_connections,
            max_connections_per_peer: 0,
            crc32_variant: Crc32Variant::Castagnoli,
            socket_group: None,
        };
        let checked = if for_server {
            config.validate_server()
        } else {
            config.validate()
        };
        checked.map_err(IpcError::from)?;
        Ok(config)
    }
}

/// The environment variable that picks the backend, as it does for this
/// crate's own configuration: the rollback switch of a trial build, whose
/// collector and agent name their transport in code.
pub const TRANSPORT_VARIABLE: &str = "DAEMONEYE_IPC_TRANSPORT";

impl IpcConfig {
    /// The backend to use: `from_environment` (the value of
    /// [`TRANSPORT_VARIABLE`]) if set and not empty, else `transport`.
    fn transport_to_use(&self, from_environment: Option<&str>) -> IpcResult<TransportKind> {
        match from_environment
            .map(str::trim)
            .filter(|value| !value.is_empty())
        {
            Some(value) => {
                let kind = value.parse::<TransportKind>().map_err(|error| {
                    IpcError::Io(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{TRANSPORT_VARIABLE}={value:?}: {error}"),
                    ))
                })?;
                tracing::info!(
                    transport = kind.name(),
                    "transport chosen by {TRANSPORT_VARIABLE}"
                );
                Ok(kind)
            }
            None => Ok(match self.transport {
                TransportType::Interprocess => TransportKind::Interprocess,
                TransportType::Tokio => TransportKind::Tokio,
                TransportType::Legacy => TransportKind::Legacy,
            }),
        }
    }
}

/// DaemonEye's default endpoint.
fn default_endpoint_path() -> &'static str {
    if cfg!(windows) {
        r"\\.\pipe\daemoneye\procmond"
    } else {
        "/var/run/daemoneye/procmond.sock"
    }
}

/// Which backend carries the bytes, chosen at run time. A backend must also
/// be compiled in (Cargo features `ipc-interprocess`, `ipc-tokio`,
/// `ipc-legacy`); one that is not fails at `start` or at the first
/// `send_task`, naming the feature.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportType {
    /// `interprocess::local_socket`: Unix sockets and Windows named pipes on
    /// one code path (DaemonEye's, and this crate's default).
    Interprocess,
    /// Tokio's own Unix sockets and named pipes (Phase 1).
    Tokio,
    /// The operating system's blocking sockets and pipes on threads of
    /// their own (the rollback backend).
    Legacy,
}

/// What a panic should do, as DaemonEye declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PanicStrategy {
    /// Unwind the panicking thread.
    Unwind,
    /// Abort the process.
    Abort,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_daemoneyes() {
        let config = IpcConfig::default();
        assert_eq!(config.transport, TransportType::Interprocess);
        assert_eq!(config.max_frame_bytes, 1_048_576);
        assert_eq!(
            (
                config.accept_timeout_ms,
                config.read_timeout_ms,
                config.write_timeout_ms
            ),
            (5000, 30_000, 10_000)
        );
        assert_eq!(config.max_connections, 16);
        assert_eq!(config.panic_strategy, PanicStrategy::Unwind);
        #[cfg(unix)]
        assert_eq!(config.endpoint_path, "/var/run/daemoneye/procmond.sock");
        #[cfg(windows)]
        assert_eq!(config.endpoint_path, r"\\.\pipe\daemoneye\procmond");
        assert_eq!(IpcConfig::production().panic_strategy, PanicStrategy::Abort);
    }

    #[test]
    fn the_native_settings_use_crc32c_and_answer_before_the_client_gives_up() {
        let config = IpcConfig {
            endpoint_path: "/tmp/daemoneye-facade-test.sock".into(),
            read_timeout_ms: 6000,
            ..IpcConfig::default()
        };
        let server = config.native(true).unwrap();
        assert_eq!(server.crc32_variant, Crc32Variant::Castagnoli);
        assert_eq!(server.task_timeout_ms, 5000);
        assert_eq!(server.accept_timeout_ms, 1, "no waiting room");
        let client = config.native(false).unwrap();
        assert_eq!(client.accept_timeout_ms, 5000, "the client's patience");
    }

    #[test]
    fn the_environment_picks_the_backend_over_the_code() {
        let config = IpcConfig::default();
        assert_eq!(
            config.transport_to_use(None).unwrap(),
            TransportKind::Interprocess
        );
        assert_eq!(
            config.transport_to_use(Some("")).unwrap(),
            TransportKind::Interprocess,
            "empty is unset"
        );
        assert_eq!(
            config.transport_to_use(Some("legacy")).unwrap(),
            TransportKind::Legacy
        );
        let tokio = IpcConfig {
            transport: TransportType::Tokio,
            ..IpcConfig::default()
        };
        assert_eq!(
            tokio.transport_to_use(Some(" interprocess ")).unwrap(),
            TransportKind::Interprocess
        );
        let error = config.transport_to_use(Some("shm")).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("DAEMONEYE_IPC_TRANSPORT=\"shm\"")
                && error.to_string().contains("unknown transport"),
            "{error}"
        );
    }

    #[test]
    fn settings_this_crate_refuses_are_an_invalid_input_error_naming_them() {
        let config = IpcConfig {
            endpoint_path: "/tmp/daemoneye-facade-test.sock".into(),
            max_connections: 0,
            ..IpcConfig::default()
        };
        let error = config.native(true).unwrap_err();
        let IpcError::Io(io) = &error else {
            panic!("{error:?}")
        };
        assert_eq!(io.kind(), std::io::ErrorKind::InvalidInput);
        assert!(error.to_string().contains("max_connections"), "{error}");
    }
}
