//! Local IPC between the DaemonEye process collector (`procmond`, the server)
//! and its agent (`daemoneye-agent`, the client): Unix domain sockets and
//! Windows named pipes, never TCP or UDP.
//!
//! # Wire format
//!
//! Every message travels in one frame, the same byte for byte whichever
//! backend carries it, so either end can be rolled back on its own:
//!
//! ```text
//! +----------------+----------------+---------------------------+
//! | u32 LE length N| u32 LE crc32   | N bytes: prost message    |
//! +----------------+----------------+---------------------------+
//! ```
//!
//! The CRC covers the N message bytes only; its polynomial is
//! [`Crc32Variant::Ieee`] by default or [`Crc32Variant::Castagnoli`].
//! `N = 0` is valid (an all-default message). `N > max_frame_bytes` is refused
//! from the header alone. The agent sends a [`DetectionTask`]; the collector
//! answers with a [`DetectionResult`] carrying the same `task_id`.
//!
//! # Quick start
//!
//! Encode a task into a frame and read it back, with the codec every backend
//! uses:
//!
//! ```
//! use bytes::BytesMut;
//! use daemoneye_ipc::frame::codec::{ClientCodec, ServerCodec};
//! use daemoneye_ipc::{DetectionTask, IpcConfig, TaskType};
//! use tokio_util::codec::{Decoder, Encoder};
//!
//! let config = IpcConfig::default();
//! let task = DetectionTask {
//!     task_id: "task-1".into(),
//!     task_type: TaskType::EnumerateProcesses.into(),
//!     ..Default::default()
//! };
//!
//! let mut wire = BytesMut::new();
//! ClientCodec::new(config.frame_settings()).encode(task.clone(), &mut wire)?;
//! assert_eq!(&wire[..4], &(wire.len() as u32 - 8).to_le_bytes()); // the length field
//!
//! let received = ServerCodec::new(config.frame_settings()).decode(&mut wire)?;
//! assert_eq!(received, Some(task));
//! # Ok::<(), daemoneye_ipc::IpcError>(())
//! ```
//!
//! A collector serves tasks and an agent sends them; both ends pick their
//! backend from [`IpcConfig::transport`]:
//!
//! ```no_run
//! use std::time::Duration;
//! use daemoneye_ipc::{DetectionResult, DetectionTask, IpcClient, IpcConfig, IpcServer};
//!
//! # async fn demo() -> Result<(), daemoneye_ipc::IpcError> {
//! let config = IpcConfig {
//!     endpoint_path: "/run/daemoneye/procmond.sock".into(),
//!     ..IpcConfig::default()
//! };
//! let server = IpcServer::bind(config.clone(), |task: DetectionTask| async move {
//!     DetectionResult { task_id: task.task_id, success: true, ..Default::default() }
//! })
//! .await?;
//!
//! let client = IpcClient::new(config)?;
//! let result = client.send(DetectionTask { task_id: "t1".into(), ..Default::default() }).await?;
//! assert!(result.success);
//! server.shutdown(Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```
//!
//! # Where things are
//!
//! * [`server`]: [`IpcServer`], the collector's side: accept loop,
//!   connection limit, peer checks, deadlines, graceful shutdown; handlers
//!   answer with a [`Reply`], owned or shared.
//! * [`client`]: [`IpcClient`], the agent's side: connect with retry,
//!   concurrent sends correlated by `task_id`.
//! * `policy` (private): the rules of a connection as sans-I/O state
//!   machines, which the server's and client's drivers feed; read
//!   `src/policy/mod.rs` first to see what a connection does.
//! * [`endpoint`]: endpoint names, the one secured listening handle per OS,
//!   and the Unix socket-file hardening every backend shares.
//! * [`telemetry`]: the server counters, [`ServerStats`].
//! * [`frame`]: the sans-I/O wire format and its tokio-util codecs.
//! * [`config`]: [`IpcConfig`], its defaults, layering (file, environment,
//!   flags) and validation.
//! * [`proto`]: the generated protobuf messages.
//! * [`view`]: results decoded without copying their text, for
//!   [`IpcClient::send_view`].
//! * [`sample`]: realistic results of a chosen size, for benchmarks and
//!   trials.
//! * `upstream` (feature `upstream-compat`): DaemonEye's `ipc` and `proto`
//!   modules, same paths and names, over this crate.
//! * [`error`]: [`IpcError`], one enum for every failure.
//!
//! # Cargo features
//!
//! * `ipc-interprocess` (default): the `interprocess` local-socket backend,
//!   the default transport.
//! * `ipc-tokio` (default): the Tokio-native backend (Phase 1).
//! * `ipc-legacy` (default): the rollback backend, the OS's blocking sockets
//!   and pipes on threads of its own.
//! * `cli` (default): what only the `daemoneye-ipc` binary needs.
//! * `upstream-compat`: [`upstream`], DaemonEye's own IPC interface over
//!   this crate, for trial builds of the collector and agent.
//!
//! At least one backend feature is required. Which one carries the bytes is
//! chosen at run time by [`IpcConfig::transport`]; see `docs/rollback.md`.

#![warn(missing_docs)]
// The only unsafe code is Windows FFI with no safe wrapper (src/win32.rs),
// allowed there and nowhere else.
#![deny(unsafe_code)]

#[cfg(not(any(
    feature = "ipc-interprocess",
    feature = "ipc-tokio",
    feature = "ipc-legacy"
)))]
compile_error!(
    "daemoneye-ipc needs at least one transport backend: enable the Cargo feature \
     `ipc-interprocess` (the default), `ipc-tokio` and/or `ipc-legacy`"
);

#[cfg(not(any(unix, windows)))]
compile_error!("daemoneye-ipc supports Unix (Linux, macOS, the BSDs) and Windows only");

mod backoff;
pub mod client;
pub mod config;
mod drive;
pub mod endpoint;
pub mod error;
pub mod frame;
#[cfg(any(fuzzing, test))]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(any(target_os = "linux", target_os = "android"))]
mod linux;
#[cfg(all(test, daemoneye_loom))]
mod loom;
mod peer;
mod policy;
pub mod proto;
pub mod sample;
pub mod server;
#[cfg(test)]
mod simulation;
mod sync;
pub mod telemetry;
mod transport;
#[cfg(feature = "upstream-compat")]
pub mod upstream;
pub mod view;
#[cfg(windows)]
mod win32;

pub use client::{ClientBuilder, IpcClient};
pub use config::{IpcConfig, TransportKind};
pub use error::IpcError;
pub use frame::{Crc32Variant, FrameSettings};
pub use proto::{DetectionResult, DetectionTask, ProcessRecord, TaskType};
pub use server::{IpcServer, Reply, TaskHandler};
pub use telemetry::ServerStats;
pub use transport::PeerCredentials;
