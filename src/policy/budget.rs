//! [`Budget`]: the bytes a server may hold for tasks in flight, across all
//! its connections, handed out before the work that needs them starts.
//!
//! A connection reserves, before it reads a task's body, room for that task
//! and for the largest result it could answer with (a frame of
//! `max_frame_bytes`). So everything it then holds (the task's frame, the
//! result once encoded, the result while it is written) is covered before it
//! exists, and the total never exceeds the limit, however the results turn
//! out and however slowly peers read them. What a connection does not use
//! (a result smaller than the largest) goes back as soon as it is known;
//! the rest as it is written.
//!
//! A reservation that does not fit waits, first come first served, and is
//! granted when others release enough: [`poll_grant`](Budget::poll_grant)
//! says which connection to wake. Nothing polls. Since every reservation is
//! released in bounded time (a result is written within `write_timeout_ms`
//! or its connection is closed; a handler is stopped at `task_timeout_ms`),
//! every wait ends.

use std::collections::VecDeque;

/// Identifies one connection to the budget.
pub(crate) type Holder = u64;

/// Bytes held for tasks in flight, server-wide. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    held: usize,
    /// Reservations that did not fit, oldest first.
    queue: VecDeque<(Holder, usize)>,
    /// Reservations granted from the queue, for their holders to collect.
    granted: VecDeque<(Holder, usize)>,
}

impl Budget {
    /// A budget of `limit` bytes. No reservation may be larger.
    pub(crate) fn new(limit: usize) -> Budget {
        Budget {
            limit,
            held: 0,
            queue: VecDeque::new(),
            granted: VecDeque::new(),
        }
    }

    /// `holder` asks for `bytes` more: true if granted now; otherwise it
    /// waits in the queue (a holder has at most one request waiting).
    pub(crate) fn request(&mut self, holder: Holder, bytes: usize) -> bool {
        debug_assert!(bytes <= self.limit, "a reservation larger than the budget");
        debug_assert!(
            !self.queue.iter().any(|&(waiting, _)| waiting == holder),
            "one request at a time"
        );
        if self.queue.is_empty() && self.fits(bytes) {
            self.held += bytes;
            return true;
        }
        self.queue.push_back((holder, bytes));
        false
    }

    /// `bytes` held come back; queued requests that now fit are granted,
    /// in order.
    pub(crate) fn release(&mut self, bytes: usize) {
        debug_assert!(bytes <= self.held, "released more than was held");
        self.held -= bytes.min(self.held);
        while let Some(&(holder, bytes)) = self.queue.front() {
            if !self.fits(bytes) {
                break;
            }
            self.queue.pop_front();
            self.held += bytes;
            self.granted.push_back((holder, bytes));
        }
    }

    /// `holder` no longer waits (its connection ended): its queued request,
    /// if any, is dropped.
    pub(crate) fn cancel(&mut self, holder: Holder) {
        self.queue.retain(|&(waiting, _)| waiting != holder);
        // Dropping it may let the ones behind it through.
        self.release(0);
    }

    /// The next queued request granted, to pass on to its holder.
    pub(crate) fn poll_grant(&mut self) -> Option<(Holder, usize)> {
        self.granted.pop_front()
    }

    /// Bytes held now (granted and not released).
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    fn fits(&self, bytes: usize) -> bool {
        self.held + bytes <= self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(budget: &mut Budget) -> Vec<(Holder, usize)> {
        std::iter::from_fn(|| budget.poll_grant()).collect()
    }

    #[test]
    fn requests_are_granted_while_they_fit_and_never_beyond_the_limit() {
        let mut budget = Budget::new(100);
        assert!(budget.request(1, 60));
        assert!(budget.request(2, 40));
        assert_eq!(budget.held(), 100);
        assert!(!budget.request(3, 1), "not a byte over");
        assert_eq!(budget.held(), 100);
    }

    #[test]
    fn a_waiting_request_is_granted_when_enough_comes_back_and_its_holder_named() {
        let mut budget = Budget::new(100);
        assert!(budget.request(1, 80));
        assert!(!budget.request(2, 50));
        budget.release(20);
        assert!(grants(&mut budget).is_empty(), "30 free, 50 asked");
        budget.release(10);
        assert_eq!(grants(&mut budget), [(2, 50)]);
        assert_eq!(budget.held(), 100);
    }

    #[test]
    fn requests_wait_their_turn_behind_an_earlier_one() {
        let mut budget = Budget::new(100);
        assert!(budget.request(1, 90));
        assert!(!budget.request(2, 50));
        assert!(!budget.request(3, 5), "no overtaking, though 5 would fit");
        budget.release(90);
        assert_eq!(grants(&mut budget), [(2, 50), (3, 5)]);
    }

    #[test]
    fn a_cancelled_request_lets_the_ones_behind_it_through() {
        let mut budget = Budget::new(100);
        assert!(budget.request(1, 60));
        assert!(!budget.request(2, 50));
        assert!(!budget.request(3, 40));
        budget.cancel(2);
        assert_eq!(grants(&mut budget), [(3, 40)]);
        assert_eq!(budget.held(), 100);
    }
}
