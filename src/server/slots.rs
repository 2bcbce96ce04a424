//! [`Slots`]: the [`Admission`] policy shared by every connection of a
//! server, with the hand-off that tells a waiting connection it got a slot.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::policy::admission::{Admission, Arrival, ArrivalId};

/// Tells the waiting connection with this id it has been admitted; false if
/// no one was there to hear it (the waiter is gone), so the slot goes to
/// the next. Called under the slots' lock: it must only signal.
pub(crate) type Handoff = Box<dyn FnOnce(ArrivalId) -> bool + Send>;

/// Connection slots and the waiting room of one server.
pub(crate) struct Slots {
    inner: Mutex<Inner>,
}

struct Inner {
    admission: Admission,
    handoffs: HashMap<ArrivalId, Handoff>,
    next_id: ArrivalId,
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots")
            .field("admission", &self.lock().admission)
            .finish_non_exhaustive()
    }
}

/// What an arriving connection is told.
pub(crate) enum Admitted {
    /// It holds a slot; release it with [`Slots::release`] when done.
    Now,
    /// It waits, as `id`, until `deadline`; its hand-off is called if a slot
    /// frees for it first.
    Later { id: ArrivalId, deadline: Instant },
    /// It is refused: the waiting room is full.
    Refused,
}

impl Slots {
    pub(crate) fn new(max_connections: usize, wait_limit: Duration) -> Slots {
        Slots {
            inner: Mutex::new(Inner {
                admission: Admission::new(max_connections, wait_limit),
                handoffs: HashMap::new(),
                next_id: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Each critical section is a few field updates; a panic inside one
        // cannot leave them inconsistent.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A connection arrives; if it must wait, `handoff` will tell it when it
    /// is admitted.
    pub(crate) fn arrive(
        &self,
        handoff: impl FnOnce(ArrivalId) -> bool + Send + 'static,
        now: Instant,
    ) -> Admitted {
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        match inner.admission.arrive(id, now) {
            Arrival::Admitted => Admitted::Now,
            Arrival::Waiting { deadline } => {
                inner.handoffs.insert(id, Box::new(handoff));
                Admitted::Later { id, deadline }
            }
            Arrival::Refused => Admitted::Refused,
        }
    }

    /// A served connection ended: its slot goes to the oldest waiter still
    /// in time and still there.
    pub(crate) fn release(&self, now: Instant) {
        let mut inner = self.lock();
        for expired in inner.admission.expire(now) {
            inner.handoffs.remove(&expired);
        }
        // Each `release` frees a slot and hands it to the oldest waiter; one
        // that is no longer there frees it again for the next.
        while let Some(id) = inner.admission.release(now) {
            if inner
                .handoffs
                .remove(&id)
                .is_some_and(|handoff| handoff(id))
            {
                return;
            }
        }
    }

    /// A waiter gives up (its deadline passed, or the server stops). True if
    /// it was still waiting; false if it had been admitted meanwhile, and so
    /// holds a slot it must release.
    pub(crate) fn withdraw(&self, id: ArrivalId) -> bool {
        let mut inner = self.lock();
        inner.handoffs.remove(&id);
        inner.admission.withdraw(id)
    }
}
