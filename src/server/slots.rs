//! [`Slots`]: the [`Acceptor`] shared by every connection of a server, and
//! the hand-off that tells a waiting connection its fate.
//!
//! The acceptor decides; this only passes its decisions on, under the same
//! lock that made them, so a waiter learns its fate exactly once and never
//! from two places. A fate that finds no one to hear it (the waiter is
//! gone) is settled here: a slot handed to no one is released at once.
//!
//! Each call takes a clock rather than a time and reads it under the lock:
//! a time read before a contended lock would be stale by the wait, and a
//! release could then admit a waiter whose deadline passed meanwhile.
//! (Production passes `Instant::now`; the simulation and loom their own.)

use crate::sync::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::policy::acceptor::{Acceptor, Arrival, ArrivalId, Fate};

/// Tells the waiting connection with this id its fate; false if no one was
/// there to hear it. Called under the slots' lock: it must only signal.
pub(crate) type Handoff = Box<dyn FnOnce(ArrivalId, Fate) -> bool + Send>;

/// Connection slots and the waiting room of one server.
pub(crate) struct Slots {
    inner: Mutex<Inner>,
}

struct Inner {
    acceptor: Acceptor,
    handoffs: HashMap<ArrivalId, Handoff>,
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots")
            .field("acceptor", &self.lock().acceptor)
            .finish_non_exhaustive()
    }
}

impl Slots {
    pub(crate) fn new(
        max_connections: usize,
        max_per_peer: Option<usize>,
        wait_limit: Duration,
    ) -> Slots {
        Slots {
            inner: Mutex::new(Inner {
                acceptor: Acceptor::new(max_connections, max_per_peer, wait_limit),
                handoffs: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Each critical section runs the acceptor (which does not panic on
        // any input) and signals; nothing can be left half done.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A connection from `uid` arrives; if it must wait, `handoff` tells it
    /// its fate.
    pub(crate) fn arrive(
        &self,
        uid: Option<u32>,
        handoff: impl FnOnce(ArrivalId, Fate) -> bool + Send + 'static,
        clock: impl FnOnce() -> Instant,
    ) -> (ArrivalId, Arrival) {
        let mut inner = self.lock();
        let now = clock();
        let (id, arrival) = inner.acceptor.arrive(uid, now);
        if let Arrival::Waiting { .. } = arrival {
            inner.handoffs.insert(id, Box::new(handoff));
        }
        inner.pass_on(now);
        (id, arrival)
    }

    /// The served connection `id` ended: its slot goes to the oldest waiter
    /// still in time.
    pub(crate) fn release(&self, id: ArrivalId, clock: impl FnOnce() -> Instant) {
        let mut inner = self.lock();
        let now = clock();
        let released = inner.acceptor.release(id, now);
        debug_assert!(released, "connection {id} released a slot it did not hold");
        inner.pass_on(now);
    }

    /// Expires the waiters whose deadline has come.
    pub(crate) fn handle_timeout(&self, clock: impl FnOnce() -> Instant) {
        let mut inner = self.lock();
        let now = clock();
        inner.acceptor.handle_timeout(now);
        inner.pass_on(now);
    }

    /// The waiter `id` gives up; its hand-off hears `Expired`, or has heard
    /// `Admitted` already.
    pub(crate) fn withdraw(&self, id: ArrivalId, clock: impl FnOnce() -> Instant) {
        let mut inner = self.lock();
        let now = clock();
        inner.acceptor.withdraw(id);
        inner.pass_on(now);
    }

    /// When the oldest waiter's time is up.
    /// (The async driver's waiters each keep their own timer instead.)
    #[cfg(any(feature = "ipc-legacy", test))]
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.lock().acceptor.poll_timeout()
    }

    /// Connections holding a slot now.
    #[cfg(test)]
    pub(crate) fn served(&self) -> usize {
        self.lock().acceptor.served()
    }
}

impl Inner {
    /// Hands every decided fate to its waiter. A slot whose waiter has gone
    /// is released at once, which may admit the next.
    fn pass_on(&mut self, now: Instant) {
        while let Some((id, fate)) = self.acceptor.poll_decision() {
            let heard = self
                .handoffs
                .remove(&id)
                .is_some_and(|handoff| handoff(id, fate));
            if !heard && fate == Fate::Admitted {
                self.acceptor.release(id, now);
            }
        }
    }
}
