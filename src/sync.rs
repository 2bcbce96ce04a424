//! The locks shared between connections, from std, or from loom when its
//! tests explore their interleavings (`--cfg daemoneye_loom`, see
//! `src/loom.rs`).

#[cfg(all(test, daemoneye_loom))]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(not(all(test, daemoneye_loom)))]
pub(crate) use std::sync::{Mutex, MutexGuard};
