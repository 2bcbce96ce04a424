//! [`SharedBudget`]: the [`Budget`] every connection of a server shares, and
//! the wake-up of a connection whose reservation is granted while it waits.
//!
//! Each connection's core says what it needs and what it gives back; its
//! driver carries both here with [`SharedBudget::settle`] after every event
//! and hands back what was granted. A grant made later, when another
//! connection releases, is kept for its connection and the connection is
//! woken to collect it: nothing polls.

use crate::sync::{Mutex, MutexGuard};
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
    /// Each connection's account, at the index that is its holder id (ids
    /// of connections that left are used again).
    holders: Vec<Option<Account>>,
    vacant: Vec<usize>,
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
                holders: Vec::new(),
                vacant: Vec::new(),
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
        let account = Some(Account { granted: 0, wake });
        let index = match inner.vacant.pop() {
            Some(index) => {
                inner.holders[index] = account;
                index
            }
            None => {
                inner.holders.push(account);
                inner.holders.len() - 1
            }
        };
        index as Holder
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
        if let Some(account) = inner.account(holder) {
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
        if let Some(account) = inner.account(holder) {
            exchanged.granted += std::mem::take(&mut account.granted);
        }
        exchanged
    }

    /// The connection ended: `released` (everything it held) comes back,
    /// with any grant it did not collect, and its waiting request is
    /// dropped.
    pub(crate) fn leave(&self, holder: Holder, released: usize) {
        let mut inner = self.lock();
        // Its request is cancelled before its id can be used again, so no
        // grant meant for it reaches the next connection with that id.
        let uncollected = inner
            .holders
            .get_mut(holder as usize)
            .and_then(Option::take)
            .map_or(0, |account| account.granted);
        inner.vacant.push(holder as usize);
        inner.budget.cancel(holder);
        inner.budget.release(released + uncollected);
        inner.pass_on();
    }

    /// Debug view (test only).
    #[cfg(test)]
    pub(crate) fn debug(&self) -> String {
        let inner = self.lock();
        format!(
            "{:?} accounts {:?}",
            inner.budget,
            inner
                .holders
                .iter()
                .enumerate()
                .filter_map(|(holder, account)| Some((holder, account.as_ref()?.granted)))
                .collect::<Vec<_>>()
        )
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
    fn account(&mut self, holder: Holder) -> Option<&mut Account> {
        self.holders.get_mut(holder as usize)?.as_mut()
    }

    /// Credits each grant the budget made to its holder and wakes it; a
    /// grant for a holder that has left goes back at once.
    fn pass_on(&mut self) {
        while let Some((holder, bytes)) = self.budget.poll_grant() {
            match self.account(holder) {
                Some(account) => {
                    account.granted += bytes;
                    (account.wake)();
                }
                None => self.budget.release(bytes),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use bytes::BytesMut;

    use super::*;
    use crate::frame::{FrameSettings, encode_message};
    use crate::policy::server::{ConnectionLimits, ServerEvent};
    use crate::proto::{DetectionResult, DetectionTask};

    const LIMITS: ConnectionLimits = ConnectionLimits {
        settings: FrameSettings {
            max_frame_bytes: 1024,
            ..FrameSettings::DEFAULT
        },
        read_timeout: Duration::from_secs(30),
        write_timeout: Duration::from_secs(10),
        task_timeout: Duration::from_secs(60),
        max_in_flight: 32,
    };

    fn frame(id: &str) -> Vec<u8> {
        let task = DetectionTask {
            task_id: id.to_owned(),
            ..Default::default()
        };
        let mut wire = BytesMut::new();
        encode_message(&task, LIMITS.settings, &mut wire).unwrap();
        wire.to_vec()
    }

    /// A connection of a server sharing `budget`, and how often it was woken.
    fn connection(
        budget: &SharedBudget,
        now: Instant,
    ) -> (ServerConnection, Holder, Arc<AtomicUsize>) {
        let woken = Arc::new(AtomicUsize::new(0));
        let wake = {
            let woken = woken.clone();
            Box::new(move || {
                woken.fetch_add(1, Ordering::SeqCst);
            })
        };
        let core = ServerConnection::new(LIMITS, Arc::default(), Arc::default(), now);
        (core, budget.join(wake), woken)
    }

    fn started(core: &mut ServerConnection) -> Vec<u64> {
        std::iter::from_fn(|| core.poll_event())
            .map(|event| match event {
                ServerEvent::StartTask { ticket, .. } => ticket,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_connection_waits_for_room_another_holds_and_is_woken_when_it_is_written() {
        // Room for one task of the largest size and a little more: a small
        // task reserves its frame and the largest result, so the second
        // connection's task must wait for the first's result to go out.
        let counters = Counters::default();
        let t0 = Instant::now();
        let budget = SharedBudget::new(LIMITS.largest_reservation());
        let (mut busy, busy_holder, _) = connection(&budget, t0);
        let (mut waiting, waiting_holder, woken) = connection(&budget, t0);

        let a = frame("a");
        busy.read_buffer().extend_from_slice(&a);
        busy.on_read(a.len(), t0);
        budget.settle(busy_holder, &mut busy, &counters, t0);
        let [ticket] = started(&mut busy)[..] else {
            panic!("a is taken")
        };

        let b = frame("b");
        waiting.read_buffer().extend_from_slice(&b);
        waiting.on_read(b.len(), t0);
        budget.settle(waiting_holder, &mut waiting, &counters, t0);
        assert!(started(&mut waiting).is_empty(), "b waits for room");
        assert!(!waiting.wants_read());
        assert_eq!(counters.budget_pauses.load(Ordering::Relaxed), 1, "counted");
        assert!(budget.held() <= LIMITS.largest_reservation());

        // a's result, a whole frame, is encoded: the unused allowance goes
        // back, not enough for b. Once it is written there is room, and b's
        // connection is woken, without having looked.
        busy.task_finished(
            ticket,
            Ok(DetectionResult {
                task_id: "a".into(),
                error_message: Some("x".repeat(1018)),
                ..Default::default()
            }
            .into()),
            t0,
        );
        budget.settle(busy_holder, &mut busy, &counters, t0);
        let result = busy.pending_output().len();
        assert_eq!(result, LIMITS.result_allowance(), "the largest result");
        assert_eq!(budget.held(), result, "b still waits");
        busy.on_written(result, t0);
        assert_eq!(woken.load(Ordering::SeqCst), 0);
        budget.settle(busy_holder, &mut busy, &counters, t0);
        assert_eq!(woken.load(Ordering::SeqCst), 1, "woken once room came back");
        budget.settle(waiting_holder, &mut waiting, &counters, t0);
        assert_eq!(started(&mut waiting).len(), 1, "b is taken");
        assert_eq!(counters.budget_pauses.load(Ordering::Relaxed), 1);

        budget.leave(busy_holder, busy.release_all());
        budget.leave(waiting_holder, waiting.release_all());
        assert_eq!(budget.held(), 0, "everything given back");
    }

    #[test]
    fn a_grant_to_a_connection_that_has_left_goes_back() {
        let counters = Counters::default();
        let t0 = Instant::now();
        let budget = SharedBudget::new(LIMITS.largest_reservation());
        let (mut busy, busy_holder, _) = connection(&budget, t0);
        let (mut gone, gone_holder, _) = connection(&budget, t0);
        for (core, holder, id) in [(&mut busy, busy_holder, "a"), (&mut gone, gone_holder, "b")] {
            let bytes = frame(id);
            core.read_buffer().extend_from_slice(&bytes);
            core.on_read(bytes.len(), t0);
            budget.settle(holder, core, &counters, t0);
        }
        // b's connection ends while it waits; a's then gives everything back.
        budget.leave(gone_holder, gone.release_all());
        budget.leave(busy_holder, busy.release_all());
        assert_eq!(budget.held(), 0);
    }
}
