//! [`MemoryBudget`]: the bytes a server holds for tasks in flight, across
//! all its connections.
//!
//! Every task decoded and not yet answered, and every result encoded and not
//! yet written, holds its frame's size against the budget. Past the budget a
//! connection that already has something in flight stops reading (its
//! clients' further tasks wait in the socket) until enough is written to
//! bring the total back under; a connection with nothing in flight may
//! always read one task, so none is starved. Memory then stops growing with
//! load instead of growing with it.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Bytes held for tasks in flight, server-wide.
#[derive(Debug)]
pub(crate) struct MemoryBudget {
    limit: usize,
    held: AtomicUsize,
}

impl MemoryBudget {
    pub(crate) fn new(limit: usize) -> MemoryBudget {
        MemoryBudget {
            limit,
            held: AtomicUsize::new(0),
        }
    }

    /// Whether more may be taken on.
    pub(crate) fn has_room(&self) -> bool {
        self.held.load(Relaxed) < self.limit
    }

    pub(crate) fn hold(&self, bytes: usize) {
        self.held.fetch_add(bytes, Relaxed);
    }

    pub(crate) fn release(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Relaxed);
    }

    /// Bytes held now.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Relaxed)
    }
}
