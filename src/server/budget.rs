//! [`SharedBudget`]: the [`Budget`] every connection of a server shares, and
//! the wake-up of a connection whose reservation is granted while it waits.
//!
//! Each connection's core says what it needs and what it gives back; its
//! driver carries both here with [`SharedBudget::settle`] after every event
//! and hands back what was granted. A grant made later, when another
//! connection releases, is kept for its connection and the connection is
//! woken to collect it: nothing polls.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use crate::policy::budget::{Budget, Holder};
use crate::policy::server::ServerConnection;
use crate::telemetry::{Counters, bump};

/// Wakes a connection's driver. Called under the budget's lock: it must
/// only signal.
pub(crate) type Wake = Box<dyn Fn() + Send + Sync>;

/// The memory budget of one server. See the [module docs](self).
pub(crate) struct SharedBudget {
    inner: Mutex<Inner>,
}

struct Inner {
    budget: Budget,
    holders: HashMap<Holder, Account>,
    next_holder: Holder,
}

struct Account {
    /// Granted while it waited, not yet collected.
    granted: usize,
    wake: Wake,
}

impl std::fmt::Debug for SharedBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBudget")
            .field("budget", &self.lock().budget)
            .finish_non_exhaustive()
    }
}

impl SharedBudget {
    /// A budget of `limit` bytes.
    pub(crate) fn new(limit: usize) -> SharedBudget {
        SharedBudget {
            inner: Mutex::new(Inner {
                budget: Budget::new(limit),
                holders: HashMap::new(),
                next_holder: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Each critical section is arithmetic and signals; a panic inside
        // one cannot leave it half done.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new connection; `wake` tells its driver a grant is waiting.
    pub(crate) fn join(&self, wake: Wake) -> Holder {
        let mut inner = self.lock();
        inner.next_holder += 1;
        let holder = inner.next_holder;
        inner.holders.insert(holder, Account { granted: 0, wake });
        holder
    }

    /// Carries `core`'s releases and request to the budget and its grants
    /// back, until there is nothing more to exchange. Counts a request that
    /// has to wait as a pause.
    pub(crate) fn settle(
        &self,
        holder: Holder,
        core: &mut ServerConnection,
        counters: &Counters,
        now: Instant,
    ) {
        loop {
            let released = core.take_released();
            let request = core.budget_request();
            if released == 0 && request.is_none() && !core.awaits_grant() {
                return;
            }
            let exchanged = self.exchange(holder, released, request);
            if exchanged.waiting {
                bump(&counters.budget_pauses);
            }
            if exchanged.granted == 0 {
                return;
            }
            core.on_granted(exchanged.granted, now);
        }
    }

    /// Gives back `released`, asks for `request`, and collects what was
    /// granted (now, or earlier while the holder waited).
    fn exchange(&self, holder: Holder, released: usize, request: Option<usize>) -> Exchanged {
        let mut inner = self.lock();
        let mut exchanged = Exchanged::default();
        if let Some(account) = inner.holders.get_mut(&holder) {
            exchanged.granted = std::mem::take(&mut account.granted);
        }
        inner.budget.release(released);
        if let Some(bytes) = request {
            if inner.budget.request(holder, bytes) {
                exchanged.granted += bytes;
            } else {
                exchanged.waiting = true;
            }
        }
        inner.pass_on();
        if let Some(account) = inner.holders.get_mut(&holder) {
            exchanged.granted += std::mem::take(&mut account.granted);
        }
        exchanged
    }

    /// The connection ended: `released` (everything it held) comes back,
    /// with any grant it did not collect, and its waiting request is
    /// dropped.
    pub(crate) fn leave(&self, holder: Holder, released: usize) {
        let mut inner = self.lock();
        let uncollected = inner
            .holders
            .remove(&holder)
            .map_or(0, |account| account.granted);
        inner.budget.cancel(holder);
        inner.budget.release(released + uncollected);
        inner.pass_on();
    }

    /// Bytes held now, every connection together.
    pub(crate) fn held(&self) -> usize {
        self.lock().budget.held()
    }
}

#[derive(Debug, Default)]
struct Exchanged {
    granted: usize,
    waiting: bool,
}

impl Inner {
    /// Credits each grant the budget made to its holder and wakes it; a
    /// grant for a holder that has left goes back at once.
    fn pass_on(&mut self) {
        while let Some((holder, bytes)) = self.budget.poll_grant() {
            match self.holders.get_mut(&holder) {
                Some(account) => {
                    account.granted += bytes;
                    (account.wake)();
                }
                None => self.budget.release(bytes),
            }
        }
    }
}
