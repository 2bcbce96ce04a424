//! DaemonEye's own IPC interface, over this crate (feature `upstream-compat`).
//!
//! The modules here have the paths, names, fields, defaults and signatures
//! of `daemoneye-lib`'s `ipc` and `proto` modules (DaemonEye at d59edea), so
//! that a trial build of the collector and agent swaps its transport with a
//! re-export instead of a rewrite:
//!
//! ```text
//! daemoneye_lib::ipc    ->  daemoneye_ipc::upstream::ipc
//! daemoneye_lib::proto  ->  daemoneye_ipc::upstream::proto
//! ```
//!
//! Underneath, the server and the client are this crate's [`IpcServer`] and
//! [`IpcClient`] on the transport `IpcConfig::transport` names, with
//! DaemonEye's checksum (CRC-32C). The frame is the same on the wire, so a
//! trial collector serves the agents deployed today and the other way
//! round. Where DaemonEye's behaviour is a defect this crate fixes, the
//! signature stays and the behaviour is better; each such difference is
//! listed in `docs/upstream-compat.md`.
//!
//! ```no_run
//! use daemoneye_ipc::upstream::ipc::interprocess_transport::{InterprocessClient, InterprocessServer};
//! use daemoneye_ipc::upstream::ipc::IpcConfig;
//! use daemoneye_ipc::upstream::proto::{DetectionResult, DetectionTask};
//!
//! # async fn demo() -> daemoneye_ipc::upstream::ipc::IpcResult<()> {
//! let config = IpcConfig {
//!     endpoint_path: "/run/daemoneye/procmond.sock".into(),
//!     ..IpcConfig::default()
//! };
//! let mut server = InterprocessServer::new(config.clone());
//! server.set_handler(|task: DetectionTask| async move {
//!     Ok(DetectionResult::success(task.task_id, vec![]))
//! });
//! server.start().await?;
//!
//! let mut client = InterprocessClient::new(config);
//! let result = client
//!     .send_task(DetectionTask::new_enumerate_processes("task-1", None))
//!     .await?;
//! assert!(result.success);
//! server.graceful_shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! [`IpcServer`]: crate::IpcServer
//! [`IpcClient`]: crate::IpcClient

pub mod ipc;
pub mod proto;
