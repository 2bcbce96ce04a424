//! One served connection, as a state machine: [`ServerConnection`].
//!
//! The rules it keeps, whichever driver feeds it:
//!
//! * **Frames and idleness.** Once a frame's first byte has arrived, the
//!   whole frame must arrive within `read_timeout`, however its bytes are
//!   spaced; time the connection is not read (below) does not count, and
//!   time already taken is not forgiven. Between frames, with nothing in
//!   flight, the connection may sit idle for `read_timeout`; a client
//!   waiting on a slow handler is not idle.
//! * **In-flight limit and backpressure.** A task is in flight from the
//!   moment its frame is decoded until its result is written. With
//!   `max_in_flight` tasks in flight the connection is not read (frames
//!   already buffered wait too), so a client cannot queue unbounded work or
//!   make the server hold unbounded results for a peer that does not read.
//! * **Memory.** Before a task's body is read, the connection reserves from
//!   the server-wide budget ([`super::budget`]) room for the task's frame
//!   and for the largest result frame; what the result does not use goes
//!   back once it is encoded, the rest as it is written. A connection whose
//!   reservation must wait stops reading until it is granted. Beyond what
//!   is reserved it reads at most [`READ_SLACK`] bytes (enough to learn the
//!   next frames' sizes). The driver carries requests and releases to the
//!   budget ([`budget_request`](ServerConnection::budget_request),
//!   [`take_released`](ServerConnection::take_released)) and grants back
//!   ([`on_granted`](ServerConnection::on_granted)).
//! * **Results as they finish.** Each result is encoded into the output as
//!   its handler finishes, in completion order, every ready frame written
//!   together. A result too large for a frame is replaced by an error result
//!   naming the size and the limit; a handler that panicked, or that did not
//!   finish within `task_timeout`, is answered with an error result too.
//! * **Writes.** A result frame must be written within `write_timeout` of
//!   reaching the head of the output.
//! * **Bad input.** A frame that fails its checksum, announces more than
//!   `max_frame_bytes`, is not a `DetectionTask`, or is cut short, closes
//!   this connection, and only this one. When the connection's first frame
//!   fails its checksum but matches the other CRC-32 variant, the peer is
//!   told which variant each side uses (a notice framed in its own
//!   variant) before the close.
//! * **Draining.** After [`stop_reading`](ServerConnection::stop_reading)
//!   (graceful shutdown) or the peer closing its side, nothing more is read;
//!   tasks in flight are answered, then the connection closes.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::encodings::SharedEncodings;
use super::inbound::Inbound;
use super::outbound::Outbound;
use super::{earliest, millis};
use crate::error::IpcError;
use crate::frame::{FrameSettings, HEADER_LEN};
use crate::proto::{DetectionResult, DetectionTask};
use crate::telemetry::{Counters, add, bump};

/// Bytes a connection reads beyond what it has reserved from the budget:
/// the start of the frames after the one it is reading, so that it learns
/// their sizes. So each connection holds at most this much outside the
/// budget.
pub(crate) const READ_SLACK: usize = 8 * 1024;

/// What a handler answers with.
#[derive(Debug, Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "a reply is moved once, into its encoding; boxing the result would cost an allocation per task"
)]
pub enum Reply {
    /// A result of this task's own.
    Owned(DetectionResult),
    /// A result shared with other replies (a cached process table, say),
    /// written without being copied: the frame carries this task's id,
    /// then the shared result's encoding, which protobuf merges into one
    /// message. Leave its `task_id` empty.
    Shared(Arc<DetectionResult>),
}

impl From<DetectionResult> for Reply {
    fn from(result: DetectionResult) -> Reply {
        Reply::Owned(result)
    }
}

impl From<Arc<DetectionResult>> for Reply {
    fn from(result: Arc<DetectionResult>) -> Reply {
        Reply::Shared(result)
    }
}

/// The limits one connection is served under.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    pub(crate) settings: FrameSettings,
    /// Per frame, and the idle limit between frames.
    pub(crate) read_timeout: Duration,
    /// Per result frame, from when it reaches the head of the output.
    pub(crate) write_timeout: Duration,
    /// Per task, from its decoding to its handler finishing.
    pub(crate) task_timeout: Duration,
    /// Tasks in flight (running, or answered and not yet written).
    pub(crate) max_in_flight: usize,
}

impl ConnectionLimits {
    /// What a task reserves for its result: the largest result frame.
    pub(crate) fn result_allowance(&self) -> usize {
        HEADER_LEN + self.settings.max_frame_bytes as usize
    }

    /// The most one task ever reserves: a task frame and a result frame,
    /// both of the largest size. A budget smaller than this could never
    /// serve such a task.
    pub(crate) fn largest_reservation(&self) -> usize {
        2 * self.result_allowance()
    }
}

/// Identifies one task for as long as it is in flight on its connection.
/// (Task ids are the client's and need not be unique on the server.)
pub(crate) type TaskTicket = u64;

/// What the driver must do.
#[derive(Debug, PartialEq)]
pub(crate) enum ServerEvent {
    /// Run the handler on `task`, then report with
    /// [`task_finished`](ServerConnection::task_finished). (The task stays
    /// where it was decoded, on the heap, until its handler takes it.)
    StartTask {
        ticket: TaskTicket,
        task: Box<DetectionTask>,
    },
    /// The task ran out of time and has been answered already: stop its
    /// work (drop its future). A later `task_finished` for it is ignored.
    CancelTask { ticket: TaskTicket },
}

/// Whether more tasks may be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    Open,
    /// Graceful shutdown: the server stopped reading.
    Stopped,
    /// The peer closed its side; frames it sent before may still wait in
    /// the buffer for room.
    PeerClosing,
    /// The peer closed its side, and every frame it sent has been taken.
    PeerClosed,
}

#[derive(Debug)]
struct Running {
    task_id: String,
    deadline: Instant,
    /// The task's frame, held until its handler is done with it.
    task_bytes: usize,
    /// Held for the result until it is encoded.
    result_allowance: usize,
}

/// This connection's share of the budget.
#[derive(Debug, Default)]
struct Account {
    /// Granted and not yet set aside for a task.
    credit: usize,
    /// Everything granted and not released, `credit` included.
    held: usize,
    /// Released and not yet handed back to the budget.
    released: usize,
    /// Set aside for the frame at the front of the read buffer: its size,
    /// and its whole reservation (the frame and its result).
    next_frame: Option<(usize, usize)>,
    /// Bytes this connection needs granted before it reads on.
    request: Request,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Request {
    #[default]
    None,
    /// Not yet handed to the driver.
    Due(usize),
    /// Handed to the driver; waiting to be granted.
    Sent(usize),
}

impl Account {
    fn release(&mut self, bytes: usize) {
        debug_assert!(bytes <= self.held, "released more than was held");
        let bytes = bytes.min(self.held);
        self.held -= bytes;
        self.released += bytes;
    }

    /// Sets aside `need` bytes for the next frame, or asks for what is
    /// missing; true if set aside.
    fn set_aside(&mut self, frame: usize, need: usize) -> bool {
        if self.next_frame.is_some() {
            return true;
        }
        if self.credit >= need {
            self.credit -= need;
            self.next_frame = Some((frame, need));
            return true;
        }
        if self.request == Request::None {
            self.request = Request::Due(need - self.credit);
        }
        false
    }

    /// Gives back what is set aside but not used by a task.
    fn release_unused(&mut self) {
        let unused = self.credit + self.next_frame.take().map_or(0, |(_, need)| need);
        self.credit = 0;
        self.release(unused);
    }
}

/// The policy of one served connection. See the [module docs](self).
#[derive(Debug)]
pub(crate) struct ServerConnection {
    limits: ConnectionLimits,
    counters: Arc<Counters>,
    account: Account,
    inbound: Inbound<DetectionTask>,
    outbound: Outbound<DetectionResult>,
    /// Shared results' encodings, server-wide.
    encodings: Arc<SharedEncodings>,
    /// In the order they started, which is also the order of their
    /// deadlines (each is the start plus the same `task_timeout`): the
    /// earliest deadline is the first's. Few per connection (at most
    /// `max_in_flight`) and mostly finished in order, so found by a short
    /// search from the front rather than by hashing.
    running: VecDeque<(TaskTicket, Running)>,
    next_ticket: TaskTicket,
    events: VecDeque<ServerEvent>,
    reading: Reading,
    /// Reading was held back the last time we looked (the frame clock is
    /// paused).
    read_paused: bool,
    /// The last task received or result written: the idle clock.
    last_activity: Instant,
    /// Set once the connection is over; taken by `poll_close`.
    close: Option<Result<(), IpcError>>,
    closed: bool,
    /// Why the connection ends once its last frame (a notice to the peer)
    /// is written.
    failing: Option<IpcError>,
    /// It ended after telling the peer why: what was written must reach it.
    told_peer: bool,
}

impl ServerConnection {
    pub(crate) fn new(
        limits: ConnectionLimits,
        counters: Arc<Counters>,
        encodings: Arc<SharedEncodings>,
        now: Instant,
    ) -> Self {
        ServerConnection {
            inbound: Inbound::new(limits.settings, limits.read_timeout),
            outbound: Outbound::new(limits.settings, limits.write_timeout),
            limits,
            counters,
            account: Account::default(),
            encodings,
            running: VecDeque::new(),
            next_ticket: 0,
            events: VecDeque::new(),
            reading: Reading::Open,
            read_paused: false,
            last_activity: now,
            close: None,
            closed: false,
            failing: None,
            told_peer: false,
        }
    }

    // ---- reading -------------------------------------------------------------

    /// Whether the driver should read now.
    pub(crate) fn wants_read(&self) -> bool {
        !self.closed
            && self.reading == Reading::Open
            && self.in_flight() < self.limits.max_in_flight
            && self.account.request == Request::None
            && self.read_window() > 0
    }

    /// How many bytes the driver may read now: what is left of the frame
    /// reserved for, and [`READ_SLACK`] beyond it.
    pub(crate) fn read_window(&self) -> usize {
        let covered = self.account.next_frame.map_or(0, |(frame, _)| frame);
        (covered + READ_SLACK).saturating_sub(self.inbound.buffered())
    }

    /// Tasks running or answered but not yet written.
    pub(crate) fn in_flight(&self) -> usize {
        self.running.len() + self.outbound.queued_frames()
    }

    /// The buffer to read into (see [`Inbound::read_buffer`]); read at most
    /// [`read_window`](Self::read_window) bytes into it.
    pub(crate) fn read_buffer(&mut self) -> &mut BytesMut {
        self.inbound.read_buffer()
    }

    /// `count` bytes were read into [`read_buffer`](Self::read_buffer).
    pub(crate) fn on_read(&mut self, count: usize, now: Instant) {
        add(&self.counters.bytes_in, count as u64);
        self.inbound.on_read(count, now);
        self.decode_buffered(now);
        self.refresh(now);
    }

    /// The peer closed its side (a read returned 0 bytes). The frames it
    /// sent before are still taken, as room allows; one it left unfinished
    /// is a truncated frame.
    pub(crate) fn on_eof(&mut self, now: Instant) {
        if self.closed || self.reading != Reading::Open {
            return;
        }
        self.reading = Reading::PeerClosing;
        self.decode_buffered(now);
        self.refresh(now);
    }

    /// Whether the connection failed only after its notice to the peer was
    /// written: the driver must then let those bytes reach the peer rather
    /// than discard them as it does after a failure. (The blocking driver
    /// never discards.)
    #[cfg(any(async_backend, test))]
    pub(crate) fn told_peer(&self) -> bool {
        self.told_peer
    }

    /// Reading or writing failed: the connection is over.
    pub(crate) fn on_io_error(&mut self, error: io::Error) {
        self.fail(IpcError::Io(error));
    }

    /// Decodes buffered frames while there is room for their tasks; once
    /// the peer has closed its side and none is left, what remains must be
    /// nothing.
    fn decode_buffered(&mut self, now: Instant) {
        while !self.closed
            && matches!(self.reading, Reading::Open | Reading::PeerClosing)
            && self.in_flight() < self.limits.max_in_flight
        {
            let frame = match self.inbound.next_frame_size() {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    if self.reading == Reading::PeerClosing {
                        self.peer_done(now);
                    }
                    break;
                }
                Err(error) => {
                    self.fail(error);
                    break;
                }
            };
            let whole = self.inbound.buffered() >= frame;
            if self.reading == Reading::PeerClosing && !whole {
                // Cut short: no need to reserve for it first.
                self.peer_done(now);
                break;
            }
            let need = frame + self.limits.result_allowance();
            if !self.account.set_aside(frame, need) || !whole {
                break;
            }
            match self.inbound.next_message(now) {
                Ok(Some((task, bytes))) => self.start(task, bytes, now),
                Ok(None) => break,
                Err(error) => self.bad_frame(error, now),
            }
        }
    }

    /// The peer closed its side and no whole frame is left.
    fn peer_done(&mut self, now: Instant) {
        match self.inbound.on_eof(now) {
            Ok(Some((task, bytes))) => self.start(task, bytes, now),
            Ok(None) => self.reading = Reading::PeerClosed,
            Err(error) => self.bad_frame(error, now),
        }
    }

    /// A frame that cannot be trusted ends the connection. When it is the
    /// connection's first and its checksum is right under the other
    /// variant, the peers disagree on `crc32_variant`, which the agent could
    /// not tell from a closed connection: it is told, in a notice framed in
    /// its own variant, before the close. (The notice takes the place of
    /// the answer the frame had room reserved for.)
    fn bad_frame(&mut self, error: IpcError, now: Instant) {
        if let IpcError::ChecksumMismatch {
            variant: ours,
            peer_variant: Some(theirs),
            ..
        } = error
            && self.next_ticket == 0
            && let Some((_, reserved)) = self.account.next_frame
        {
            let notice = failed(
                "",
                format!(
                    "this collector uses crc32_variant = {ours} and this agent's frames are \
                     checksummed with {theirs}: set ipc.crc32_variant (DAEMONEYE_IPC_CRC32_VARIANT, \
                     --crc32) to the same on both sides"
                ),
                self.limits.settings.max_frame_bytes as usize,
            );
            let theirs = FrameSettings {
                crc32: theirs,
                ..self.limits.settings
            };
            if let Ok(written) = self.outbound.push_in(&notice, theirs, now)
                && written <= reserved
            {
                tracing::debug!(%error, "told the peer its checksum variant differs");
                self.account.next_frame = None;
                self.account.release(reserved - written);
                self.reading = Reading::Stopped;
                self.failing = Some(error);
                return self.refresh(now);
            }
        }
        self.fail(error);
    }

    fn start(&mut self, task: Box<DetectionTask>, bytes: usize, now: Instant) {
        bump(&self.counters.frames_in);
        tracing::debug!(task_id = ?task.task_id, task_type = task.task_type, "task received");
        let (frame, need) = self
            .account
            .next_frame
            .take()
            .expect("a frame is decoded only once reserved for");
        debug_assert_eq!(frame, bytes, "the frame reserved for is the one decoded");
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        // Never before the deadline of a task started earlier, so that the
        // list stays in deadline order whatever clock readings it is given.
        let deadline = (now + self.limits.task_timeout).max(
            self.running
                .back()
                .map_or(now, |(_, running)| running.deadline),
        );
        self.running.push_back((
            ticket,
            Running {
                task_id: task.task_id.clone(),
                deadline,
                task_bytes: frame,
                result_allowance: need - frame,
            },
        ));
        self.last_activity = now;
        self.events
            .push_back(ServerEvent::StartTask { ticket, task });
    }

    /// Graceful shutdown: read nothing more, answer what is in flight.
    pub(crate) fn stop_reading(&mut self, now: Instant) {
        if matches!(self.reading, Reading::Open | Reading::PeerClosing) {
            self.reading = Reading::Stopped;
        }
        self.refresh(now);
    }

    // ---- the budget ----------------------------------------------------------

    /// Bytes to reserve before reading on, once: the driver asks the budget
    /// and calls [`on_granted`](Self::on_granted) when it is granted (at
    /// once, or later).
    pub(crate) fn budget_request(&mut self) -> Option<usize> {
        match self.account.request {
            Request::Due(bytes) => {
                self.account.request = Request::Sent(bytes);
                Some(bytes)
            }
            Request::None | Request::Sent(_) => None,
        }
    }

    /// A request was handed to the driver and not granted yet.
    pub(crate) fn awaits_grant(&self) -> bool {
        self.awaited_grant().is_some()
    }

    /// The bytes of the request handed to the driver and not granted yet.
    pub(crate) fn awaited_grant(&self) -> Option<usize> {
        match self.account.request {
            Request::Sent(bytes) => Some(bytes),
            Request::None | Request::Due(_) => None,
        }
    }

    /// The budget granted `bytes`.
    pub(crate) fn on_granted(&mut self, bytes: usize, now: Instant) {
        self.account.held += bytes;
        self.account.credit += bytes;
        self.account.request = Request::None;
        self.decode_buffered(now);
        self.refresh(now);
    }

    /// Bytes to give back to the budget.
    pub(crate) fn take_released(&mut self) -> usize {
        std::mem::take(&mut self.account.released)
    }

    /// Gives up everything held (the connection is being dropped): what the
    /// driver must give back to the budget.
    pub(crate) fn release_all(&mut self) -> usize {
        let account = std::mem::take(&mut self.account);
        account.held + account.released
    }

    // ---- tasks ---------------------------------------------------------------

    /// The next thing the driver must do, if any.
    pub(crate) fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// Whether [`poll_event`](Self::poll_event) has something.
    pub(crate) fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// The handler of `ticket` finished: with its reply, or with the reason
    /// it has none (it panicked). Ignored for a task already answered (timed
    /// out) or a connection already closed.
    pub(crate) fn task_finished(
        &mut self,
        ticket: TaskTicket,
        outcome: Result<Reply, String>,
        now: Instant,
    ) {
        let Some(at) = self
            .running
            .iter()
            .position(|(started, _)| *started == ticket)
        else {
            return;
        };
        let (_, running) = self.running.remove(at).expect("found at that position");
        if self.closed {
            return;
        }
        self.account.release(running.task_bytes);
        let task_id = running.task_id;
        let reply = match outcome {
            Ok(reply) => reply,
            Err(failure) => {
                bump(&self.counters.handler_errors);
                tracing::error!(task_id = ?task_id, error = %failure, "handler failed");
                Reply::Owned(failed(
                    &task_id,
                    format!(
                        "the collector's handler failed on this task ({failure}); the collector is \
                         still running, other tasks are unaffected"
                    ),
                    self.limits.settings.max_frame_bytes as usize,
                ))
            }
        };
        self.answer(task_id, reply, running.result_allowance, now);
        self.refresh(now);
    }

    /// Queues the reply's frame, within `allowance` (set aside for it), and
    /// gives back what it did not use; a result too large for a frame is
    /// replaced by an error result naming its size and the limit.
    fn answer(&mut self, task_id: String, reply: Reply, allowance: usize, now: Instant) {
        // The id moves into whatever message carries it, and back out.
        let (queued, task_id) = match &reply {
            Reply::Owned(result) if result.task_id == task_id => {
                (self.outbound.push(&[result], now), task_id)
            }
            Reply::Owned(result) => {
                tracing::debug!(handler_said = ?result.task_id, task_id = ?task_id, "result task_id set to the task's");
                let result = DetectionResult {
                    task_id,
                    ..result.clone()
                };
                (self.outbound.push(&[&result], now), result.task_id)
            }
            Reply::Shared(result) if result.task_id.is_empty() => {
                // This reply's id, then the shared result, merged by the
                // reader; the shared part is encoded once per connection.
                let head = DetectionResult {
                    task_id,
                    ..Default::default()
                };
                let queued = match self.encodings.get(result, self.limits.settings) {
                    Some((tail, crc)) => self.outbound.push_with_tail(&head, &tail, crc, now),
                    None => self.outbound.push(&[&head, result], now),
                };
                (queued, head.task_id)
            }
            Reply::Shared(result) => {
                // Merging would let the shared id win: fall back to a copy.
                tracing::debug!(handler_said = ?result.task_id, task_id = ?task_id, "shared result carries a task_id; copied");
                let result = DetectionResult {
                    task_id,
                    ..DetectionResult::clone(result)
                };
                (self.outbound.push(&[&result], now), result.task_id)
            }
        };
        let queued = match queued {
            Err(IpcError::MessageTooLarge { length, limit }) => {
                bump(&self.counters.oversize_results);
                tracing::warn!(task_id = ?task_id, length, limit, "result exceeds max_frame_bytes; answering with an error");
                let refusal = failed(
                    &task_id,
                    format!(
                        "the result is {length} bytes, over max_frame_bytes = {limit}; narrow the \
                         task (for example a process_filter with pids or names) or raise \
                         ipc.max_frame_bytes on both sides"
                    ),
                    self.limits.settings.max_frame_bytes as usize,
                );
                // `failed` fits it in a frame whatever the id.
                self.outbound.push(&[&refusal], now)
            }
            other => other,
        };
        match queued {
            Ok(bytes) => {
                debug_assert!(
                    bytes <= allowance,
                    "a frame is never larger than the largest"
                );
                self.account.release(allowance - bytes.min(allowance));
            }
            Err(error) => {
                self.account.release(allowance);
                self.fail(error);
            }
        }
    }

    // ---- writing -------------------------------------------------------------

    /// Bytes to write: every result frame ready, back to back.
    pub(crate) fn pending_output(&self) -> &[u8] {
        self.outbound.pending()
    }

    /// The first `count` bytes of [`pending_output`](Self::pending_output)
    /// were written.
    pub(crate) fn on_written(&mut self, count: usize, now: Instant) {
        if self.closed {
            return;
        }
        add(&self.counters.bytes_out, count as u64);
        self.account.release(count);
        let frames = self.outbound.on_written(count, now);
        if frames > 0 {
            tracing::debug!(frames, "results written");
            add(&self.counters.frames_out, frames as u64);
            self.last_activity = now;
            self.decode_buffered(now);
        }
        self.refresh(now);
    }

    // ---- time ----------------------------------------------------------------

    /// When the driver must call [`handle_timeout`](Self::handle_timeout)
    /// next, if anything is timed.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        earliest([
            self.read_deadline(),
            self.outbound.deadline(),
            self.running.front().map(|(_, running)| running.deadline),
        ])
    }

    /// The frame deadline while a frame is arriving, the idle deadline while
    /// nothing is in flight; nothing while reading is held back.
    fn read_deadline(&self) -> Option<Instant> {
        if !self.wants_read() {
            return None;
        }
        if self.inbound.is_mid_frame() {
            return self.inbound.deadline();
        }
        (self.in_flight() == 0).then(|| self.last_activity + self.limits.read_timeout)
    }

    /// Applies every limit that has passed by `now`.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if self.read_deadline().is_some_and(|deadline| deadline <= now) {
            return self.fail(self.inbound.timed_out());
        }
        if self
            .outbound
            .deadline()
            .is_some_and(|deadline| deadline <= now)
        {
            return self.fail(self.outbound.timed_out());
        }
        // An answer that cannot be queued fails the connection, which
        // gives back everything held: stop there.
        while !self.closed
            && self
                .running
                .front()
                .is_some_and(|(_, running)| running.deadline <= now)
        {
            let (ticket, running) = self.running.pop_front().expect("just seen");
            self.account.release(running.task_bytes);
            self.task_timed_out(ticket, running.task_id, running.result_allowance, now);
        }
        self.refresh(now);
    }

    fn task_timed_out(
        &mut self,
        ticket: TaskTicket,
        task_id: String,
        allowance: usize,
        now: Instant,
    ) {
        bump(&self.counters.task_timeouts);
        let limit = millis(self.limits.task_timeout);
        tracing::warn!(task_id = ?task_id, task_timeout_ms = limit, "handler did not finish in time; answered with an error and stopped");
        self.events.push_back(ServerEvent::CancelTask { ticket });
        let answer = failed(
            &task_id,
            format!(
                "the collector's handler did not finish this task within task_timeout_ms = {limit} \
                 and was stopped; retry later, narrow the task, or raise ipc.task_timeout_ms on \
                 the collector"
            ),
            self.limits.settings.max_frame_bytes as usize,
        );
        self.answer(task_id, Reply::Owned(answer), allowance, now);
    }

    // ---- the end -------------------------------------------------------------

    /// `Some` once, when the connection is over: `Ok` after a clean end
    /// (drained, or the peer left between frames), the error otherwise.
    /// The driver then closes the connection, drops every task still
    /// running, and gives back what [`release_all`](Self::release_all)
    /// returns.
    pub(crate) fn poll_close(&mut self) -> Option<Result<(), IpcError>> {
        self.close.take()
    }

    fn fail(&mut self, error: IpcError) {
        if !self.closed {
            self.closed = true;
            self.events.clear();
            self.close = Some(Err(error));
            let held = self.account.held;
            self.account.release(held);
            self.account.credit = 0;
            self.account.next_frame = None;
            // Nothing more goes out on a connection that failed.
            self.outbound.discard();
        }
    }

    /// Re-evaluates after any event: the frame clock stops while reading is
    /// held back and runs again when it resumes; what a connection that
    /// reads no more had set aside goes back; a drained connection ends.
    fn refresh(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        let reading = self.wants_read();
        if reading == self.read_paused {
            if reading {
                self.inbound.resume(now);
            } else {
                self.inbound.pause(now);
            }
            self.read_paused = !reading;
        }
        let done_reading = matches!(self.reading, Reading::Stopped | Reading::PeerClosed);
        if done_reading {
            self.account.release_unused();
        }
        if done_reading && self.in_flight() == 0 {
            if let Some(error) = self.failing.take() {
                self.told_peer = true;
                return self.fail(error);
            }
            self.closed = true;
            self.close = Some(Ok(()));
        }
    }
}

/// An error answer to `task_id` that fits in a frame of `max_frame_bytes`.
/// The id goes back whole, since the agent matches on it (and it arrived
/// in a frame of that size); a message too long to fit beside it is cut at
/// a character boundary and ends in "…", or left out when nothing fits.
fn failed(task_id: &str, mut message: String, max_frame_bytes: usize) -> DetectionResult {
    use prost::Message as _;
    const CUT: &str = "…";
    let mut answer = DetectionResult {
        task_id: task_id.to_owned(),
        success: false,
        error_message: Some(String::new()),
        ..Default::default()
    };
    // The id and an empty message; a longer message's length prefix takes
    // up to four more bytes (frames are at most 64 MiB).
    let around = answer.encoded_len() + 4;
    let room = max_frame_bytes.saturating_sub(around);
    if message.len() > room {
        let mut end = room.saturating_sub(CUT.len());
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        if room >= CUT.len() {
            message.push_str(CUT);
        }
    }
    answer.error_message = (answer.encoded_len() <= max_frame_bytes).then_some(message);
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::codec::decode_message;
    use crate::frame::{FrameHeader, encode_message};

    const READ: Duration = Duration::from_secs(30);
    const WRITE: Duration = Duration::from_secs(10);
    const TASK: Duration = Duration::from_secs(60);

    fn limits(max_in_flight: usize) -> ConnectionLimits {
        ConnectionLimits {
            settings: FrameSettings::DEFAULT,
            read_timeout: READ,
            write_timeout: WRITE,
            task_timeout: TASK,
            max_in_flight,
        }
    }

    /// The defaults, with frames of the smallest size allowed.
    fn smallest_frames() -> ConnectionLimits {
        ConnectionLimits {
            settings: FrameSettings {
                max_frame_bytes: 1024,
                ..FrameSettings::DEFAULT
            },
            ..limits(32)
        }
    }

    /// A connection, its counters, and the instant it started.
    fn connection(max_in_flight: usize) -> (ServerConnection, Arc<Counters>, Instant) {
        let counters = Arc::new(Counters::default());
        let t0 = Instant::now();
        let connection =
            ServerConnection::new(limits(max_in_flight), counters.clone(), Arc::default(), t0);
        (connection, counters, t0)
    }

    /// Grants every reservation the connection asks for, as a driver with a
    /// budget to spare would.
    fn grant_all(connection: &mut ServerConnection, now: Instant) {
        while let Some(bytes) = connection.budget_request() {
            connection.on_granted(bytes, now);
        }
    }

    fn task(id: &str) -> DetectionTask {
        DetectionTask {
            task_id: id.to_owned(),
            ..Default::default()
        }
    }

    fn frame(id: &str) -> Vec<u8> {
        let mut wire = BytesMut::new();
        encode_message(&task(id), FrameSettings::DEFAULT, &mut wire).unwrap();
        wire.to_vec()
    }

    fn receive(connection: &mut ServerConnection, bytes: &[u8], now: Instant) {
        connection.read_buffer().extend_from_slice(bytes);
        connection.on_read(bytes.len(), now);
        grant_all(connection, now);
    }

    /// Every task started so far, by ticket and id.
    fn started(connection: &mut ServerConnection) -> Vec<(TaskTicket, String)> {
        std::iter::from_fn(|| connection.poll_event())
            .map(|event| match event {
                ServerEvent::StartTask { ticket, task } => (ticket, task.task_id),
                other => panic!("expected a task to start, got {other:?}"),
            })
            .collect()
    }

    fn ok(id: &str) -> Result<Reply, String> {
        Ok(Reply::Owned(DetectionResult {
            task_id: id.to_owned(),
            success: true,
            ..Default::default()
        }))
    }

    /// The results in the output, decoded, and everything marked written.
    fn written(connection: &mut ServerConnection, now: Instant) -> Vec<DetectionResult> {
        let mut wire = BytesMut::from(connection.pending_output());
        let count = wire.len();
        let mut decoder = crate::frame::FrameDecoder::new(FrameSettings::DEFAULT);
        let mut results = Vec::new();
        while let Some(body) = decoder.decode(&mut wire).unwrap() {
            results.push(decode_message(&body).unwrap());
        }
        connection.on_written(count, now);
        grant_all(connection, now);
        results
    }

    fn closed_with(connection: &mut ServerConnection) -> IpcError {
        match connection.poll_close() {
            Some(Err(error)) => error,
            other => panic!("expected the connection to fail, got {other:?}"),
        }
    }

    #[test]
    fn the_idle_limit_runs_only_while_nothing_is_in_flight() {
        let (mut c, _, t0) = connection(32);
        assert_eq!(c.poll_timeout(), Some(t0 + READ), "idle from the start");

        let t1 = t0 + Duration::from_secs(5);
        receive(&mut c, &frame("slow"), t1);
        let [(ticket, _)] = started(&mut c)[..] else {
            panic!()
        };
        assert_eq!(
            c.poll_timeout(),
            Some(t1 + TASK),
            "a client waiting on its task is not idle: only the task's own deadline runs"
        );
        // Long past what would have been the idle limit, the connection stands.
        c.handle_timeout(t1 + READ + Duration::from_secs(1));
        assert!(c.poll_close().is_none());

        let t2 = t1 + Duration::from_secs(40);
        c.task_finished(ticket, ok("slow"), t2);
        assert_eq!(c.poll_timeout(), Some(t2 + WRITE), "the result must go out");
        assert_eq!(written(&mut c, t2)[0].task_id, "slow");
        assert_eq!(
            c.poll_timeout(),
            Some(t2 + READ),
            "idle again from the last result"
        );

        c.handle_timeout(t2 + READ - Duration::from_nanos(1));
        assert!(c.poll_close().is_none(), "not a moment early");
        c.handle_timeout(t2 + READ);
        match closed_with(&mut c) {
            IpcError::ReadTimeout {
                waited_ms: 30_000,
                received: 0,
            } => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_frame_must_arrive_whole_within_the_read_timeout_of_its_first_byte() {
        let (mut c, counters, t0) = connection(32);
        let bytes = frame("trickled");
        let t1 = t0 + Duration::from_secs(1);
        receive(&mut c, &bytes[..3], t1);
        assert_eq!(c.poll_timeout(), Some(t1 + READ));
        // Steady progress does not move the deadline.
        receive(&mut c, &bytes[3..6], t1 + Duration::from_secs(20));
        assert_eq!(c.poll_timeout(), Some(t1 + READ));
        c.handle_timeout(t1 + READ);
        match closed_with(&mut c) {
            IpcError::ReadTimeout { received: 6, .. } => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(
            counters
                .frames_in
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }

    #[test]
    fn at_the_in_flight_limit_nothing_more_is_read_and_buffered_frames_wait() {
        let (mut c, _, t0) = connection(2);
        let burst = [frame("a"), frame("b"), frame("c")].concat();
        receive(&mut c, &burst, t0);
        let tickets = started(&mut c);
        assert_eq!(
            tickets
                .iter()
                .map(|(_, id)| id.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"],
            "only up to the limit"
        );
        assert!(!c.wants_read(), "held back at the limit");
        assert_eq!(
            c.poll_timeout(),
            Some(t0 + TASK),
            "no read deadline while reading is held back"
        );

        // A finished task whose result is not written yet still counts.
        let t1 = t0 + Duration::from_secs(50);
        c.task_finished(tickets[0].0, ok("a"), t1);
        assert!(started(&mut c).is_empty());
        assert!(!c.wants_read());

        // Once written, the buffered frame is taken at once, without a read.
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(written(&mut c, t2).len(), 1);
        assert_eq!(started(&mut c)[0].1, "c");
        assert!(!c.wants_read(), "b and c are in flight");
    }

    #[test]
    fn time_held_back_is_not_charged_to_a_frame_in_progress() {
        let (mut c, _, t0) = connection(1);
        let second = frame("second");
        let both = [frame("first"), second[..4].to_vec()].concat();
        receive(&mut c, &both, t0);
        let [(ticket, _)] = started(&mut c)[..] else {
            panic!()
        };
        // Held back for longer than a frame may take.
        let t1 = t0 + READ + Duration::from_secs(10);
        c.task_finished(ticket, ok("first"), t1);
        written(&mut c, t1);
        assert!(c.wants_read());
        assert_eq!(
            c.poll_timeout(),
            Some(t1 + READ),
            "the frame clock ran from its first byte only while reading"
        );
        c.handle_timeout(t1);
        assert!(c.poll_close().is_none());
    }

    /// Bytes arrive, and nothing is granted: the reservation they need
    /// stays asked for.
    fn arrive(connection: &mut ServerConnection, bytes: &[u8], now: Instant) {
        connection.read_buffer().extend_from_slice(bytes);
        connection.on_read(bytes.len(), now);
    }

    #[test]
    fn a_frame_clock_stopped_while_reading_waits_resumes_where_it_stopped() {
        // #17: every pause used to restart the frame clock, so a peer that
        // trickled a frame while reading flapped could outlive the limit.
        let (mut c, _, t0) = connection(32);
        let second = frame("second");
        receive(&mut c, &[frame("first"), second[..4].to_vec()].concat(), t0);
        let [(first, _)] = started(&mut c)[..] else {
            panic!()
        };
        c.task_finished(first, ok("first"), t0);
        written(&mut c, t0);
        assert_eq!(c.poll_timeout(), Some(t0 + READ), "half a header in");

        // Ten seconds later the header is whole: the frame needs its
        // reservation, which is not granted yet, so reading stops.
        let t1 = t0 + Duration::from_secs(10);
        arrive(&mut c, &second[4..10], t1);
        let asked = c.budget_request().expect("a reservation for the frame");
        assert!(!c.wants_read());
        assert_eq!(c.poll_timeout(), None, "the frame's clock is stopped");

        // Granted 100 s later: the 10 s the frame had taken still count.
        let t2 = t1 + Duration::from_secs(100);
        c.on_granted(asked, t2);
        let left = READ - Duration::from_secs(10);
        assert_eq!(c.poll_timeout(), Some(t2 + left));
        c.handle_timeout(t2 + left - Duration::from_nanos(1));
        assert!(c.poll_close().is_none(), "not a moment early");
        c.handle_timeout(t2 + left);
        assert!(matches!(closed_with(&mut c), IpcError::ReadTimeout { .. }));
    }

    #[test]
    fn a_task_reserves_its_frame_and_the_largest_result_before_its_body_is_read() {
        let (mut c, _, t0) = connection(32);
        let bytes = frame("task");
        arrive(&mut c, &bytes[..HEADER_LEN], t0);
        let limits = limits(32);
        assert_eq!(
            c.budget_request(),
            Some(bytes.len() + limits.result_allowance()),
            "the frame and the largest result frame"
        );
        assert_eq!(c.budget_request(), None, "asked once");
        assert!(!c.wants_read(), "nothing more is read until it is granted");
        c.on_granted(bytes.len() + limits.result_allowance(), t0);
        assert!(c.wants_read());
        arrive(&mut c, &bytes[HEADER_LEN..], t0);
        let [(ticket, _)] = started(&mut c)[..] else {
            panic!()
        };
        assert_eq!(c.take_released(), 0, "all of it held while the task runs");

        // The handler done, its frame goes back, and what the result does
        // not use of its allowance; the result's own bytes as written.
        c.task_finished(ticket, ok("task"), t0);
        let result = c.pending_output().len();
        assert_eq!(
            c.take_released(),
            bytes.len() + limits.result_allowance() - result
        );
        c.on_written(result, t0);
        assert_eq!(c.take_released(), result);
        assert_eq!(c.release_all(), 0, "nothing left held");
    }

    #[test]
    fn a_connection_that_waits_for_the_budget_reads_nothing_more_and_resumes_when_granted() {
        let (mut c, _, t0) = connection(32);
        let tasks = [frame("a"), frame("b")].concat();
        arrive(&mut c, &tasks, t0);
        let first = c.budget_request().expect("a reservation for a");
        c.on_granted(first, t0);
        assert_eq!(started(&mut c).len(), 1, "a, reserved for, is taken");
        let second = c.budget_request().expect("b waits for its own");
        assert!(!c.wants_read() && started(&mut c).is_empty());
        c.on_granted(second, t0);
        assert_eq!(started(&mut c)[0].1, "b");
        assert!(c.wants_read());
    }

    #[test]
    fn a_closed_connection_gives_back_everything_it_held() {
        let (mut c, _, t0) = connection(32);
        receive(&mut c, &frame("a"), t0);
        let [(ticket, _)] = started(&mut c)[..] else {
            panic!()
        };
        let held = frame("a").len() + limits(32).result_allowance();
        let mut corrupt = frame("b");
        *corrupt.last_mut().unwrap() ^= 1;
        receive(&mut c, &corrupt, t0);
        assert!(matches!(
            closed_with(&mut c),
            IpcError::ChecksumMismatch { .. }
        ));
        c.task_finished(ticket, ok("a"), t0);
        // The second frame's reservation was granted too, by grant_all.
        assert_eq!(
            c.release_all(),
            held + corrupt.len() + limits(32).result_allowance()
        );
    }

    #[test]
    fn results_go_out_in_completion_order_all_ready_frames_together() {
        let (mut c, counters, t0) = connection(32);
        receive(&mut c, &[frame("a"), frame("b"), frame("c")].concat(), t0);
        let tickets = started(&mut c);
        c.task_finished(tickets[2].0, ok("c"), t0);
        c.task_finished(tickets[0].0, ok("a"), t0);
        let ids: Vec<String> = written(&mut c, t0).into_iter().map(|r| r.task_id).collect();
        assert_eq!(ids, ["c", "a"]);
        assert_eq!(
            counters
                .frames_out
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        assert_eq!(c.in_flight(), 1);
    }

    #[test]
    fn the_result_carries_the_tasks_own_id_whatever_the_handler_says() {
        let (mut c, _, t0) = connection(32);
        receive(&mut c, &[frame("mine"), frame("shared")].concat(), t0);
        let tickets = started(&mut c);
        c.task_finished(tickets[0].0, ok("not mine"), t0);
        let shared = Arc::new(DetectionResult {
            task_id: "someone else's".into(),
            success: true,
            ..Default::default()
        });
        c.task_finished(tickets[1].0, Ok(Reply::Shared(shared)), t0);
        let results = written(&mut c, t0);
        assert_eq!(results[0].task_id, "mine");
        assert_eq!(results[1].task_id, "shared");
        assert!(results[1].success);
    }

    #[test]
    fn a_result_too_large_is_answered_with_its_size_and_the_limit() {
        let counters = Arc::new(Counters::default());
        let t0 = Instant::now();
        let mut c = ServerConnection::new(smallest_frames(), counters.clone(), Arc::default(), t0);
        receive(&mut c, &frame("huge"), t0);
        let [(ticket, _)] = started(&mut c)[..] else {
            panic!()
        };
        let huge = DetectionResult {
            error_message: Some("x".repeat(4000)),
            ..Default::default()
        };
        c.task_finished(ticket, Ok(Reply::Owned(huge)), t0);
        let answer = &written(&mut c, t0)[0];
        assert_eq!(answer.task_id, "huge");
        assert!(!answer.success);
        let message = answer.error_message.as_deref().unwrap();
        assert!(message.contains("max_frame_bytes = 1024"), "{message}");
        assert_eq!(
            counters
                .oversize_results
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn tasks_whose_ids_fill_the_frame_are_answered_with_their_ids_whole() {
        let t0 = Instant::now();
        let mut c = ServerConnection::new(smallest_frames(), Arc::default(), Arc::default(), t0);
        // Two tasks of 1,003 bytes each, started together: they time out
        // together, and each answer must fit beside its 1,000-byte id.
        let (first, second) = ("a".repeat(1000), "b".repeat(1000));
        receive(&mut c, &[frame(&first), frame(&second)].concat(), t0);
        assert_eq!(started(&mut c).len(), 2);
        c.handle_timeout(t0 + TASK);
        let answers = written(&mut c, t0 + TASK);
        assert!(c.poll_close().is_none(), "the connection carries on");
        let ids: Vec<&str> = answers.iter().map(|a| a.task_id.as_str()).collect();
        assert_eq!(ids, [first.as_str(), second.as_str()]);
        for answer in &answers {
            assert!(!answer.success);
            let message = answer.error_message.as_deref().unwrap();
            assert!(
                message.starts_with("the collect") && message.ends_with('…'),
                "cut short to fit: {message:?}"
            );
        }
    }

    #[test]
    fn an_error_answer_fits_its_frame_whatever_the_id() {
        use prost::Message as _;
        let message = || "é".repeat(600);
        for id_len in [0, 10, 500, 1010, 1020, 1021, 1024] {
            let id = "i".repeat(id_len);
            let answer = failed(&id, message(), 1024);
            assert_eq!(answer.task_id, id, "the id goes back whole");
            // An id this long came in a frame of at most 1024 bytes.
            if id_len + 3 <= 1024 {
                assert!(
                    answer.encoded_len() <= 1024,
                    "{id_len}: {}",
                    answer.encoded_len()
                );
            }
            if let Some(text) = &answer.error_message
                && text.len() < message().len()
            {
                assert!(text.is_empty() || text.ends_with('…'), "{text:?}");
            }
        }
        assert_eq!(
            failed("x", message(), 1024 * 1024).error_message,
            Some(message())
        );
    }

    #[test]
    fn a_task_past_its_deadline_is_answered_stopped_and_frees_its_slot() {
        let (mut c, counters, t0) = connection(1);
        receive(&mut c, &[frame("stuck"), frame("next")].concat(), t0);
        let [(ticket, _)] = started(&mut c)[..] else {
            panic!()
        };
        assert_eq!(c.poll_timeout(), Some(t0 + TASK));
        c.handle_timeout(t0 + TASK - Duration::from_nanos(1));
        assert!(c.poll_event().is_none(), "not a moment early");

        c.handle_timeout(t0 + TASK);
        assert_eq!(c.poll_event(), Some(ServerEvent::CancelTask { ticket }));
        let answer = &written(&mut c, t0 + TASK)[0];
        assert_eq!(answer.task_id, "stuck");
        assert!(!answer.success);
        assert!(
            answer
                .error_message
                .as_deref()
                .unwrap()
                .contains("within task_timeout_ms = 60000"),
            "{answer:?}"
        );
        assert_eq!(
            started(&mut c)[0].1,
            "next",
            "the slot went to the next task"
        );
        // The stopped handler's late finish is ignored.
        c.task_finished(ticket, ok("stuck"), t0 + TASK + Duration::from_secs(1));
        assert!(c.pending_output().is_empty());
        assert_eq!(
            counters
                .task_timeouts
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn a_panicking_handler_is_answered_with_an_error() {
        let (mut c, counters, t0) = connection(32);
        receive(&mut c, &frame("boom"), t0);
        let [(ticket, _)] = started(&mut c)[..] else {
            panic!()
        };
        c.task_finished(ticket, Err("panicked: oops".into()), t0);
        let answer = &written(&mut c, t0)[0];
        assert!(!answer.success);
        assert!(
            answer
                .error_message
                .as_deref()
                .unwrap()
                .contains("handler failed on this task (panicked: oops)")
        );
        assert_eq!(
            counters
                .handler_errors
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn a_result_must_be_written_within_the_write_timeout() {
        let (mut c, _, t0) = connection(32);
        receive(&mut c, &frame("a"), t0);
        let [(ticket, _)] = started(&mut c)[..] else {
            panic!()
        };
        c.task_finished(ticket, ok("a"), t0);
        c.on_written(3, t0 + Duration::from_secs(9));
        assert_eq!(
            c.poll_timeout(),
            Some(t0 + WRITE),
            "partial progress does not extend it"
        );
        c.handle_timeout(t0 + WRITE);
        assert!(matches!(
            closed_with(&mut c),
            IpcError::WriteTimeout {
                waited_ms: 10_000,
                ..
            }
        ));
    }

    #[test]
    fn bad_frames_close_the_connection_and_are_named() {
        let t0 = Instant::now();
        let mut corrupt = frame("x");
        *corrupt.last_mut().unwrap() ^= 1;
        let oversize = FrameHeader {
            length: u32::MAX,
            checksum: 0,
        }
        .to_bytes()
        .to_vec();
        let body = [0x0a, 100, b'x'];
        let garbage = [
            FrameHeader::for_body(&body, crate::Crc32Variant::Ieee)
                .unwrap()
                .to_bytes()
                .to_vec(),
            body.to_vec(),
        ]
        .concat();
        for (bytes, expected) in [
            (corrupt, "checksum mismatch"),
            (oversize, "over the limit max_frame_bytes"),
            (garbage, "not a valid DetectionTask"),
        ] {
            let (mut c, _, _) = connection(32);
            receive(&mut c, &bytes, t0);
            assert!(c.poll_event().is_none(), "no task from a bad frame");
            let error = closed_with(&mut c).to_string();
            assert!(error.contains(expected), "{error}");
            assert_eq!(c.poll_timeout(), None);
            assert!(!c.wants_read());
        }
    }

    /// The first frame checksummed with the other variant: the peer is told
    /// in its own variant, then the connection closes with the mismatch.
    #[test]
    fn a_first_frame_in_the_other_crc_variant_is_answered_in_it_before_the_close() {
        use crate::Crc32Variant::{Castagnoli, Ieee};
        let castagnoli = FrameSettings {
            crc32: Castagnoli,
            ..FrameSettings::DEFAULT
        };
        let mut wire = BytesMut::new();
        encode_message(&task("c1"), castagnoli, &mut wire).unwrap();
        let (mut c, counters, t0) = connection(32);
        receive(&mut c, &wire, t0);
        assert!(c.poll_event().is_none(), "the task does not run");
        assert!(!c.wants_read(), "nothing more is read");
        let mut notice = BytesMut::from(c.pending_output());
        let body = crate::frame::FrameDecoder::new(castagnoli)
            .decode(&mut notice)
            .expect("framed in the agent's variant")
            .unwrap();
        let notice: DetectionResult = decode_message(&body).unwrap();
        assert_eq!(notice.task_id, "", "a notice answers no task");
        let message = notice.error_message.unwrap();
        assert!(
            message.contains("crc32_variant = ieee")
                && message.contains("checksummed with castagnoli")
                && message.contains("--crc32"),
            "{message}"
        );
        assert!(c.poll_close().is_none(), "not before the notice is out");
        let count = c.pending_output().len();
        c.on_written(count, t0);
        match closed_with(&mut c) {
            IpcError::ChecksumMismatch {
                variant: Ieee,
                peer_variant: Some(Castagnoli),
                ..
            } => {}
            other => panic!("{other:?}"),
        }
        assert!(
            c.told_peer(),
            "the driver must let the notice reach the agent"
        );
        assert_eq!(counters.snapshot("test", 0).frames_in, 0);

        // A corrupt frame (neither variant), or a later frame: no notice.
        let mut corrupt = frame("x");
        *corrupt.last_mut().unwrap() ^= 1;
        let later = [frame("first"), wire.to_vec()].concat();
        for bytes in [corrupt, later] {
            let (mut c, _, t0) = connection(32);
            receive(&mut c, &bytes, t0);
            while c.poll_event().is_some() {}
            assert!(
                matches!(closed_with(&mut c), IpcError::ChecksumMismatch { .. }),
                "closed at once"
            );
            assert!(c.pending_output().is_empty(), "and nothing said");
            assert!(!c.told_peer());
        }
    }

    #[test]
    fn a_peer_that_leaves_mid_frame_is_a_truncated_frame_and_between_frames_a_clean_end() {
        let (mut c, _, t0) = connection(32);
        let bytes = frame("cut");
        receive(&mut c, &bytes[..bytes.len() - 1], t0);
        c.on_eof(t0);
        assert!(matches!(
            closed_with(&mut c),
            IpcError::TruncatedFrame { .. }
        ));

        let (mut c, _, t0) = connection(32);
        receive(&mut c, &bytes, t0);
        let [(ticket, _)] = started(&mut c)[..] else {
            panic!()
        };
        c.on_eof(t0);
        assert!(
            c.poll_close().is_none(),
            "the task in flight is answered first"
        );
        assert!(!c.wants_read());
        c.task_finished(ticket, ok("cut"), t0);
        written(&mut c, t0);
        assert!(matches!(c.poll_close(), Some(Ok(()))));
    }

    #[test]
    fn frames_buffered_when_the_peer_leaves_are_answered_as_room_frees() {
        let (mut c, _, t0) = connection(1);
        receive(&mut c, &[frame("a"), frame("b")].concat(), t0);
        let [(a, _)] = started(&mut c)[..] else {
            panic!()
        };
        // The peer leaves with "b" still waiting for room: the in-flight
        // limit holds, and "b" is not lost.
        c.on_eof(t0);
        assert!(started(&mut c).is_empty(), "no room for b yet");
        assert!(c.in_flight() <= 1);
        c.task_finished(a, ok("a"), t0);
        written(&mut c, t0);
        let [(b, _)] = started(&mut c)[..] else {
            panic!("b is taken once a answered")
        };
        assert!(c.poll_close().is_none());
        c.task_finished(b, ok("b"), t0);
        assert_eq!(written(&mut c, t0)[0].task_id, "b");
        assert!(matches!(c.poll_close(), Some(Ok(()))));

        // The same with the last frame cut short: a truncated frame, once
        // the whole ones are taken.
        let (mut c, _, t0) = connection(1);
        let cut = frame("cut");
        receive(
            &mut c,
            &[frame("a"), cut[..cut.len() - 1].to_vec()].concat(),
            t0,
        );
        let [(a, _)] = started(&mut c)[..] else {
            panic!()
        };
        c.on_eof(t0);
        c.task_finished(a, ok("a"), t0);
        written(&mut c, t0);
        assert!(matches!(
            closed_with(&mut c),
            IpcError::TruncatedFrame { .. }
        ));
    }

    #[test]
    fn a_graceful_stop_answers_what_is_in_flight_and_reads_nothing_more() {
        let (mut c, _, t0) = connection(32);
        let second = frame("late");
        receive(&mut c, &[frame("a"), second[..5].to_vec()].concat(), t0);
        let [(ticket, _)] = started(&mut c)[..] else {
            panic!()
        };
        c.stop_reading(t0);
        assert!(!c.wants_read());
        assert_eq!(c.poll_timeout(), Some(t0 + TASK), "no frame deadline now");
        c.task_finished(ticket, ok("a"), t0);
        assert!(c.poll_close().is_none(), "the result is not out yet");
        assert_eq!(written(&mut c, t0)[0].task_id, "a");
        assert!(matches!(c.poll_close(), Some(Ok(()))));
        assert!(c.poll_close().is_none(), "reported once");
    }
}
