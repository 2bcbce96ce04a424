//! What every driver does for a served connection between its reads and
//! writes: the glue between the connection's core, its handlers and the
//! server's shared budget, written once.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

use super::HandlerOutcome;
use super::budget::{SharedBudget, Wake};
use crate::error::IpcError;
use crate::policy::budget::Holder;
use crate::policy::encodings::SharedEncodings;
use crate::policy::server::{ConnectionLimits, ServerConnection, ServerEvent, TaskTicket};
use crate::proto::DetectionTask;
use crate::telemetry::Counters;

/// Runs a connection's handlers, the way its driver does.
pub(crate) trait Handlers {
    /// Starts the handler on `task`: its outcome at once if it needed no
    /// waiting, else `None` and the driver reports it when done.
    fn start(&mut self, ticket: TaskTicket, task: Box<DetectionTask>) -> Option<HandlerOutcome>;
    /// Stops the handler of `ticket` (its task ran out of time and has been
    /// answered already).
    fn cancel(&mut self, ticket: TaskTicket);
}

/// One served connection's core and its share of the server's budget (`B`:
/// a reference to it, or an `Arc`), given back however the connection ends
/// (dropped, or unwound by a panic).
pub(crate) struct Served<B: Deref<Target = SharedBudget>> {
    pub(crate) core: ServerConnection,
    holder: Holder,
    budget: B,
    counters: Arc<Counters>,
}

impl<B: Deref<Target = SharedBudget>> Served<B> {
    /// A new connection of a server with these parts; `wake` tells its
    /// driver that a reservation it waited for was granted.
    pub(crate) fn new(
        limits: ConnectionLimits,
        counters: Arc<Counters>,
        encodings: Arc<SharedEncodings>,
        budget: B,
        wake: Wake,
        now: Instant,
    ) -> Served<B> {
        Served {
            core: ServerConnection::new(limits, counters.clone(), encodings, now),
            holder: budget.join(wake),
            budget,
            counters,
        }
    }

    /// Does what the core asks after an event (start and cancel handlers,
    /// carry its releases and requests to the budget and grants back) until
    /// it asks nothing more. Returns how the connection ended, once it has.
    pub(crate) fn step(
        &mut self,
        handlers: &mut impl Handlers,
        now: Instant,
    ) -> Option<Result<(), IpcError>> {
        loop {
            while let Some(event) = self.core.poll_event() {
                match event {
                    ServerEvent::StartTask { ticket, task } => {
                        if let Some(outcome) = handlers.start(ticket, task) {
                            self.core.task_finished(ticket, outcome, now);
                        }
                    }
                    ServerEvent::CancelTask { ticket } => handlers.cancel(ticket),
                }
            }
            self.budget
                .settle(self.holder, &mut self.core, &self.counters, now);
            if !self.core.has_events() {
                return self.core.poll_close();
            }
        }
    }
}

impl<B: Deref<Target = SharedBudget>> Drop for Served<B> {
    fn drop(&mut self) {
        self.budget.leave(self.holder, self.core.release_all());
    }
}
