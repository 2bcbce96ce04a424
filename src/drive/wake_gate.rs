//! A gate in front of a driving loop's quiet wake-up sources (a shutdown
//! signal, a budget grant, callers asking for a write): they are polled
//! again only after one of them has woken the task.
//!
//! A Tokio `select!` polls every branch on every wake-up, and a driving
//! loop wakes once or twice per task for its socket alone. Polling a
//! waiting `CancellationToken` or `Notify` future takes a mutex each time
//! (to compare the stored waker), which was about a fifth of a server's
//! instructions per task with one task in flight. Behind the gate, the
//! sources are polled with a waker of the gate's own that records that one
//! of them woke before it wakes the task (whichever waker the task was
//! last polled with); while none has, the gate answers `Pending` without
//! touching them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Wake, Waker};

/// See the module documentation.
pub(crate) struct WakeGate {
    shared: Arc<GateWaker>,
    /// `shared` as a waker: what the gated sources are polled with.
    waker: Waker,
    /// The task's waker that `shared` passes wake-ups on to.
    task: Option<Waker>,
}

/// What the gated sources hold as their waker.
struct GateWaker {
    /// A source woke since the gate last opened.
    woken: AtomicBool,
    /// Whom to wake: the driving task.
    task: Mutex<Option<Waker>>,
}

impl Wake for GateWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Recorded before the task is woken, so the poll it causes opens
        // the gate.
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

impl WakeGate {
    pub(crate) fn new() -> WakeGate {
        let shared = Arc::new(GateWaker {
            // The sources have never been polled: the first poll must.
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        WakeGate {
            waker: Waker::from(shared.clone()),
            shared,
            task: None,
        }
    }

    /// The context to poll the gated sources in, if one of them may have
    /// become ready since they were last polled (one woke, or this is the
    /// first poll); `None` when none can have, and they need not be polled.
    /// A new task waker is stored for the gate's wake-ups to reach, and the
    /// gate opens then too (the sources hold the gate's waker, so this is
    /// not needed, but it is rare and costs one poll of each).
    pub(crate) fn open(&mut self, cx: &Context<'_>) -> Option<Context<'_>> {
        let task_changed = !self
            .task
            .as_ref()
            .is_some_and(|task| task.will_wake(cx.waker()));
        if task_changed {
            // Stored before `woken` is read: a wake-up after the read reaches
            // this waker, one before it is seen in `woken`.
            *self
                .shared
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(cx.waker().clone());
            self.task = Some(cx.waker().clone());
        }
        let woken = self.shared.woken.swap(false, Ordering::AcqRel);
        (woken || task_changed).then(|| Context::from_waker(&self.waker))
    }

    /// The sources must be polled again next time, though none woke: one
    /// was found ready and the others were not polled after it, or a source
    /// was replaced by a new future that must be polled to register.
    pub(crate) fn reopen(&self) {
        self.shared.woken.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;
    use std::task::Poll;

    use super::*;

    /// A waker that counts its wake-ups.
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting_waker() -> (Arc<Counter>, Waker) {
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        (counter.clone(), Waker::from(counter))
    }

    /// Polls `future` behind `gate`: `None` when the gate stayed shut.
    fn poll_gated<F: Future + Unpin>(
        gate: &mut WakeGate,
        cx: &Context<'_>,
        future: &mut F,
    ) -> Option<Poll<F::Output>> {
        let mut gated = gate.open(cx)?;
        Some(std::pin::Pin::new(future).poll(&mut gated))
    }

    #[test]
    fn a_source_is_polled_again_only_after_it_woke() {
        let notify = tokio::sync::Notify::new();
        let mut notified = pin!(notify.notified());
        let (task_wakes, waker) = counting_waker();
        let cx = Context::from_waker(&waker);
        let mut gate = WakeGate::new();

        assert!(matches!(
            poll_gated(&mut gate, &cx, &mut notified),
            Some(Poll::Pending)
        ));
        // Nothing woke: the gate stays shut, however often the task polls.
        assert!(poll_gated(&mut gate, &cx, &mut notified).is_none());
        assert!(poll_gated(&mut gate, &cx, &mut notified).is_none());

        notify.notify_one();
        assert_eq!(task_wakes.0.load(Ordering::SeqCst), 1, "the task is woken");
        assert!(matches!(
            poll_gated(&mut gate, &cx, &mut notified),
            Some(Poll::Ready(()))
        ));
    }

    #[test]
    fn a_new_task_waker_opens_the_gate_and_receives_later_wake_ups() {
        let notify = tokio::sync::Notify::new();
        let mut notified = pin!(notify.notified());
        let (first_wakes, first) = counting_waker();
        let (second_wakes, second) = counting_waker();
        let mut gate = WakeGate::new();

        assert!(matches!(
            poll_gated(&mut gate, &Context::from_waker(&first), &mut notified),
            Some(Poll::Pending)
        ));
        // Polled from elsewhere: the sources are polled, and the new waker
        // is the one woken.
        assert!(matches!(
            poll_gated(&mut gate, &Context::from_waker(&second), &mut notified),
            Some(Poll::Pending)
        ));
        notify.notify_one();
        assert_eq!(first_wakes.0.load(Ordering::SeqCst), 0);
        assert_eq!(second_wakes.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn reopening_polls_the_sources_once_more() {
        let notify = tokio::sync::Notify::new();
        let mut notified = pin!(notify.notified());
        let (_, waker) = counting_waker();
        let cx = Context::from_waker(&waker);
        let mut gate = WakeGate::new();

        assert!(poll_gated(&mut gate, &cx, &mut notified).is_some());
        assert!(poll_gated(&mut gate, &cx, &mut notified).is_none());
        gate.reopen();
        assert!(poll_gated(&mut gate, &cx, &mut notified).is_some());
        assert!(poll_gated(&mut gate, &cx, &mut notified).is_none());
    }
}
