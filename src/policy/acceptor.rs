//! Connection slots and the waiting room in front of them: [`Acceptor`].
//!
//! At most `max_connections` connections are served at once. A connection
//! that arrives when every slot is taken waits, first come first served, for
//! up to `accept_timeout`; the waiting room holds at most `max_connections`
//! too, so a flood of connections cannot pile up. Optionally, one peer (one
//! uid) may hold at most `max_connections_per_peer` of the slots and places
//! together, so that one agent cannot keep every other out.
//!
//! Every arrival is given an [`ArrivalId`], and its fate is decided here and
//! nowhere else:
//!
//! ```text
//!   arrive ──> Admitted ───────────────────────────> release(id)
//!          ──> Refused (room full, peer limit)
//!          ──> Waiting ──(a slot frees in time)──> Admitted ──> release(id)
//!                      ──(deadline, or withdraw)──> Expired
//! ```
//!
//! A waiter is never admitted at or after its deadline: a release first
//! expires every waiter whose time is up, then hands the slot to the oldest
//! one left. Decisions about waiters come out of
//! [`poll_decision`](Acceptor::poll_decision) for the driver to pass on;
//! [`poll_timeout`](Acceptor::poll_timeout) is always in the future once
//! [`handle_timeout`](Acceptor::handle_timeout) has run, so a driver that
//! sleeps until it never spins.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Identifies one arriving connection, from arrival to release.
pub(crate) type ArrivalId = u64;

/// What happens to an arriving connection at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// A slot was free: serve it now, and release it when done.
    Admitted,
    /// Every slot is taken: it waits until `deadline` for one; its fate
    /// comes out of [`Acceptor::poll_decision`].
    Waiting { deadline: Instant },
    /// It may neither be served nor wait.
    Refused(Refusal),
}

/// Why an arriving connection was refused at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Every slot and every place in the waiting room is taken.
    RoomFull,
    /// This peer holds `limit` slots and places already.
    PeerLimit { uid: u32, limit: usize },
}

/// What became of a connection that had to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// A slot is its own: serve it, and release it when done.
    Admitted,
    /// Its wait ended without a slot: its deadline passed, or it withdrew.
    Expired,
}

#[derive(Debug)]
struct Waiter {
    id: ArrivalId,
    deadline: Instant,
    uid: Option<u32>,
}

/// Slots and the waiting room. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Acceptor {
    max_connections: usize,
    max_per_peer: Option<usize>,
    wait_limit: Duration,
    /// Connections holding a slot, with their peer's uid.
    served: HashMap<ArrivalId, Option<u32>>,
    /// Waiting connections, oldest first. Every wait is as long, so this is
    /// also earliest deadline first.
    waiting: VecDeque<Waiter>,
    /// Slots and places held by each peer uid.
    per_peer: HashMap<u32, usize>,
    /// Fates decided and not yet passed on.
    decided: VecDeque<(ArrivalId, Fate)>,
    next_id: ArrivalId,
    /// The latest time it was told. Callers on several threads read the
    /// clock before they reach the acceptor, so their times may arrive out
    /// of order; time here never goes back, which keeps `waiting` in
    /// deadline order (an earlier deadline queued behind a later one would
    /// be neither expired nor admitted at its time).
    clock: Option<Instant>,
}

impl Acceptor {
    /// `max_connections` served at once, as many waiting, each for up to
    /// `wait_limit`; with `max_per_peer`, at most that many of those per
    /// peer uid.
    pub(crate) fn new(
        max_connections: usize,
        max_per_peer: Option<usize>,
        wait_limit: Duration,
    ) -> Acceptor {
        Acceptor {
            max_connections,
            max_per_peer,
            wait_limit,
            served: HashMap::new(),
            waiting: VecDeque::new(),
            per_peer: HashMap::new(),
            decided: VecDeque::new(),
            next_id: 0,
            clock: None,
        }
    }

    /// `now`, or the latest time already seen if `now` is before it.
    fn tick(&mut self, now: Instant) -> Instant {
        let now = self.clock.map_or(now, |latest| latest.max(now));
        self.clock = Some(now);
        now
    }

    /// A connection from a peer running as `uid` (if the OS says) arrives
    /// at `now`.
    pub(crate) fn arrive(&mut self, uid: Option<u32>, now: Instant) -> (ArrivalId, Arrival) {
        let now = self.tick(now);
        self.handle_timeout(now);
        self.next_id += 1;
        let id = self.next_id;
        if let (Some(uid), Some(limit)) = (uid, self.max_per_peer)
            && self.per_peer.get(&uid).copied().unwrap_or(0) >= limit
        {
            return (id, Arrival::Refused(Refusal::PeerLimit { uid, limit }));
        }
        if self.served.len() < self.max_connections && self.waiting.is_empty() {
            self.hold(id, uid);
            return (id, Arrival::Admitted);
        }
        if self.waiting.len() >= self.max_connections {
            return (id, Arrival::Refused(Refusal::RoomFull));
        }
        let deadline = now + self.wait_limit;
        self.count_peer(uid, 1);
        self.waiting.push_back(Waiter { id, deadline, uid });
        (id, Arrival::Waiting { deadline })
    }

    /// The served connection `id` ended at `now`: its slot goes to the
    /// oldest waiter still in time. False if `id` held no slot (a driver's
    /// mistake, which changes nothing here).
    pub(crate) fn release(&mut self, id: ArrivalId, now: Instant) -> bool {
        let Some(uid) = self.served.remove(&id) else {
            return false;
        };
        self.count_peer(uid, -1);
        self.handle_timeout(now);
        self.admit_waiters();
        true
    }

    /// Expires every waiter whose deadline is `now` or earlier.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        let now = self.tick(now);
        while let Some(waiter) = self.waiting.front() {
            if waiter.deadline > now {
                break;
            }
            let waiter = self.waiting.pop_front().expect("looked at the front");
            self.count_peer(waiter.uid, -1);
            self.decided.push_back((waiter.id, Fate::Expired));
        }
    }

    /// The waiter `id` gives up (the server stops, or it is gone). If it
    /// was still waiting, its fate is [`Fate::Expired`]; if it had been
    /// admitted, that stands (and it must release its slot).
    pub(crate) fn withdraw(&mut self, id: ArrivalId) {
        if let Some(index) = self.waiting.iter().position(|waiter| waiter.id == id) {
            let waiter = self.waiting.remove(index).expect("found just now");
            self.count_peer(waiter.uid, -1);
            self.decided.push_back((id, Fate::Expired));
        }
    }

    /// The next fate decided for a waiter, oldest first.
    pub(crate) fn poll_decision(&mut self) -> Option<(ArrivalId, Fate)> {
        self.decided.pop_front()
    }

    /// When the oldest waiter's time is up.
    /// (The async driver's waiters each keep their own timer instead.)
    #[cfg(any(feature = "ipc-legacy", test))]
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.waiting.front().map(|waiter| waiter.deadline)
    }

    /// Connections holding a slot now.
    #[cfg(test)]
    pub(crate) fn served(&self) -> usize {
        self.served.len()
    }

    /// Connections waiting now.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    fn admit_waiters(&mut self) {
        while self.served.len() < self.max_connections {
            let Some(waiter) = self.waiting.pop_front() else {
                break;
            };
            // The place it held in the room becomes the slot it holds.
            self.served.insert(waiter.id, waiter.uid);
            self.decided.push_back((waiter.id, Fate::Admitted));
        }
    }

    fn hold(&mut self, id: ArrivalId, uid: Option<u32>) {
        self.served.insert(id, uid);
        self.count_peer(uid, 1);
    }

    fn count_peer(&mut self, uid: Option<u32>, change: isize) {
        let (Some(uid), Some(_)) = (uid, self.max_per_peer) else {
            return;
        };
        let count = self.per_peer.entry(uid).or_insert(0);
        *count = count
            .checked_add_signed(change)
            .expect("counted once per slot or place");
        if *count == 0 {
            self.per_peer.remove(&uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    fn decisions(acceptor: &mut Acceptor) -> Vec<(ArrivalId, Fate)> {
        std::iter::from_fn(|| acceptor.poll_decision()).collect()
    }

    fn admitted(acceptor: &mut Acceptor, now: Instant) -> ArrivalId {
        match acceptor.arrive(None, now) {
            (id, Arrival::Admitted) => id,
            other => panic!("expected a slot, got {other:?}"),
        }
    }

    fn waiting(acceptor: &mut Acceptor, now: Instant) -> ArrivalId {
        match acceptor.arrive(None, now) {
            (id, Arrival::Waiting { deadline }) => {
                assert_eq!(deadline, now + WAIT);
                id
            }
            other => panic!("expected to wait, got {other:?}"),
        }
    }

    #[test]
    fn connections_beyond_the_slots_wait_and_are_admitted_first_come_first_served() {
        let t0 = Instant::now();
        let mut acceptor = Acceptor::new(2, None, WAIT);
        let a = admitted(&mut acceptor, t0);
        let b = admitted(&mut acceptor, t0);
        let t1 = t0 + Duration::from_secs(1);
        let c = waiting(&mut acceptor, t1);
        let d = waiting(&mut acceptor, t0 + Duration::from_secs(2));
        assert_eq!(acceptor.poll_timeout(), Some(t1 + WAIT));

        let t2 = t0 + Duration::from_secs(3);
        assert!(acceptor.release(a, t2));
        assert!(acceptor.release(b, t2));
        assert_eq!(
            decisions(&mut acceptor),
            [(c, Fate::Admitted), (d, Fate::Admitted)],
            "the oldest waiter first"
        );
        assert_eq!(acceptor.served(), 2);
        assert!(acceptor.release(c, t2));
        assert_eq!(acceptor.served(), 1);
        admitted(&mut acceptor, t2);
    }

    #[test]
    fn the_waiting_room_is_as_large_as_the_slots_and_no_larger() {
        let t0 = Instant::now();
        let mut acceptor = Acceptor::new(2, None, WAIT);
        admitted(&mut acceptor, t0);
        admitted(&mut acceptor, t0);
        waiting(&mut acceptor, t0);
        waiting(&mut acceptor, t0);
        assert_eq!(
            acceptor.arrive(None, t0).1,
            Arrival::Refused(Refusal::RoomFull)
        );
        assert_eq!(acceptor.waiting(), 2);
    }

    #[test]
    fn a_wait_ends_exactly_at_its_deadline_and_is_never_due_afterwards() {
        let t0 = Instant::now();
        let mut acceptor = Acceptor::new(1, None, WAIT);
        let a = admitted(&mut acceptor, t0);
        let b = waiting(&mut acceptor, t0);
        acceptor.handle_timeout(t0 + WAIT - Duration::from_nanos(1));
        assert!(decisions(&mut acceptor).is_empty(), "not a moment early");
        acceptor.handle_timeout(t0 + WAIT);
        assert_eq!(decisions(&mut acceptor), [(b, Fate::Expired)]);
        assert_eq!(acceptor.poll_timeout(), None, "nothing left to wake for");
        assert!(acceptor.release(a, t0 + WAIT));
        assert!(
            decisions(&mut acceptor).is_empty(),
            "the slot goes to no one"
        );
        assert_eq!(acceptor.served(), 0);
    }

    #[test]
    fn a_slot_freed_after_a_deadline_goes_to_the_next_waiter_in_time_never_to_a_late_one() {
        // #17: a waiter whose deadline had passed was dropped from the room
        // by a release, and then read its withdrawal as an admission.
        let t0 = Instant::now();
        let mut acceptor = Acceptor::new(2, None, WAIT);
        let a = admitted(&mut acceptor, t0);
        admitted(&mut acceptor, t0);
        let late = waiting(&mut acceptor, t0);
        let t1 = t0 + Duration::from_secs(3);
        let in_time = waiting(&mut acceptor, t1);
        assert!(acceptor.release(a, t0 + WAIT));
        assert_eq!(
            decisions(&mut acceptor),
            [(late, Fate::Expired), (in_time, Fate::Admitted)]
        );
        // The late waiter's own timer fires now: it stays expired.
        acceptor.withdraw(late);
        assert!(decisions(&mut acceptor).is_empty());
        assert_eq!(acceptor.served(), 2);
        assert!(
            !acceptor.release(late, t1),
            "the late waiter has no slot to give back"
        );
        assert_eq!(acceptor.served(), 2, "nor can it free someone else's");
    }

    #[test]
    fn a_waiter_that_withdraws_expires_unless_it_was_admitted_first() {
        let t0 = Instant::now();
        let mut acceptor = Acceptor::new(2, None, WAIT);
        let a = admitted(&mut acceptor, t0);
        admitted(&mut acceptor, t0);
        let b = waiting(&mut acceptor, t0);
        let c = waiting(&mut acceptor, t0);
        acceptor.withdraw(b);
        assert_eq!(decisions(&mut acceptor), [(b, Fate::Expired)]);
        assert!(acceptor.release(a, t0));
        acceptor.withdraw(c);
        assert_eq!(
            decisions(&mut acceptor),
            [(c, Fate::Admitted)],
            "already admitted: it owns the slot"
        );
        assert_eq!(acceptor.served(), 2);
    }

    #[test]
    fn while_others_wait_a_newcomer_does_not_jump_the_queue() {
        let t0 = Instant::now();
        let mut acceptor = Acceptor::new(1, None, WAIT);
        let a = admitted(&mut acceptor, t0);
        let b = waiting(&mut acceptor, t0);
        assert!(acceptor.release(a, t0));
        assert_eq!(decisions(&mut acceptor), [(b, Fate::Admitted)]);
        waiting(&mut acceptor, t0);
    }

    #[test]
    fn one_peer_holds_at_most_its_share_of_slots_and_places() {
        let t0 = Instant::now();
        let mut acceptor = Acceptor::new(4, Some(2), WAIT);
        let (first, _) = acceptor.arrive(Some(1000), t0);
        acceptor.arrive(Some(1000), t0);
        assert_eq!(
            acceptor.arrive(Some(1000), t0).1,
            Arrival::Refused(Refusal::PeerLimit {
                uid: 1000,
                limit: 2
            })
        );
        assert_eq!(acceptor.arrive(Some(1001), t0).1, Arrival::Admitted);
        assert_eq!(
            acceptor.arrive(None, t0).1,
            Arrival::Admitted,
            "a peer whose uid is unknown is not counted"
        );
        assert!(acceptor.release(first, t0));
        assert_eq!(acceptor.arrive(Some(1000), t0).1, Arrival::Admitted);
    }

    #[test]
    fn a_peers_places_in_the_waiting_room_count_toward_its_share() {
        let t0 = Instant::now();
        let mut acceptor = Acceptor::new(1, Some(2), WAIT);
        acceptor.arrive(Some(7), t0);
        let (waiter, arrival) = acceptor.arrive(Some(7), t0);
        assert!(matches!(arrival, Arrival::Waiting { .. }));
        assert!(matches!(
            acceptor.arrive(Some(7), t0).1,
            Arrival::Refused(Refusal::PeerLimit { .. })
        ));
        acceptor.handle_timeout(t0 + WAIT);
        assert_eq!(decisions(&mut acceptor), [(waiter, Fate::Expired)]);
        assert!(matches!(
            acceptor.arrive(Some(7), t0 + WAIT).1,
            Arrival::Waiting { .. }
        ));
    }

    #[test]
    fn times_that_arrive_out_of_order_never_queue_an_earlier_deadline_behind_a_later_one() {
        // Two threads read the clock, then the later one takes the lock
        // first: the second arrival brings the earlier time.
        let t0 = Instant::now();
        let mut acceptor = Acceptor::new(2, None, WAIT);
        admitted(&mut acceptor, t0);
        admitted(&mut acceptor, t0);
        let late = t0 + Duration::from_millis(3);
        let (first, arrival) = acceptor.arrive(None, late);
        assert_eq!(
            arrival,
            Arrival::Waiting {
                deadline: late + WAIT
            }
        );
        let (second, arrival) = acceptor.arrive(None, t0);
        assert_eq!(
            arrival,
            Arrival::Waiting {
                deadline: late + WAIT
            },
            "the stale time is taken as the latest one seen"
        );
        // At the deadline both expire together: none is left behind with a
        // deadline already due (which would wake its timer in a loop).
        acceptor.handle_timeout(late + WAIT);
        assert_eq!(
            decisions(&mut acceptor),
            [(first, Fate::Expired), (second, Fate::Expired)]
        );
        assert_eq!(acceptor.poll_timeout(), None);
    }
}
