//! One client connection, as a state machine: [`ClientConnection`].
//!
//! The rules it keeps, whichever driver feeds it:
//!
//! * **Correlation.** Each task sent is registered under its `task_id`
//!   with the caller waiting for it (the waiter, `W`, is the driver's: a
//!   channel to wake that caller). A result goes to the caller registered
//!   for its id, and to no one else. An id is refused while a task with
//!   that id is outstanding.
//! * **Deadlines.** Each caller waits until its own deadline. The
//!   connection keeps every waiting task's deadline and asks its driver to
//!   wake it for the earliest, so a caller needs no timer of its own: at its
//!   deadline it is told it timed out.
//! * **Tasks given up on.** A caller who stops waiting (its deadline passed,
//!   or it was cancelled) leaves its entry behind, marked abandoned, until
//!   the late result arrives and is discarded: the id stays reserved, so a
//!   late result is never taken for the answer to a later task. The task
//!   still counts as in flight, as it does on the server.
//! * **In-flight limit.** At most `max_in_flight` tasks are outstanding;
//!   the server stops reading a connection at its own limit, and a client
//!   that sent more would stall behind that backpressure.
//! * **Retirement.** A connection holding an abandoned task past that
//!   task's deadline has a server that stopped answering it: it takes no
//!   new tasks ([`usable`](ClientConnection::usable) says so) and closes as
//!   soon as no caller waits on it, which releases its slots here and on
//!   the server. A connection idle for half the read timeout is about to be
//!   closed by the server and is replaced too.
//! * **Bad input.** A result frame that fails its checksum, is too large, is
//!   cut short, arrives incomplete within `read_timeout`, whose top-level
//!   framing or `task_id` does not decode, or that answers a task this
//!   connection is not waiting for (never sent, or answered already) ends
//!   the connection: every waiting caller hears why, none gets a wrong
//!   answer.
//! * **Notices.** A result with an empty `task_id` answers no task (a task
//!   always has an id): it is the server saying why it closes the
//!   connection without serving it (the peer refused, no slot freed). Every
//!   waiting caller hears that the connection was refused, and why; their
//!   tasks did not run.
//! * **A failed write.** When a write fails the server has gone, but what it
//!   sent before it went (a notice) may still be waiting to be read: the
//!   connection writes no more and reads to the end before it closes.
//! * **Decoding.** The connection reads a result's `task_id`, and checks
//!   that each top-level field is framed soundly; the fields themselves are
//!   decoded by the caller it goes to, into the type that caller asked for
//!   (plain or [view](crate::view)). So the reader never decodes a result
//!   twice, and a result whose fields do not decode fails only its own task
//!   (`IpcError::MalformedResult`).

use std::io;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::earliest;
use super::inbound::Inbound;
use super::outbound::Outbound;
use crate::error::IpcError;
use crate::frame::FrameSettings;
use crate::proto::DetectionTask;

/// What the connection decodes of a result: only its id, to know whose it is.
/// Decoding a `DetectionResult`'s body as this message checks the framing of
/// every top-level field (prost skips the others by their lengths) without
/// decoding them. The id is a slice of the frame, neither copied nor
/// checked as UTF-8 here: it is only compared with the ids sent, and the
/// caller's decoding checks the whole result. Named after the message it
/// reads, for error messages.
mod id_only {
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct DetectionResult {
        #[prost(bytes = "bytes", tag = "1")]
        pub(super) task_id: bytes::Bytes,
    }
}

/// Identifies one registration of a task id (the same id may be registered
/// again once its first task is answered).
pub(crate) type Ticket = u64;

/// Why a task could not be registered.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The connection is closed (or retired); try another.
    Closed,
    /// A task with this id is outstanding.
    Duplicate,
    /// `max_in_flight` tasks are outstanding.
    Full,
    /// The task does not fit in a frame.
    TooLarge(IpcError),
    /// The caller's deadline has passed (waiting for a slot took it):
    /// nothing is sent that the caller would not wait for.
    Late,
}

/// What becomes of a task its caller still waits for.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The server's result: the body of its frame, for the caller to
    /// decode (a slice of the read buffer, not a copy).
    Answered(Bytes),
    /// The connection ended first, for this reason; the task may or may not
    /// have run.
    Lost(String),
    /// The connection ended, for this reason, before a byte of the task was
    /// written: it never reached the server, and may be sent again.
    Unsent(String),
    /// The server refused the connection, for this reason (its notice): the
    /// task did not run.
    Refused(String),
    /// The caller's deadline passed first; the task may still run, and its
    /// late result will be discarded.
    TimedOut,
}

/// An outcome for the caller behind `waiter`, with its task's id (handed
/// back, so that the caller keeps no copy of its own).
#[derive(Debug)]
pub(crate) struct Delivery<W> {
    pub(crate) waiter: W,
    pub(crate) task_id: String,
    pub(crate) outcome: Outcome,
}

#[derive(Debug)]
enum Entry<W> {
    Waiting {
        ticket: Ticket,
        waiter: W,
        deadline: Instant,
    },
    Abandoned {
        deadline: Instant,
    },
}

/// A task outstanding, under its id. A connection has few (at most
/// `max_in_flight`), so they are found by comparing ids in a short list,
/// oldest first, rather than by hashing every id.
#[derive(Debug)]
struct Outstanding<W> {
    task_id: String,
    entry: Entry<W>,
}

/// The policy of one client connection. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct ClientConnection<W> {
    inbound: Inbound<id_only::DetectionResult>,
    outbound: Outbound<DetectionTask>,
    pending: Vec<Outstanding<W>>,
    /// Entries whose caller still waits.
    waiting: usize,
    max_in_flight: usize,
    next_ticket: Ticket,
    /// Why the connection ended, once it has.
    closed: Option<String>,
    /// The server's notice, if it refused the connection.
    refused: Option<String>,
    /// Why a write failed: nothing more is written, and what the server
    /// sent before is read to the end.
    write_failed: Option<String>,
    /// Frames dropped unwritten, not one byte of them, when a write failed:
    /// the newest tasks outstanding, which never reached the server.
    dropped_unwritten: usize,
    retired: bool,
    /// When the last outstanding task was settled.
    idle_since: Instant,
    deliveries: Vec<Delivery<W>>,
    /// When the driver will next call [`handle_timeout`](Self::handle_timeout),
    /// as it last said; `None` if not at all. A new connection's driver
    /// first wakes one read timeout after the connection opened: a task's
    /// deadline is a read timeout after its call began, so the first task
    /// needs no wake-up to set the timer (only a call retried on a fresh
    /// connection brings an earlier one, and asks for a retime).
    driver_wakes_at: Option<Instant>,
    /// A caller's deadline comes before that: the driver must look again.
    retime: bool,
    /// A slot freed, or the connection was retired, without an outcome for
    /// anyone: callers waiting for a slot must look again all the same.
    slots_changed: bool,
}

impl<W> ClientConnection<W> {
    pub(crate) fn new(
        settings: FrameSettings,
        read_timeout: Duration,
        write_timeout: Duration,
        max_in_flight: usize,
        now: Instant,
    ) -> Self {
        ClientConnection {
            inbound: Inbound::new(settings, read_timeout),
            outbound: Outbound::new(settings, write_timeout),
            pending: Vec::new(),
            waiting: 0,
            max_in_flight: max_in_flight.max(1),
            next_ticket: 0,
            closed: None,
            refused: None,
            write_failed: None,
            dropped_unwritten: 0,
            retired: false,
            idle_since: now,
            deliveries: Vec::new(),
            driver_wakes_at: Some(now + read_timeout),
            retime: false,
            slots_changed: false,
        }
    }

    // ---- sending -------------------------------------------------------------

    /// Registers `task` for `waiter`, who waits until `deadline`, and queues
    /// its frame. On refusal the waiter is handed back.
    pub(crate) fn begin(
        &mut self,
        task: &DetectionTask,
        waiter: W,
        deadline: Instant,
        now: Instant,
    ) -> Result<Ticket, (Refusal, W)> {
        if self.closed.is_some() || self.retired || self.write_failed.is_some() {
            return Err((Refusal::Closed, waiter));
        }
        if self.position(task.task_id.as_bytes()).is_some() {
            return Err((Refusal::Duplicate, waiter));
        }
        if self.pending.len() >= self.max_in_flight {
            return Err((Refusal::Full, waiter));
        }
        if deadline <= now {
            return Err((Refusal::Late, waiter));
        }
        if let Err(error) = self.outbound.push(&[task], now) {
            return Err((Refusal::TooLarge(error), waiter));
        }
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        self.pending.push(Outstanding {
            task_id: task.task_id.clone(),
            entry: Entry::Waiting {
                ticket,
                waiter,
                deadline,
            },
        });
        self.waiting += 1;
        if self
            .driver_wakes_at
            .is_none_or(|wakes_at| deadline < wakes_at)
        {
            self.retime = true;
        }
        Ok(ticket)
    }

    /// When the driver is to wake first: its timer's setting until it
    /// calls [`driver_timer`](Self::driver_timer).
    pub(crate) fn first_driver_wake(&self) -> Option<Instant> {
        self.driver_wakes_at
    }

    /// Where the driver's timer, set for `armed`, is to be set now: for the
    /// next deadline if that comes first, else where it is (one that fires
    /// early finds nothing due and is set again). A task's deadline is a
    /// read timeout after its call began, so it normally comes after those
    /// before it: the timer stays put while tasks come and go, idle spells
    /// included, and such a task need not wake the driver to move it (an
    /// earlier one, from a retried call or one that waited for a slot, and
    /// the first task after the timer fired with nothing in flight, ask for
    /// a retime). Recorded as the driver's wake-up; a retime asked for
    /// before this is answered by it.
    pub(crate) fn driver_timer(&mut self, armed: Option<Instant>) -> Option<Instant> {
        let wakes_at = match self.poll_timeout() {
            Some(deadline) if armed.is_none_or(|armed| deadline < armed) => Some(deadline),
            _ => armed,
        };
        self.driver_wakes_at = wakes_at;
        self.retime = false;
        wakes_at
    }

    /// Whether a task registered since the driver last looked has a deadline
    /// before the driver would wake: the driver must then be woken to look
    /// again. (Tasks registered later than others have later deadlines, so
    /// while tasks come and go this stays false.)
    pub(crate) fn take_retime(&mut self) -> bool {
        std::mem::take(&mut self.retime)
    }

    /// Whether a slot freed, or the connection was retired, since the last
    /// call, with no outcome delivered for it (the late result of a task
    /// given up on): callers waiting for a slot must look again.
    pub(crate) fn take_slots_changed(&mut self) -> bool {
        std::mem::take(&mut self.slots_changed)
    }

    /// Where the task `task_id` is in the list, if outstanding.
    fn position(&self, task_id: &[u8]) -> Option<usize> {
        self.pending
            .iter()
            .position(|outstanding| outstanding.task_id.as_bytes() == task_id)
    }

    /// The caller of `ticket` stopped waiting. Its entry stays (abandoned)
    /// until the late result arrives or the connection ends.
    pub(crate) fn abandon(&mut self, ticket: Ticket) {
        let found = self.pending.iter_mut().find(|outstanding| {
            matches!(outstanding.entry, Entry::Waiting { ticket: registered, .. } if registered == ticket)
        });
        if let Some(outstanding) = found
            && let Entry::Waiting { deadline, .. } = outstanding.entry
        {
            outstanding.entry = Entry::Abandoned { deadline };
            self.waiting -= 1;
            self.close_if_retired_and_unwatched();
        }
    }

    /// Bytes to write: every task frame queued, back to back (nothing once a
    /// write has failed).
    pub(crate) fn pending_output(&self) -> &[u8] {
        if self.write_failed.is_some() {
            return &[];
        }
        self.outbound.pending()
    }

    /// The first `count` bytes of [`pending_output`](Self::pending_output)
    /// were written.
    pub(crate) fn on_written(&mut self, count: usize, now: Instant) {
        self.outbound.on_written(count, now);
    }

    // ---- receiving -----------------------------------------------------------

    /// The buffer to read into (see [`Inbound::read_buffer`]).
    pub(crate) fn read_buffer(&mut self) -> &mut BytesMut {
        self.inbound.read_buffer()
    }

    /// Whether the driver should read: until the connection ends.
    pub(crate) fn wants_read(&self) -> bool {
        self.closed.is_none()
    }

    /// `count` bytes were read into [`read_buffer`](Self::read_buffer).
    pub(crate) fn on_read(&mut self, count: usize, now: Instant) {
        self.inbound.on_read(count, now);
        while self.closed.is_none() {
            match self.inbound.next_frame(now) {
                Ok(Some((id, body))) => self.settle(id.task_id, body, now),
                Ok(None) => break,
                Err(error) => self.close(error.to_string()),
            }
        }
    }

    /// The server closed the connection.
    pub(crate) fn on_eof(&mut self, now: Instant) {
        let closed = || "the server closed the connection".to_owned();
        let reason = match self.inbound.eof_frame(now) {
            Ok(Some((id, body))) => {
                self.settle(id.task_id, body, now);
                self.write_failed.take().unwrap_or_else(closed)
            }
            Ok(None) => self.write_failed.take().unwrap_or_else(closed),
            Err(error) => error.to_string(),
        };
        self.close(reason);
    }

    /// Reading failed.
    pub(crate) fn on_io_error(&mut self, error: &io::Error) {
        let reason = self
            .write_failed
            .take()
            .unwrap_or_else(|| error.to_string());
        self.close(reason);
    }

    /// Writing failed: the server has gone. Nothing more is written; what it
    /// sent before it went is still read, to the end of the stream, before
    /// the connection closes (a notice saying why it went may be there).
    pub(crate) fn on_write_error(&mut self, error: &io::Error) {
        if self.closed.is_none() && self.write_failed.is_none() {
            self.write_failed = Some(error.to_string());
            self.dropped_unwritten = self.outbound.untouched_frames();
            self.outbound.discard();
        }
    }

    fn settle(&mut self, task_id: Bytes, body: Bytes, now: Instant) {
        if task_id.is_empty() {
            return self.on_notice(&body);
        }
        // Results mostly come back in the order their tasks went out: the
        // oldest is found first. (Removing keeps that order.)
        match self.position(&task_id).map(|at| self.pending.remove(at)) {
            Some(Outstanding {
                task_id,
                entry: Entry::Waiting { waiter, .. },
            }) => {
                self.waiting -= 1;
                self.deliveries.push(Delivery {
                    waiter,
                    task_id,
                    outcome: Outcome::Answered(body),
                });
            }
            Some(Outstanding {
                entry: Entry::Abandoned { .. },
                ..
            }) => {
                tracing::debug!(task_id = ?String::from_utf8_lossy(&task_id), "discarded the result of a task given up on");
                self.slots_changed = true;
            }
            None => {
                return self.close(format!(
                    "the server sent a result for task {:?}, which this connection is not waiting \
                     for (never sent, or answered already); the server is broken or not the \
                     collector, so no result on this connection can be trusted",
                    String::from_utf8_lossy(&task_id)
                ));
            }
        }
        if self.pending.is_empty() {
            self.idle_since = now;
        }
        self.close_if_retired_and_unwatched();
    }

    /// The server's notice that it refuses the connection: every waiting
    /// caller hears why, and the connection closes.
    fn on_notice(&mut self, body: &[u8]) {
        let notice: Result<crate::proto::DetectionResult, _> =
            crate::frame::codec::decode_message(body);
        let message = match notice {
            Ok(notice) => notice
                .error_message
                .unwrap_or_else(|| "the server gave no reason".to_owned()),
            Err(error) => format!("the server's notice does not decode ({error})"),
        };
        self.refused = Some(message.clone());
        for Outstanding { task_id, entry } in self.pending.drain(..) {
            if let Entry::Waiting { waiter, .. } = entry {
                self.deliveries.push(Delivery {
                    waiter,
                    task_id,
                    outcome: Outcome::Refused(message.clone()),
                });
            }
        }
        self.waiting = 0;
        self.closed = Some(format!("the server refused the connection: {message}"));
    }

    /// The server's notice, if it refused this connection.
    pub(crate) fn refusal(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// Outcomes ready for their callers.
    #[cfg(any(test, fuzzing))]
    pub(crate) fn take_deliveries(&mut self) -> Vec<Delivery<W>> {
        std::mem::take(&mut self.deliveries)
    }

    /// Outcomes ready for their callers, handed out one by one; the list
    /// keeps its room for the next ones.
    pub(crate) fn drain_deliveries(&mut self) -> std::vec::Drain<'_, Delivery<W>> {
        self.deliveries.drain(..)
    }

    // ---- time and the end ----------------------------------------------------

    /// When the driver must call [`handle_timeout`](Self::handle_timeout):
    /// a frame's deadline, or the earliest waiting caller's.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        if self.closed.is_some() {
            return None;
        }
        earliest([
            self.outbound.deadline(),
            self.inbound.deadline(),
            self.earliest_waiter(),
        ])
    }

    /// The earliest deadline of a caller still waiting.
    fn earliest_waiter(&self) -> Option<Instant> {
        self.pending
            .iter()
            .filter_map(|outstanding| match outstanding.entry {
                Entry::Waiting { deadline, .. } => Some(deadline),
                Entry::Abandoned { .. } => None,
            })
            .min()
    }

    /// Tells each caller whose deadline has come that it timed out (its
    /// task stays, abandoned); ends the connection if a frame could not be
    /// written, or a result frame did not arrive whole, in time.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        if self
            .earliest_waiter()
            .is_some_and(|deadline| deadline <= now)
        {
            self.time_out_callers(now);
        }
        if self
            .outbound
            .deadline()
            .is_some_and(|deadline| deadline <= now)
        {
            self.close(self.outbound.timed_out().to_string());
        } else if self
            .inbound
            .deadline()
            .is_some_and(|deadline| deadline <= now)
        {
            self.close(self.inbound.timed_out().to_string());
        }
    }

    fn time_out_callers(&mut self, now: Instant) {
        for outstanding in &mut self.pending {
            if let Entry::Waiting { deadline, .. } = outstanding.entry
                && deadline <= now
                && let Entry::Waiting { waiter, .. } =
                    std::mem::replace(&mut outstanding.entry, Entry::Abandoned { deadline })
            {
                self.waiting -= 1;
                self.deliveries.push(Delivery {
                    waiter,
                    // The entry keeps the id, to know the late result.
                    task_id: outstanding.task_id.clone(),
                    outcome: Outcome::TimedOut,
                });
            }
        }
        self.close_if_retired_and_unwatched();
    }

    /// Whether a new task may go on this connection at `now`: it is open,
    /// not retired, not holding an abandoned task past its deadline, and
    /// not idle for `idle_limit` or more.
    pub(crate) fn usable(&self, now: Instant, idle_limit: Duration) -> bool {
        let stuck = self.pending.iter().any(
            |outstanding| matches!(outstanding.entry, Entry::Abandoned { deadline } if deadline <= now),
        );
        let busy = !self.pending.is_empty();
        self.closed.is_none()
            && self.write_failed.is_none()
            && !self.retired
            && !stuck
            && (busy || now < self.idle_since + idle_limit)
    }

    /// Takes no new tasks from now on, and closes once no caller waits.
    pub(crate) fn retire(&mut self) {
        self.retired = true;
        self.slots_changed = true;
        self.close_if_retired_and_unwatched();
    }

    fn close_if_retired_and_unwatched(&mut self) {
        if self.retired && self.waiting == 0 && self.closed.is_none() {
            self.close("replaced by a new connection".to_owned());
        }
    }

    /// Ends the connection: every waiting caller gets `reason`, as a task
    /// lost, or as one never sent if not a byte of it was written.
    pub(crate) fn close(&mut self, reason: String) {
        if self.closed.is_some() {
            return;
        }
        // Frames go out in the order their tasks were registered, and a task
        // leaves the list only once answered: the tasks whose frames never
        // left are the newest.
        let unwritten = self.outbound.untouched_frames() + self.dropped_unwritten;
        let first_unwritten = self.pending.len().saturating_sub(unwritten);
        for (at, Outstanding { task_id, entry }) in self.pending.drain(..).enumerate() {
            if let Entry::Waiting { waiter, .. } = entry {
                let outcome = if at >= first_unwritten {
                    Outcome::Unsent(reason.clone())
                } else {
                    Outcome::Lost(reason.clone())
                };
                self.deliveries.push(Delivery {
                    waiter,
                    task_id,
                    outcome,
                });
            }
        }
        self.waiting = 0;
        self.closed = Some(reason);
    }

    /// Why the connection ended, if it has.
    pub(crate) fn closed_reason(&self) -> Option<&str> {
        self.closed.as_deref()
    }

    /// Tasks outstanding (waited for or abandoned).
    pub(crate) fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::frame::encode_message;
    use crate::proto::DetectionResult;

    const READ: Duration = Duration::from_secs(30);
    const WRITE: Duration = Duration::from_secs(10);

    type Connection = ClientConnection<&'static str>;

    fn connection(max_in_flight: usize) -> (Connection, Instant) {
        let t0 = Instant::now();
        let c = ClientConnection::new(FrameSettings::DEFAULT, READ, WRITE, max_in_flight, t0);
        (c, t0)
    }

    fn task(id: &str) -> DetectionTask {
        DetectionTask {
            task_id: id.to_owned(),
            ..Default::default()
        }
    }

    fn result_frame(id: &str, marker: &str) -> Vec<u8> {
        let result = DetectionResult {
            task_id: id.to_owned(),
            success: true,
            error_message: Some(marker.to_owned()),
            ..Default::default()
        };
        let mut wire = BytesMut::new();
        encode_message(&result, FrameSettings::DEFAULT, &mut wire).unwrap();
        wire.to_vec()
    }

    /// Everything queued goes out, as a driver writes before any answer
    /// can come.
    fn sent(c: &mut Connection, now: Instant) {
        let count = c.pending_output().len();
        c.on_written(count, now);
    }

    fn receive(c: &mut Connection, bytes: &[u8], now: Instant) {
        c.read_buffer().extend_from_slice(bytes);
        c.on_read(bytes.len(), now);
    }

    /// (waiter, the marker of the result or "lost: reason").
    fn delivered(c: &mut Connection) -> Vec<(&'static str, String)> {
        c.take_deliveries()
            .into_iter()
            .map(|d| {
                let what = match d.outcome {
                    Outcome::Answered(body) => {
                        let result = DetectionResult::decode(body).unwrap();
                        format!(
                            "{}: {}",
                            result.task_id,
                            result.error_message.unwrap_or_default()
                        )
                    }
                    Outcome::Lost(reason) => format!("lost: {reason}"),
                    Outcome::Unsent(reason) => format!("unsent: {reason}"),
                    Outcome::Refused(reason) => format!("refused: {reason}"),
                    Outcome::TimedOut => format!("timed out: {}", d.task_id),
                };
                (d.waiter, what)
            })
            .collect()
    }

    #[test]
    fn each_result_goes_to_the_caller_waiting_for_its_id() {
        let (mut c, t0) = connection(32);
        c.begin(&task("a"), "caller a", t0 + READ, t0).unwrap();
        c.begin(&task("b"), "caller b", t0 + READ, t0).unwrap();
        assert!(!c.pending_output().is_empty(), "both frames queued");
        receive(
            &mut c,
            &[result_frame("b", "for b"), result_frame("a", "for a")].concat(),
            t0,
        );
        assert_eq!(
            delivered(&mut c),
            [
                ("caller b", "b: for b".to_owned()),
                ("caller a", "a: for a".to_owned())
            ]
        );
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn tasks_not_a_byte_of_which_was_written_are_unsent_and_one_begun_is_lost() {
        let (mut c, t0) = connection(32);
        for id in ["a", "b", "c"] {
            c.begin(&task(id), id, t0 + READ, t0).unwrap();
        }
        // Five bytes of a's frame go out, then the server is gone.
        c.on_written(5, t0);
        c.on_write_error(&io::Error::from(io::ErrorKind::BrokenPipe));
        c.on_eof(t0);
        let told = delivered(&mut c);
        assert_eq!(
            told.iter()
                .map(|(who, what)| (*who, what.split(':').next().unwrap()))
                .collect::<Vec<_>>(),
            [("a", "lost"), ("b", "unsent"), ("c", "unsent")],
            "{told:?}"
        );
    }

    #[test]
    fn tasks_still_queued_when_the_server_closes_are_unsent() {
        let (mut c, t0) = connection(32);
        c.begin(&task("a"), "a", t0 + READ, t0).unwrap();
        let first = c.pending_output().len();
        c.begin(&task("b"), "b", t0 + READ, t0).unwrap();
        c.on_written(first, t0);
        c.on_eof(t0);
        let told = delivered(&mut c);
        assert!(told[0].1.starts_with("lost: "), "{told:?}");
        assert!(told[1].1.starts_with("unsent: "), "{told:?}");
    }

    #[test]
    fn a_result_whose_id_is_not_utf8_ends_the_connection_and_its_callers_hear_why() {
        let (mut c, t0) = connection(32);
        c.begin(&task("a"), "caller a", t0 + READ, t0).unwrap();
        sent(&mut c, t0);
        // Field 1 (task_id), two bytes that are not UTF-8.
        let body = [0x0a, 2, 0xff, 0xfe];
        let mut wire = BytesMut::new();
        crate::frame::encode_frame(&body, FrameSettings::DEFAULT, &mut wire).unwrap();
        receive(&mut c, &wire, t0);
        let told = delivered(&mut c);
        assert_eq!(told.len(), 1, "{told:?}");
        assert!(
            told[0]
                .1
                .starts_with("lost: the server sent a result for task \"\u{fffd}\u{fffd}\""),
            "{told:?}"
        );
        assert!(c.closed_reason().is_some());
    }

    #[test]
    fn an_id_outstanding_is_refused_and_a_late_result_never_answers_its_retry() {
        let (mut c, t0) = connection(32);
        let first = c.begin(&task("reused"), "first", t0 + READ, t0).unwrap();
        assert!(matches!(
            c.begin(&task("reused"), "twin", t0 + READ, t0),
            Err((Refusal::Duplicate, "twin"))
        ));
        c.abandon(first);
        assert!(
            matches!(
                c.begin(&task("reused"), "retry", t0 + READ, t0),
                Err((Refusal::Duplicate, _))
            ),
            "still reserved while the late result may come"
        );
        receive(&mut c, &result_frame("reused", "late"), t0);
        assert!(delivered(&mut c).is_empty(), "the late result is discarded");
        c.begin(&task("reused"), "retry", t0 + READ, t0).unwrap();
        receive(&mut c, &result_frame("reused", "retry's own"), t0);
        assert_eq!(delivered(&mut c)[0].1, "reused: retry's own");
    }

    #[test]
    fn abandoning_with_a_stale_ticket_leaves_a_newer_registration_alone() {
        let (mut c, t0) = connection(32);
        let old = c.begin(&task("t"), "old", t0 + READ, t0).unwrap();
        receive(&mut c, &result_frame("t", "answer"), t0);
        delivered(&mut c);
        c.begin(&task("t"), "new", t0 + READ, t0).unwrap();
        c.abandon(old);
        receive(&mut c, &result_frame("t", "for new"), t0);
        assert_eq!(delivered(&mut c)[0].0, "new");
    }

    #[test]
    fn no_more_than_the_in_flight_limit_is_outstanding_abandoned_tasks_included() {
        let (mut c, t0) = connection(2);
        let a = c.begin(&task("a"), "a", t0 + READ, t0).unwrap();
        c.begin(&task("b"), "b", t0 + READ, t0).unwrap();
        assert!(matches!(
            c.begin(&task("c"), "c", t0 + READ, t0),
            Err((Refusal::Full, "c"))
        ));
        c.abandon(a);
        assert!(matches!(
            c.begin(&task("c"), "c", t0 + READ, t0),
            Err((Refusal::Full, _))
        ));
        receive(&mut c, &result_frame("a", "late"), t0);
        c.begin(&task("c"), "c", t0 + READ, t0).unwrap();
    }

    #[test]
    fn a_task_whose_deadline_has_passed_is_not_sent() {
        let (mut c, t0) = connection(1);
        let late = t0 + READ;
        assert!(matches!(
            c.begin(&task("late"), "late", late, late),
            Err((Refusal::Late, "late"))
        ));
        assert!(c.pending_output().is_empty(), "nothing queued");
        c.begin(&task("late"), "late", late, late - Duration::from_nanos(1))
            .unwrap();
    }

    #[test]
    fn a_connection_holding_an_abandoned_task_past_its_deadline_is_retired() {
        let (mut c, t0) = connection(32);
        let deadline = t0 + READ;
        let stuck = c.begin(&task("stuck"), "stuck", deadline, t0).unwrap();
        c.begin(&task("other"), "other", deadline + READ, t0)
            .unwrap();
        c.abandon(stuck);
        let idle = READ / 2;
        assert!(
            c.usable(deadline - Duration::from_nanos(1), idle),
            "given up on early: the server may still answer in time"
        );
        assert!(!c.usable(deadline, idle), "past its deadline: retire");

        c.retire();
        assert!(matches!(
            c.begin(&task("new"), "new", deadline + READ, deadline),
            Err((Refusal::Closed, _))
        ));
        assert!(
            c.closed_reason().is_none(),
            "the other caller still waits on it"
        );
        receive(&mut c, &result_frame("other", "done"), deadline);
        assert_eq!(delivered(&mut c)[0].0, "other");
        assert_eq!(
            c.closed_reason(),
            Some("replaced by a new connection"),
            "closed once no one waits"
        );
    }

    #[test]
    fn an_idle_connection_is_replaced_before_the_server_would_close_it() {
        let (mut c, t0) = connection(32);
        let idle = READ / 2;
        assert!(c.usable(t0 + idle - Duration::from_nanos(1), idle));
        assert!(!c.usable(t0 + idle, idle));
        let t1 = t0 + Duration::from_secs(100);
        c.begin(&task("a"), "a", t1 + READ, t1).unwrap();
        assert!(c.usable(t1 + READ - Duration::from_secs(1), idle), "busy");
        receive(&mut c, &result_frame("a", ""), t1 + Duration::from_secs(1));
        assert!(c.usable(
            t1 + Duration::from_secs(1) + idle - Duration::from_nanos(1),
            idle
        ));
    }

    #[test]
    fn a_result_nobody_waits_for_ends_the_connection_for_everyone_waiting() {
        for (unexpected, what) in [
            (result_frame("never-sent", ""), "never sent"),
            (
                [result_frame("a", "first"), result_frame("a", "again")].concat(),
                "twice",
            ),
        ] {
            let (mut c, t0) = connection(32);
            c.begin(&task("a"), "a", t0 + READ, t0).unwrap();
            c.begin(&task("b"), "b", t0 + READ, t0).unwrap();
            sent(&mut c, t0);
            receive(&mut c, &unexpected, t0);
            let outcomes = delivered(&mut c);
            let lost: Vec<&str> = outcomes
                .iter()
                .filter(|(_, what)| what.starts_with("lost: "))
                .map(|(waiter, _)| *waiter)
                .collect();
            assert!(lost.contains(&"b"), "{what}: {outcomes:?}");
            for (_, outcome) in &outcomes {
                assert!(
                    outcome == "a: first" || outcome.contains("is not waiting for"),
                    "{what}: {outcome}"
                );
            }
            assert!(c.closed_reason().is_some());
        }
    }

    #[test]
    fn a_frame_not_written_within_the_write_timeout_ends_the_connection() {
        let (mut c, t0) = connection(32);
        c.begin(&task("a"), "a", t0 + READ, t0).unwrap();
        assert_eq!(c.poll_timeout(), Some(t0 + WRITE));
        c.handle_timeout(t0 + WRITE - Duration::from_nanos(1));
        assert!(c.closed_reason().is_none());
        c.handle_timeout(t0 + WRITE);
        let lost = delivered(&mut c);
        assert!(lost[0].1.contains("write_timeout_ms"), "{lost:?}");
    }

    #[test]
    fn a_result_frame_must_arrive_whole_within_the_read_timeout() {
        let (mut c, t0) = connection(32);
        c.begin(&task("a"), "a", t0 + READ * 2, t0).unwrap();
        sent(&mut c, t0);
        assert_eq!(
            c.poll_timeout(),
            Some(t0 + READ * 2),
            "the caller's deadline"
        );
        let frame = result_frame("a", "x");
        let t1 = t0 + Duration::from_secs(1);
        receive(&mut c, &frame[..4], t1);
        assert_eq!(c.poll_timeout(), Some(t1 + READ));
        c.handle_timeout(t1 + READ);
        assert!(
            delivered(&mut c)[0]
                .1
                .contains("not complete within 30000 ms")
        );
    }

    #[test]
    fn each_caller_is_told_it_timed_out_at_its_own_deadline_and_its_late_result_is_dropped() {
        let (mut c, t0) = connection(32);
        let (early, late) = (t0 + Duration::from_secs(5), t0 + Duration::from_secs(9));
        c.begin(&task("late"), "late caller", late, t0).unwrap();
        c.begin(&task("early"), "early caller", early, t0).unwrap();
        sent(&mut c, t0);
        assert_eq!(c.poll_timeout(), Some(early), "the earliest waiter's");
        c.handle_timeout(early - Duration::from_nanos(1));
        assert!(delivered(&mut c).is_empty(), "not before");
        c.handle_timeout(early);
        assert_eq!(
            delivered(&mut c),
            [("early caller", "timed out: early".to_owned())]
        );
        assert_eq!(c.poll_timeout(), Some(late), "then the next one's");
        assert_eq!(c.in_flight(), 2, "the timed-out task is still out there");
        receive(&mut c, &result_frame("early", "too late"), early);
        assert!(delivered(&mut c).is_empty(), "its late result is dropped");
        receive(&mut c, &result_frame("late", "in time"), early);
        assert_eq!(
            delivered(&mut c),
            [("late caller", "late: in time".to_owned())]
        );
        assert!(c.closed_reason().is_none());
    }

    #[test]
    fn the_driver_is_asked_to_look_again_only_for_a_deadline_before_its_own() {
        let (mut c, t0) = connection(32);
        assert_eq!(c.first_driver_wake(), Some(t0 + READ));
        c.begin(&task("a"), "a", t0 + READ, t0).unwrap();
        assert!(
            !c.take_retime(),
            "the first task's deadline is no earlier than the driver's first wake-up"
        );
        c.begin(&task("b"), "b", t0 + READ / 2, t0).unwrap();
        assert!(c.take_retime(), "an earlier deadline");
        assert!(!c.take_retime(), "asked once");
        sent(&mut c, t0);
        assert_eq!(c.driver_timer(Some(t0 + READ)), Some(t0 + READ / 2));
        c.begin(&task("c"), "c", t0 + READ * 2, t0).unwrap();
        assert!(
            !c.take_retime(),
            "a later deadline: the timer set wakes it first"
        );
    }

    #[test]
    fn an_idle_driver_keeps_its_timer_so_the_next_task_needs_no_wake_up() {
        let (mut c, t0) = connection(32);
        let armed = c.driver_timer(c.first_driver_wake());
        c.begin(&task("a"), "a", t0 + READ, t0).unwrap();
        sent(&mut c, t0);
        assert_eq!(c.driver_timer(armed), Some(t0 + READ));
        let t1 = t0 + READ / 4;
        receive(&mut c, &result_frame("a", "done"), t1);
        assert_eq!(delivered(&mut c).len(), 1);
        assert_eq!(c.poll_timeout(), None, "nothing is due while idle");
        let armed = c.driver_timer(armed);
        assert_eq!(armed, Some(t0 + READ), "the timer stays set while idle");
        // The caller of the next task writes it and waits: the driver need
        // not be woken to move its timer (it fires early, finds nothing due,
        // and is set for this deadline then).
        c.begin(&task("b"), "b", t1 + READ, t1).unwrap();
        assert!(!c.take_retime());
        sent(&mut c, t1);
        c.handle_timeout(t0 + READ);
        assert!(
            delivered(&mut c).is_empty(),
            "the early wake-up finds nothing due"
        );
        assert_eq!(c.driver_timer(None), Some(t1 + READ));
    }

    #[test]
    fn a_slot_freed_without_an_outcome_or_a_retirement_is_told_to_callers_waiting_for_one() {
        let (mut c, t0) = connection(1);
        let given_up = c.begin(&task("a"), "a", t0 + READ, t0).unwrap();
        c.abandon(given_up);
        assert!(!c.take_slots_changed(), "still in flight");
        receive(&mut c, &result_frame("a", "late"), t0);
        assert!(delivered(&mut c).is_empty(), "no one to tell of the answer");
        assert!(c.take_slots_changed(), "but its slot is free");
        assert!(!c.take_slots_changed(), "told once");
        c.retire();
        assert!(
            c.take_slots_changed(),
            "a retired connection sends waiting callers elsewhere"
        );
    }

    #[test]
    fn a_closed_connection_refuses_new_tasks_and_fails_waiting_ones_once() {
        let (mut c, t0) = connection(32);
        c.begin(&task("a"), "a", t0 + READ, t0).unwrap();
        sent(&mut c, t0);
        c.on_eof(t0);
        assert_eq!(
            delivered(&mut c),
            [("a", "lost: the server closed the connection".to_owned())]
        );
        assert!(matches!(
            c.begin(&task("b"), "b", t0 + READ, t0),
            Err((Refusal::Closed, _))
        ));
        c.close("again".into());
        assert!(delivered(&mut c).is_empty());
    }

    #[test]
    fn a_notice_refuses_every_waiting_caller_with_the_servers_words() {
        let (mut c, t0) = connection(32);
        let deadline = t0 + READ;
        c.begin(&task("a"), "a", deadline, t0).unwrap();
        c.begin(&task("b"), "b", deadline, t0).unwrap();
        receive(&mut c, &result_frame("", "no slot freed"), t0);
        let mut outcomes = delivered(&mut c);
        outcomes.sort();
        assert_eq!(
            outcomes,
            [
                ("a", "refused: no slot freed".to_owned()),
                ("b", "refused: no slot freed".to_owned())
            ]
        );
        assert_eq!(c.refusal(), Some("no slot freed"));
        assert!(
            c.closed_reason()
                .unwrap()
                .contains("refused the connection")
        );
        assert!(matches!(
            c.begin(&task("c"), "c", deadline, t0),
            Err((Refusal::Closed, _))
        ));
    }

    #[test]
    fn after_a_failed_write_what_the_server_sent_before_it_went_is_still_read() {
        // #18: a server that refuses a connection says why and closes; the
        // agent's write of its task may fail before it reads why.
        let (mut c, t0) = connection(32);
        c.begin(&task("a"), "a", t0 + READ, t0).unwrap();
        c.on_write_error(&io::ErrorKind::BrokenPipe.into());
        assert!(c.pending_output().is_empty(), "nothing more is written");
        assert!(c.wants_read(), "but what arrived is read");
        assert!(!c.usable(t0, READ), "and no new task goes on it");
        receive(&mut c, &result_frame("", "this agent runs as uid 7"), t0);
        assert_eq!(
            delivered(&mut c),
            [("a", "refused: this agent runs as uid 7".to_owned())]
        );

        // No notice: the write's error is the reason, once the end comes;
        // not a byte of the task left, so it was never sent.
        let (mut c, t0) = connection(32);
        c.begin(&task("a"), "a", t0 + READ, t0).unwrap();
        c.on_write_error(&io::ErrorKind::BrokenPipe.into());
        c.on_eof(t0);
        let [(_, outcome)] = &delivered(&mut c)[..] else {
            panic!()
        };
        assert!(outcome.starts_with("unsent: broken pipe"), "{outcome}");
    }
}
