//! Connection slots and the waiting room in front of them: [`Admission`].
//!
//! At most `max_connections` connections are served at once. A connection
//! that arrives when every slot is taken waits, first come first served, for
//! up to `accept_timeout`; the waiting room holds at most `max_connections`
//! too, so a flood of connections cannot pile up. A connection still
//! waiting when its time is up, or that finds the room full, is refused.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Identifies one arriving connection.
pub(crate) type ArrivalId = u64;

/// What happens to an arriving connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// A slot was free: serve it now.
    Admitted,
    /// Every slot is taken: it waits until `deadline` for one.
    Waiting { deadline: Instant },
    /// Every slot is taken and so is every place in the waiting room.
    Refused,
}

/// Slots and the waiting room. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Admission {
    slots: usize,
    in_use: usize,
    room: usize,
    wait_limit: Duration,
    /// Waiting connections, oldest first, with their deadlines.
    waiting: VecDeque<(ArrivalId, Instant)>,
}

impl Admission {
    /// `slots` connections served at once, as many waiting, each for up to
    /// `wait_limit`.
    pub(crate) fn new(slots: usize, wait_limit: Duration) -> Admission {
        Admission {
            slots,
            in_use: 0,
            room: slots,
            wait_limit,
            waiting: VecDeque::new(),
        }
    }

    /// A connection arrives at `now`.
    pub(crate) fn arrive(&mut self, id: ArrivalId, now: Instant) -> Arrival {
        if self.in_use < self.slots && self.waiting.is_empty() {
            self.in_use += 1;
            return Arrival::Admitted;
        }
        if self.waiting.len() >= self.room {
            return Arrival::Refused;
        }
        let deadline = now + self.wait_limit;
        self.waiting.push_back((id, deadline));
        Arrival::Waiting { deadline }
    }

    /// A served connection ended at `now`: its slot goes to the oldest
    /// connection still in time, which is returned (now admitted), or
    /// becomes free.
    pub(crate) fn release(&mut self, now: Instant) -> Option<ArrivalId> {
        self.in_use = self.in_use.saturating_sub(1);
        self.expire(now);
        let (id, _) = self.waiting.pop_front()?;
        self.in_use += 1;
        Some(id)
    }

    /// Removes and returns the connections whose wait is over by `now`
    /// (a deadline of exactly `now` is over).
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<ArrivalId> {
        let mut expired = Vec::new();
        while let Some(&(id, deadline)) = self.waiting.front() {
            if deadline > now {
                break;
            }
            self.waiting.pop_front();
            expired.push(id);
        }
        expired
    }

    /// A waiting connection gives up (its own timer, or shutdown). Returns
    /// false if it was no longer waiting: then it has been admitted, and
    /// owns a slot it must [`release`](Self::release).
    pub(crate) fn withdraw(&mut self, id: ArrivalId) -> bool {
        match self.waiting.iter().position(|&(waiting, _)| waiting == id) {
            Some(index) => {
                self.waiting.remove(index);
                true
            }
            None => false,
        }
    }

    /// When the oldest waiting connection's time is up.
    #[cfg(test)]
    fn poll_timeout(&self) -> Option<Instant> {
        self.waiting.front().map(|&(_, deadline)| deadline)
    }

    /// Connections served now.
    #[cfg(test)]
    fn in_use(&self) -> usize {
        self.in_use
    }

    /// Connections waiting now.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    #[test]
    fn connections_beyond_the_slots_wait_and_are_admitted_first_come_first_served() {
        let t0 = Instant::now();
        let mut admission = Admission::new(2, WAIT);
        assert_eq!(admission.arrive(1, t0), Arrival::Admitted);
        assert_eq!(admission.arrive(2, t0), Arrival::Admitted);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            admission.arrive(3, t1),
            Arrival::Waiting {
                deadline: t1 + WAIT
            }
        );
        let t2 = t0 + Duration::from_secs(2);
        assert_eq!(
            admission.arrive(4, t2),
            Arrival::Waiting {
                deadline: t2 + WAIT
            }
        );
        assert_eq!(admission.poll_timeout(), Some(t1 + WAIT));

        assert_eq!(admission.release(t2), Some(3), "the oldest waiter first");
        assert_eq!(admission.release(t2), Some(4));
        assert_eq!(admission.in_use(), 2);
        assert_eq!(admission.release(t2), None);
        assert_eq!(admission.in_use(), 1);
        assert_eq!(admission.arrive(5, t2), Arrival::Admitted);
    }

    #[test]
    fn the_waiting_room_is_as_large_as_the_slots_and_no_larger() {
        let t0 = Instant::now();
        let mut admission = Admission::new(2, WAIT);
        for id in 1..=2 {
            assert_eq!(admission.arrive(id, t0), Arrival::Admitted);
        }
        for id in 3..=4 {
            assert!(matches!(admission.arrive(id, t0), Arrival::Waiting { .. }));
        }
        assert_eq!(admission.arrive(5, t0), Arrival::Refused);
        assert_eq!(admission.waiting(), 2);
    }

    #[test]
    fn a_wait_ends_exactly_at_its_deadline() {
        let t0 = Instant::now();
        let mut admission = Admission::new(1, WAIT);
        admission.arrive(1, t0);
        admission.arrive(2, t0);
        assert!(
            admission
                .expire(t0 + WAIT - Duration::from_nanos(1))
                .is_empty(),
            "not a moment early"
        );
        assert_eq!(admission.expire(t0 + WAIT), vec![2]);
        assert_eq!(admission.poll_timeout(), None);
        // The slot freed after the deadline goes to no one.
        assert_eq!(admission.release(t0 + WAIT), None);
        assert_eq!(admission.in_use(), 0);
    }

    #[test]
    fn a_slot_freed_after_a_deadline_skips_the_expired_waiter() {
        let t0 = Instant::now();
        let mut admission = Admission::new(2, WAIT);
        admission.arrive(1, t0);
        admission.arrive(2, t0);
        admission.arrive(3, t0);
        let t1 = t0 + Duration::from_secs(3);
        admission.arrive(4, t1);
        assert_eq!(admission.release(t0 + WAIT), Some(4));
        assert_eq!(admission.waiting(), 0, "3 was dropped as expired");
    }

    #[test]
    fn a_waiter_that_withdraws_leaves_no_trace_unless_it_was_just_admitted() {
        let t0 = Instant::now();
        let mut admission = Admission::new(2, WAIT);
        admission.arrive(1, t0);
        admission.arrive(2, t0);
        admission.arrive(3, t0);
        admission.arrive(4, t0);
        assert!(admission.withdraw(3));
        assert_eq!(admission.release(t0), Some(4));
        assert!(!admission.withdraw(4), "already admitted: it owns the slot");
        assert_eq!(admission.in_use(), 2);
    }

    #[test]
    fn while_others_wait_a_newcomer_does_not_jump_the_queue() {
        let t0 = Instant::now();
        let mut admission = Admission::new(1, WAIT);
        admission.arrive(1, t0);
        admission.arrive(2, t0);
        // The slot frees, but waiter 2 has not been handed it yet by its
        // driver: a newcomer in between queues behind.
        assert_eq!(admission.release(t0), Some(2));
        assert!(matches!(admission.arrive(3, t0), Arrival::Waiting { .. }));
    }
}
