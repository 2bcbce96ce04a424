//! A deterministic simulation of a server and its clients: every rule that
//! holds across connections (the connection limit, the waiting room, the
//! memory budget, deadlines under backpressure) checked under thousands of
//! seeded interleavings, with a virtual clock.
//!
//! What runs is the product's own code, minus the sockets and the runtime:
//! the shared [`Slots`] and [`SharedBudget`], each connection's
//! [`Served`] glue and [`ServerConnection`](crate::policy::server::ServerConnection)
//! core, and each client's [`ClientConnection`] core. The simulation plays
//! the parts of the drivers (a waiter's timer, a shutdown), of the sockets
//! (pipes with a capacity, partial reads and writes, a peer that hangs up),
//! of the handlers (instant, slow, never finishing, panicking, with results
//! from nothing to twice the frame limit), and of clients that behave or
//! do not (pipelining, never reading, trickling bytes, leaving).
//!
//! At every step a seeded scheduler picks one of the enabled actions: a
//! client arrives, writes, reads or hangs up; the server reads, writes, or
//! its timer fires; a handler finishes; a waiter wakes; the server starts
//! to shut down; or the clock moves on, never past a deadline that is due.
//! After every step the invariants are checked (see [`Sim::check`]):
//!
//! * connections served ≤ `max_connections`, and the acceptor counts
//!   exactly the connections being served;
//! * bytes reserved ≤ `max_bytes_in_flight`, and bytes actually held (read
//!   and not decoded, tasks running, results not written) ≤
//!   `max_bytes_in_flight` + [`READ_SLACK`] per connection;
//! * a frame being read is cut by `read_timeout` of the time the server
//!   was reading, never later, and the server always asks to be woken by
//!   then; nothing asks to be woken at an instant already past;
//! * no waiter is admitted at or after its deadline, and every waiter whose
//!   deadline has come has its fate;
//! * every task a client sent is answered exactly once, with its own result,
//!   or its connection ends with a reason;
//! * at the end: every connection closed, no slot and no byte of the budget
//!   left held, and shutdown over within grace + 1 s.
//!
//! A failing seed prints itself, the settings and the last steps, and
//! replays alone with `SIM_SEED=<seed>`; `SIM_SEEDS=<n>` explores more.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::frame::{FrameSettings, HEADER_LEN};
use crate::policy::acceptor::{Arrival, ArrivalId, Fate};
use crate::policy::client::{ClientConnection, Outcome};
use crate::policy::server::{ConnectionLimits, READ_SLACK, Reply, TaskTicket};
use crate::proto::{DetectionResult, DetectionTask};
use crate::server::HandlerOutcome;
use crate::server::budget::SharedBudget;
use crate::server::connection::{Handlers, Served};
use crate::server::slots::Slots;
use crate::telemetry::Counters;

/// splitmix64: a few lines, seeded, the same everywhere.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(self.range(low, high))
    }
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    max_connections: usize,
    max_per_peer: Option<usize>,
    accept_timeout: Duration,
    limits: ConnectionLimits,
    budget: usize,
    clients: usize,
    /// How many uids the clients run as.
    peers: u32,
    grace: Duration,
    /// Weights of the client kinds, in `Kind`'s order.
    kinds: [u64; 4],
    /// Percent of results that are large (a quarter of a frame or more).
    large_results: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Sends its tasks, a few in flight, reads every answer, hangs up.
    Polite,
    /// Sends its tasks and never reads.
    NeverReads,
    /// Writes a few bytes at a time, pipelining.
    Trickles,
    /// Hangs up at a random moment.
    Leaves,
}

/// One direction of a connection: bytes written and not yet read.
#[derive(Debug, Default)]
struct Pipe {
    bytes: VecDeque<u8>,
    capacity: usize,
    writer_gone: bool,
    reader_gone: bool,
}

impl Pipe {
    fn room(&self) -> usize {
        self.capacity.saturating_sub(self.bytes.len())
    }
}

/// A fate the acceptor passed on, and when.
type Told = Arc<Mutex<Option<(Fate, Instant)>>>;

enum Server {
    /// Waiting for a slot, as the async driver's `wait_for_slot` does.
    Waiting {
        arrival: ArrivalId,
        deadline: Instant,
        told: Told,
    },
    Served {
        served: Box<Served<Arc<SharedBudget>>>,
        slot: ArrivalId,
        /// Handlers still running, with what they will do.
        handlers: BTreeMap<TaskTicket, Handler>,
        /// Set by the budget when a reservation this connection waits for
        /// is granted.
        granted: Arc<AtomicBool>,
    },
    Closed,
}

/// What a handler will do, decided when it starts.
struct Handler {
    done_at: Option<Instant>,
    result_bytes: usize,
    panics: bool,
    task_id: String,
    /// The task's frame, held while the handler runs.
    frame: usize,
}

struct Client {
    kind: Kind,
    uid: u32,
    core: ClientConnection<usize>,
    to_send: VecDeque<DetectionTask>,
    /// Every task begun: its id and what became of it.
    tasks: Vec<(String, Option<Result<(), String>>)>,
    hung_up: bool,
    in_flight_goal: usize,
}

/// The frame deadline as the server owes it, worked out from outside.
#[derive(Default)]
struct FrameClock {
    /// (first byte, one past the last) of each frame written, in the stream.
    frames: VecDeque<(usize, usize)>,
    read_total: usize,
    started: Option<Instant>,
    paused: Duration,
    pause_began: Option<Instant>,
}

struct Conn {
    client: Client,
    server: Server,
    up: Pipe,
    down: Pipe,
    written_total: usize,
    clock: FrameClock,
    /// Bytes of task frames the server has decoded.
    decoded_total: usize,
}

/// One seeded run. See the [module docs](self).
pub(crate) struct Sim {
    seed: u64,
    rng: Rng,
    settings: Settings,
    t0: Instant,
    now: Instant,
    /// The virtual time, for hand-offs made under the acceptor's lock.
    clock: Arc<Mutex<Instant>>,
    slots: Slots,
    budget: Arc<SharedBudget>,
    counters: Arc<Counters>,
    conns: Vec<Conn>,
    /// The ids of every task a handler was started on (ids are unique
    /// across clients).
    started_tasks: HashSet<String>,
    started_clients: usize,
    shutdown_at: Option<Instant>,
    log: Vec<String>,
    steps: usize,
}

/// A broken invariant, with the seed that replays it and the steps before.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) seed: u64,
    pub(crate) invariant: String,
    pub(crate) trace: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {}: {}\nreplay: SIM_SEED={} cargo nextest run --lib simulation\nlast steps:\n{}",
            self.seed, self.invariant, self.seed, self.trace
        )
    }
}

enum Action {
    Arrive,
    WaiterWakes(usize),
    ClientBegins(usize),
    ClientWrites(usize),
    ClientReads(usize),
    ClientHangsUp(usize),
    ClientTimer(usize),
    ServerReads(usize),
    ServerWrites(usize),
    ServerTimer(usize),
    ServerCollects(usize),
    HandlerDone(usize, TaskTicket),
    Shutdown,
    Advance,
}

/// The handlers of one simulated connection, as its driver runs them.
struct SimHandlers<'a> {
    rng: &'a mut Rng,
    settings: Settings,
    now: Instant,
    running: &'a mut BTreeMap<TaskTicket, Handler>,
    /// Bytes of task frames decoded, counted as their tasks start.
    decoded: &'a mut usize,
    started: &'a mut HashSet<String>,
}

impl Handlers for SimHandlers<'_> {
    fn start(&mut self, ticket: TaskTicket, task: Box<DetectionTask>) -> Option<HandlerOutcome> {
        let limits = self.settings.limits;
        let max = u64::from(limits.settings.max_frame_bytes);
        let done_at = match self.rng.below(10) {
            0..=3 => Some(self.now),
            4..=8 => Some(
                self.now
                    + self
                        .rng
                        .millis(0, 2 * limits.task_timeout.as_millis() as u64),
            ),
            _ => None,
        };
        let result_bytes = if !self.rng.chance(self.settings.large_results) {
            self.rng.range(0, 100)
        } else if self.rng.chance(85) {
            self.rng.range(max / 4, max - 64)
        } else {
            self.rng.range(max, 2 * max)
        } as usize;
        let frame = HEADER_LEN + prost::Message::encoded_len(&task);
        *self.decoded += frame;
        self.started.insert(task.task_id.clone());
        let handler = Handler {
            done_at,
            result_bytes,
            panics: self.rng.chance(5),
            frame,
            task_id: task.task_id,
        };
        if done_at == Some(self.now) {
            return Some(handler.outcome());
        }
        self.running.insert(ticket, handler);
        None
    }

    fn cancel(&mut self, ticket: TaskTicket) {
        self.running.remove(&ticket);
    }
}

impl Sim {
    pub(crate) fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let max_frame_bytes = if rng.chance(50) { 1024 } else { 4096 };
        let limits = ConnectionLimits {
            settings: FrameSettings {
                max_frame_bytes,
                ..FrameSettings::DEFAULT
            },
            read_timeout: rng.millis(50, 500),
            write_timeout: rng.millis(20, 300),
            task_timeout: rng.millis(20, 400),
            max_in_flight: rng.range(1, 8) as usize,
        };
        let max_connections = rng.range(1, 4) as usize;
        let settings = Settings {
            max_connections,
            max_per_peer: rng
                .chance(30)
                .then(|| rng.range(1, max_connections as u64) as usize),
            accept_timeout: rng.millis(10, 200),
            limits,
            budget: rng.range(2, 8) as usize * (HEADER_LEN + max_frame_bytes as usize),
            clients: rng.range(1, 8) as usize,
            peers: rng.range(1, 3) as u32,
            grace: rng.millis(50, 500),
            kinds: [rng.below(4), rng.below(4), rng.below(4), rng.below(4)],
            large_results: rng.below(80),
        };
        // One seed in three is a memory squeeze: a budget of the smallest
        // size a server accepts, peers that never read and results that are
        // large, tricklers among them.
        let settings = if seed.is_multiple_of(3) {
            Settings {
                // The least a server accepts: a task and a result of the
                // largest size.
                budget: 2 * (HEADER_LEN + max_frame_bytes as usize) + rng.below(2) as usize * 1024,
                kinds: [1, 2, 3, 0],
                large_results: rng.range(50, 90),
                clients: rng.range(3, 8) as usize,
                max_connections: rng.range(2, 4) as usize,
                max_per_peer: None,
                limits: ConnectionLimits {
                    read_timeout: rng.millis(200, 600),
                    write_timeout: rng.millis(150, 400),
                    ..limits
                },
                ..settings
            }
        } else {
            settings
        };
        let t0 = Instant::now();
        Sim {
            seed,
            rng,
            settings,
            t0,
            now: t0,
            clock: Arc::new(Mutex::new(t0)),
            slots: Slots::new(
                settings.max_connections,
                settings.max_per_peer,
                settings.accept_timeout,
            ),
            budget: Arc::new(SharedBudget::new(settings.budget)),
            counters: Arc::new(Counters::default()),
            conns: Vec::new(),
            started_tasks: HashSet::new(),
            started_clients: 0,
            shutdown_at: None,
            log: Vec::new(),
            steps: 0,
        }
    }

    fn note(&mut self, line: String) {
        let at = self.now.duration_since(self.t0).as_micros();
        self.log.push(format!("{at:>9}us {line}"));
    }

    fn fail(&self, invariant: String) -> Failure {
        let start = self.log.len().saturating_sub(60);
        Failure {
            seed: self.seed,
            invariant: format!("{invariant} ({:?})", self.settings),
            trace: self.log[start..].join("\n"),
        }
    }

    /// Runs to the end (every client started, the server shut down); the
    /// steps it took.
    pub(crate) fn run(mut self) -> Result<usize, Failure> {
        loop {
            let actions = self.enabled();
            if actions.is_empty() {
                break;
            }
            let pick = self.rng.below(actions.len() as u64) as usize;
            let action = actions.into_iter().nth(pick).expect("picked within bounds");
            self.step(action)?;
            self.steps += 1;
            self.check()?;
            if self.steps > 200_000 {
                return Err(self.fail("the run did not end within 200,000 steps".to_owned()));
            }
        }
        self.check_end()?;
        Ok(self.steps)
    }

    fn enabled(&mut self) -> Vec<Action> {
        let now = self.now;
        let mut actions = Vec::new();
        let mut due = false;
        if self.shutdown_at.is_none() && self.started_clients < self.settings.clients {
            actions.push(Action::Arrive);
        }
        for (index, conn) in self.conns.iter_mut().enumerate() {
            let client = &mut conn.client;
            if !client.hung_up && client.core.closed_reason().is_none() {
                if !client.to_send.is_empty() && client.core.in_flight() < client.in_flight_goal {
                    actions.push(Action::ClientBegins(index));
                }
                if !client.core.pending_output().is_empty() && conn.up.room() > 0 {
                    actions.push(Action::ClientWrites(index));
                }
                if client.kind != Kind::NeverReads
                    && (!conn.down.bytes.is_empty() || conn.down.writer_gone)
                {
                    actions.push(Action::ClientReads(index));
                }
                let idle = client.to_send.is_empty() && client.core.in_flight() == 0;
                if client.kind == Kind::Leaves || idle || conn.down.writer_gone {
                    actions.push(Action::ClientHangsUp(index));
                }
                if let Some(deadline) = client.core.poll_timeout()
                    && deadline <= now
                {
                    due = true;
                    actions.push(Action::ClientTimer(index));
                }
            }
            match &conn.server {
                Server::Waiting { deadline, told, .. } => {
                    let decided = told.lock().expect("not poisoned").is_some();
                    if *deadline <= now || decided {
                        due |= *deadline <= now;
                        actions.push(Action::WaiterWakes(index));
                    }
                }
                Server::Served {
                    served,
                    handlers,
                    granted,
                    ..
                } => {
                    let core = &served.core;
                    if core.wants_read() && (!conn.up.bytes.is_empty() || conn.up.writer_gone) {
                        actions.push(Action::ServerReads(index));
                    }
                    if !core.pending_output().is_empty()
                        && (conn.down.room() > 0 || conn.down.reader_gone)
                    {
                        actions.push(Action::ServerWrites(index));
                    }
                    if let Some(deadline) = core.poll_timeout()
                        && deadline <= now
                    {
                        due = true;
                        actions.push(Action::ServerTimer(index));
                    }
                    if granted.load(Ordering::SeqCst) {
                        actions.push(Action::ServerCollects(index));
                    }
                    for (&ticket, handler) in handlers {
                        if handler.done_at.is_some_and(|at| at <= now) {
                            due = true;
                            actions.push(Action::HandlerDone(index, ticket));
                        }
                    }
                }
                Server::Closed => {}
            }
        }
        if self.shutdown_at.is_none() && self.started_clients == self.settings.clients {
            actions.push(Action::Shutdown);
        }
        if !due && self.next_deadline().is_some() {
            actions.push(Action::Advance);
        }
        actions
    }

    /// The earliest instant something is timed for, after now.
    fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at
                && at > self.now
            {
                next = Some(next.map_or(at, |next| next.min(at)));
            }
        };
        for conn in &self.conns {
            if !conn.client.hung_up {
                consider(conn.client.core.poll_timeout());
            }
            match &conn.server {
                Server::Waiting { deadline, .. } => consider(Some(*deadline)),
                Server::Served {
                    served, handlers, ..
                } => {
                    consider(served.core.poll_timeout());
                    for handler in handlers.values() {
                        consider(handler.done_at);
                    }
                }
                Server::Closed => {}
            }
        }
        if let Some(at) = self.shutdown_at {
            consider(Some(at + self.settings.grace));
        }
        next
    }

    fn step(&mut self, action: Action) -> Result<(), Failure> {
        let now = self.now;
        match action {
            Action::Arrive => self.arrive(),
            Action::WaiterWakes(index) => self.waiter_wakes(index)?,
            Action::ClientBegins(index) => {
                let client = &mut self.conns[index].client;
                let task = client.to_send.pop_front().expect("enabled with a task");
                let waiter = client.tasks.len();
                let frame = HEADER_LEN + prost::Message::encoded_len(&task);
                match client
                    .core
                    .begin(&task, waiter, now + Duration::from_secs(3600), now)
                {
                    Ok(_) => {
                        client.tasks.push((task.task_id.clone(), None));
                        let conn = &mut self.conns[index];
                        let start =
                            conn.written_total + conn.client.core.pending_output().len() - frame;
                        conn.clock.frames.push_back((start, start + frame));
                        self.note(format!("client {index} begins {}", task.task_id));
                    }
                    Err(_) => self.note(format!("client {index} cannot begin {}", task.task_id)),
                }
            }
            Action::ClientWrites(index) => {
                let trickle = self.conns[index].client.kind == Kind::Trickles;
                let cap = match (trickle, self.rng.chance(90)) {
                    (true, true) => self.rng.range(1, 3) as usize,
                    (true, false) => self.rng.range(4, 128) as usize,
                    (false, _) => usize::MAX,
                };
                let conn = &mut self.conns[index];
                if conn.up.reader_gone {
                    conn.client
                        .core
                        .on_io_error(&std::io::ErrorKind::BrokenPipe.into());
                } else {
                    let pending = conn.client.core.pending_output();
                    let count = pending.len().min(conn.up.room()).min(cap);
                    conn.up.bytes.extend(&pending[..count]);
                    conn.written_total += count;
                    conn.client.core.on_written(count, now);
                }
                self.settle_client(index);
            }
            Action::ClientReads(index) => {
                let conn = &mut self.conns[index];
                if conn.down.bytes.is_empty() {
                    conn.client.core.on_eof(now);
                } else {
                    let count = conn.down.bytes.len();
                    let bytes: Vec<u8> = conn.down.bytes.drain(..count).collect();
                    conn.client.core.read_buffer().extend_from_slice(&bytes);
                    conn.client.core.on_read(count, now);
                }
                self.settle_client(index);
            }
            Action::ClientHangsUp(index) => {
                let conn = &mut self.conns[index];
                conn.client.hung_up = true;
                conn.client.core.close("the client hung up".to_owned());
                conn.up.writer_gone = true;
                conn.down.reader_gone = true;
                self.note(format!("client {index} hangs up"));
                self.settle_client(index);
            }
            Action::ClientTimer(index) => {
                self.conns[index].client.core.handle_timeout(now);
                self.settle_client(index);
            }
            Action::ServerReads(index) => {
                let chunk = self.rng.range(1, 4096) as usize;
                let conn = &mut self.conns[index];
                let Server::Served { served, .. } = &mut conn.server else {
                    unreachable!("enabled while served")
                };
                let core = &mut served.core;
                if conn.up.bytes.is_empty() {
                    core.on_eof(now);
                    self.note(format!("server {index} reads the end"));
                } else {
                    let window = core.read_window();
                    if window == 0 {
                        return Err(self.fail(format!(
                            "server connection {index} wants to read with no room to read into"
                        )));
                    }
                    let count = chunk.min(conn.up.bytes.len()).min(window);
                    let bytes: Vec<u8> = conn.up.bytes.drain(..count).collect();
                    core.read_buffer().extend_from_slice(&bytes);
                    core.on_read(count, now);
                    conn.clock.on_read(count, now);
                    self.note(format!("server {index} reads {count}"));
                }
                self.drive_server(index)?;
            }
            Action::ServerWrites(index) => {
                let chunk = self.rng.range(1, 8192) as usize;
                let conn = &mut self.conns[index];
                let Server::Served { served, .. } = &mut conn.server else {
                    unreachable!("enabled while served")
                };
                let core = &mut served.core;
                if conn.down.reader_gone {
                    core.on_io_error(std::io::ErrorKind::BrokenPipe.into());
                } else {
                    let pending = core.pending_output();
                    let count = pending.len().min(conn.down.room()).min(chunk);
                    conn.down.bytes.extend(&pending[..count]);
                    core.on_written(count, now);
                }
                self.drive_server(index)?;
            }
            Action::ServerTimer(index) => {
                let Server::Served { served, .. } = &mut self.conns[index].server else {
                    unreachable!("enabled while served")
                };
                served.core.handle_timeout(now);
                if let Some(next) = served.core.poll_timeout()
                    && next <= now
                {
                    return Err(self.fail(format!(
                        "server connection {index} asks to be woken at {:?}, which is already \
                         due (a busy loop)",
                        next - self.t0
                    )));
                }
                self.note(format!("server {index} timer"));
                self.drive_server(index)?;
            }
            Action::ServerCollects(index) => {
                let Server::Served { granted, .. } = &self.conns[index].server else {
                    unreachable!("enabled while served")
                };
                granted.store(false, Ordering::SeqCst);
                self.note(format!("server {index} woken by the budget"));
                self.drive_server(index)?;
            }
            Action::HandlerDone(index, ticket) => {
                let Server::Served {
                    served, handlers, ..
                } = &mut self.conns[index].server
                else {
                    unreachable!("enabled while served")
                };
                let handler = handlers.remove(&ticket).expect("enabled with a handler");
                served.core.task_finished(ticket, handler.outcome(), now);
                self.note(format!("handler {index}/{ticket} done"));
                self.drive_server(index)?;
            }
            Action::Shutdown => {
                self.shutdown_at = Some(now);
                self.note("shutdown begins".to_owned());
                for index in 0..self.conns.len() {
                    match &self.conns[index].server {
                        // As the async driver: a waiter told to stop
                        // withdraws, then hears its fate.
                        Server::Waiting { arrival, .. } => {
                            self.slots.withdraw(*arrival, || now);
                            self.waiter_wakes(index)?;
                        }
                        Server::Served { .. } => self.stop_reading(index)?,
                        Server::Closed => {}
                    }
                }
            }
            Action::Advance => {
                let next = self.next_deadline().expect("enabled with a deadline");
                let step = self.rng.millis(1, 50);
                self.now = next.min(self.now + step);
                *self.clock.lock().expect("not poisoned") = self.now;
                self.note("time passes".to_owned());
                if let Some(at) = self.shutdown_at
                    && self.now >= at + self.settings.grace
                {
                    self.abort();
                }
            }
        }
        Ok(())
    }

    fn arrive(&mut self) {
        let index = self.conns.len();
        self.started_clients += 1;
        let weights = self.settings.kinds;
        let mut pick = self.rng.below(weights.iter().sum::<u64>().max(1));
        let mut kind = Kind::Polite;
        for (candidate, weight) in [Kind::Polite, Kind::NeverReads, Kind::Trickles, Kind::Leaves]
            .into_iter()
            .zip(weights)
        {
            if pick < weight {
                kind = candidate;
                break;
            }
            pick -= weight;
        }
        let count = self.rng.range(1, 12);
        let to_send = (0..count)
            .map(|n| DetectionTask {
                task_id: format!("c{index}-t{n}"),
                metadata: Some("m".repeat(self.rng.below(200) as usize)),
                ..Default::default()
            })
            .collect();
        let limits = self.settings.limits;
        let uid = 1000 + self.rng.below(u64::from(self.settings.peers)) as u32;
        let client = Client {
            kind,
            uid,
            core: ClientConnection::new(
                limits.settings,
                Duration::from_secs(3600),
                Duration::from_secs(3600),
                limits.max_in_flight,
                self.now,
            ),
            to_send,
            tasks: Vec::new(),
            hung_up: false,
            // A trickler pipelines, so that a frame of its is often half
            // read when its connection stops reading.
            in_flight_goal: if kind == Kind::Trickles {
                limits.max_in_flight
            } else {
                self.rng.range(1, limits.max_in_flight as u64) as usize
            },
        };
        let capacity = self.rng.range(64, 4096) as usize;
        self.conns.push(Conn {
            client,
            server: Server::Closed,
            up: Pipe {
                capacity,
                ..Pipe::default()
            },
            down: Pipe {
                capacity,
                ..Pipe::default()
            },
            written_total: 0,
            clock: FrameClock::default(),
            decoded_total: 0,
        });
        let told: Told = Arc::default();
        let tell = told.clone();
        let clock = self.clock.clone();
        let (arrival, outcome) = self.slots.arrive(
            Some(uid),
            move |_, fate| {
                let decided_at = *clock.lock().expect("not poisoned");
                *tell.lock().expect("not poisoned") = Some((fate, decided_at));
                true
            },
            || self.now,
        );
        self.note(format!(
            "client {index} ({kind:?}, uid {uid}) arrives, {count} tasks: {outcome:?}"
        ));
        match outcome {
            Arrival::Admitted => self.serve(index, arrival),
            Arrival::Waiting { deadline } => {
                self.conns[index].server = Server::Waiting {
                    arrival,
                    deadline,
                    told,
                };
            }
            Arrival::Refused(_) => self.refuse(index),
        }
    }

    fn serve(&mut self, index: usize, slot: ArrivalId) {
        let granted = Arc::new(AtomicBool::new(false));
        let wake = {
            let granted = granted.clone();
            Box::new(move || granted.store(true, Ordering::SeqCst))
        };
        let served = Served::new(
            self.settings.limits,
            self.counters.clone(),
            Arc::default(),
            self.budget.clone(),
            wake,
            self.now,
        );
        self.conns[index].server = Server::Served {
            served: Box::new(served),
            slot,
            handlers: BTreeMap::new(),
            granted,
        };
        self.note(format!("server {index} serves"));
    }

    /// Closes an unserved connection, with the notice saying why, as the
    /// drivers do.
    fn refuse(&mut self, index: usize) {
        let conn = &mut self.conns[index];
        let notice = DetectionResult {
            error_message: Some("refused".to_owned()),
            ..Default::default()
        };
        let mut frame = bytes::BytesMut::new();
        crate::frame::encode_message(&notice, self.settings.limits.settings, &mut frame)
            .expect("a small frame");
        if !conn.down.reader_gone && conn.down.room() >= frame.len() {
            conn.down.bytes.extend(&frame[..]);
        }
        conn.server = Server::Closed;
        conn.down.writer_gone = true;
        conn.up.reader_gone = true;
        self.note(format!("server {index} refused"));
    }

    /// As the async driver's waiter: its fate heard, or its timer fired
    /// (which makes the acceptor decide).
    fn waiter_wakes(&mut self, index: usize) -> Result<(), Failure> {
        let now = self.now;
        let Server::Waiting {
            arrival,
            deadline,
            told,
        } = &self.conns[index].server
        else {
            unreachable!("enabled while waiting")
        };
        let (arrival, deadline, told) = (*arrival, *deadline, told.clone());
        if told.lock().expect("not poisoned").is_none() && deadline <= now {
            self.slots.handle_timeout(|| now);
            if let Some(next) = self.slots.poll_timeout()
                && next <= now
            {
                return Err(self.fail(format!(
                    "the acceptor asks to be woken at {:?}, which is already due (a busy loop)",
                    next - self.t0
                )));
            }
        }
        let fate = *told.lock().expect("not poisoned");
        match fate {
            None if deadline <= now => Err(self.fail(format!(
                "waiter {index}'s deadline passed and the acceptor has not decided its fate"
            ))),
            None => Ok(()),
            Some((Fate::Admitted, at)) if at >= deadline => Err(self.fail(format!(
                "waiter {index} admitted at {:?}, at or after its deadline {:?}",
                at - self.t0,
                deadline - self.t0
            ))),
            Some((Fate::Admitted, _)) => {
                self.serve(index, arrival);
                if self.shutdown_at.is_some() {
                    self.stop_reading(index)?;
                }
                Ok(())
            }
            Some((Fate::Expired, _)) => {
                self.refuse(index);
                Ok(())
            }
        }
    }

    fn stop_reading(&mut self, index: usize) -> Result<(), Failure> {
        if let Server::Served { served, .. } = &mut self.conns[index].server {
            served.core.stop_reading(self.now);
        }
        self.drive_server(index)
    }

    /// What a driver does after any event ([`Served::step`]), and closing
    /// the connection when the core says so.
    fn drive_server(&mut self, index: usize) -> Result<(), Failure> {
        let now = self.now;
        let settings = self.settings;
        let conn = &mut self.conns[index];
        let Server::Served {
            served,
            handlers,
            granted,
            ..
        } = &mut conn.server
        else {
            return Ok(());
        };
        let mut sim_handlers = SimHandlers {
            rng: &mut self.rng,
            settings,
            now,
            running: handlers,
            decoded: &mut conn.decoded_total,
            started: &mut self.started_tasks,
        };
        let ended = served.step(&mut sim_handlers, now);
        // Whatever was granted until now, during the step included, the
        // step collected.
        granted.store(false, Ordering::SeqCst);
        if let Some(outcome) = ended {
            self.note(format!("server {index} closes: {outcome:?}"));
            self.close_server(index);
        }
        Ok(())
    }

    fn close_server(&mut self, index: usize) {
        let conn = &mut self.conns[index];
        let Server::Served { slot, .. } = std::mem::replace(&mut conn.server, Server::Closed)
        else {
            return;
        };
        conn.down.writer_gone = true;
        conn.up.reader_gone = true;
        self.slots.release(slot, || self.now);
    }

    fn abort(&mut self) {
        self.note("grace over: abort".to_owned());
        for index in 0..self.conns.len() {
            match self.conns[index].server {
                Server::Served { .. } => self.close_server(index),
                Server::Waiting { arrival, .. } => {
                    self.slots.withdraw(arrival, || self.now);
                    self.refuse(index);
                }
                Server::Closed => {}
            }
        }
    }

    fn settle_client(&mut self, index: usize) {
        let client = &mut self.conns[index].client;
        for delivery in client.core.take_deliveries() {
            let (task_id, outcome) = &mut client.tasks[delivery.waiter];
            let settled = match delivery.outcome {
                Outcome::Answered(body) => {
                    match crate::frame::codec::decode_message::<DetectionResult>(&body) {
                        Ok(result) if result.task_id == *task_id => Ok(()),
                        Ok(result) => Err(format!("answered with {:?}'s result", result.task_id)),
                        Err(error) => Err(format!("answer does not decode: {error}")),
                    }
                }
                Outcome::Lost(reason) | Outcome::Refused(reason) | Outcome::Unsent(reason)
                    if reason.is_empty() =>
                {
                    Err("lost, no reason".to_owned())
                }
                Outcome::Unsent(_) if self.started_tasks.contains(task_id.as_str()) => {
                    Err("told it was never sent, but the server started it".to_owned())
                }
                Outcome::Lost(_) | Outcome::Refused(_) | Outcome::Unsent(_) => Ok(()),
                // Deadlines are an hour away here: none is reached.
                Outcome::TimedOut => Err("timed out".to_owned()),
            };
            if delivery.task_id != *task_id {
                *outcome = Some(Err(format!("told with {:?}'s id", delivery.task_id)));
                continue;
            }
            if outcome.is_some() {
                *outcome = Some(Err("told twice".to_owned()));
            } else {
                *outcome = Some(settled);
            }
        }
    }

    /// The invariants, after every step.
    fn check(&mut self) -> Result<(), Failure> {
        let now = self.now;
        // A waiter the acceptor admitted holds its slot before its driver
        // hears of it.
        let served = self
            .conns
            .iter()
            .filter(|conn| match &conn.server {
                Server::Served { .. } => true,
                Server::Waiting { told, .. } => {
                    matches!(
                        *told.lock().expect("not poisoned"),
                        Some((Fate::Admitted, _))
                    )
                }
                Server::Closed => false,
            })
            .count();
        if served > self.settings.max_connections {
            return Err(self.fail(format!(
                "{served} connections served at once, max_connections = {}",
                self.settings.max_connections
            )));
        }
        if self.slots.served() != served {
            return Err(self.fail(format!(
                "the acceptor counts {} connections served, {served} are",
                self.slots.served()
            )));
        }
        if let Some(limit) = self.settings.max_per_peer {
            let mut per_peer: BTreeMap<u32, usize> = BTreeMap::new();
            for conn in &self.conns {
                let holds = match &conn.server {
                    Server::Served { .. } => true,
                    Server::Waiting { told, .. } => !matches!(
                        *told.lock().expect("not poisoned"),
                        Some((Fate::Expired, _))
                    ),
                    Server::Closed => false,
                };
                if holds {
                    *per_peer.entry(conn.client.uid).or_default() += 1;
                }
            }
            if let Some((uid, count)) = per_peer.into_iter().find(|&(_, count)| count > limit) {
                return Err(self.fail(format!(
                    "uid {uid} holds {count} connections, max_connections_per_peer = {limit}"
                )));
            }
        }
        let reserved = self.budget.held();
        if reserved > self.settings.budget {
            return Err(self.fail(format!(
                "{reserved} bytes reserved, over max_bytes_in_flight = {}",
                self.settings.budget
            )));
        }
        // Liveness of the budget: requests wait first come first served, so
        // if every waiting request (not yet granted) fits in what is free,
        // the first of them does, and should have been granted.
        let waiting: Vec<(usize, usize)> = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(index, conn)| match &conn.server {
                Server::Served {
                    served, granted, ..
                } if !granted.load(Ordering::SeqCst) => Some((index, served.core.awaited_grant()?)),
                _ => None,
            })
            .collect();
        if !waiting.is_empty()
            && waiting
                .iter()
                .all(|&(_, request)| reserved + request <= self.settings.budget)
        {
            return Err(self.fail(format!(
                "connections wait for the budget (index, bytes: {waiting:?}) while only \
                 {reserved} of {} bytes are held {}",
                self.settings.budget,
                self.budget.debug()
            )));
        }
        let covered = self.bytes_held_for_tasks();
        if covered > self.settings.budget {
            return Err(self.fail(format!(
                "{covered} bytes held for tasks and results, over max_bytes_in_flight = {}",
                self.settings.budget
            )));
        }
        let held = self.bytes_held();
        let bound = self.memory_bound();
        if held > bound {
            return Err(self.fail(format!(
                "{held} bytes held, over the documented bound of {bound}"
            )));
        }
        for index in 0..self.conns.len() {
            let conn = &mut self.conns[index];
            let Server::Served { served, .. } = &conn.server else {
                continue;
            };
            let core = &served.core;
            let reading = core.wants_read();
            let timeout = self.settings.limits.read_timeout;
            let Some(deadline) = conn.clock.deadline(reading, timeout, now) else {
                continue;
            };
            if now > deadline {
                return Err(self.fail(format!(
                    "server connection {index} still reads a frame {:?} past read_timeout \
                     (time not reading excluded)",
                    now - deadline
                )));
            }
            let wake = core.poll_timeout();
            if reading && wake.is_none_or(|wake| wake > deadline) {
                let t0 = self.t0;
                return Err(self.fail(format!(
                    "server connection {index} reads a frame due by {:?} but will not look \
                     before {:?}",
                    deadline - t0,
                    wake.map(|wake| wake - t0)
                )));
            }
        }
        for (index, conn) in self.conns.iter().enumerate() {
            for (task_id, outcome) in &conn.client.tasks {
                if let Some(Err(error)) = outcome {
                    return Err(self.fail(format!("client {index}, task {task_id}: {error}")));
                }
            }
        }
        Ok(())
    }

    /// Bytes the server holds for its connections, counted from outside:
    /// read and not yet decoded, tasks whose handlers still run, results
    /// not yet written.
    fn bytes_held(&self) -> usize {
        let unread: usize = self
            .conns
            .iter()
            .filter(|conn| matches!(conn.server, Server::Served { .. }))
            .map(|conn| conn.clock.read_total - conn.decoded_total)
            .sum();
        unread + self.bytes_held_for_tasks()
    }

    /// Of [`bytes_held`](Self::bytes_held), what tasks and results hold:
    /// all of it covered by reservations.
    fn bytes_held_for_tasks(&self) -> usize {
        self.conns
            .iter()
            .map(|conn| match &conn.server {
                Server::Served {
                    served, handlers, ..
                } => {
                    let running: usize = handlers.values().map(|handler| handler.frame).sum();
                    running + served.core.pending_output().len()
                }
                _ => 0,
            })
            .sum()
    }

    /// What docs/security.md promises: `max_bytes_in_flight`, plus what
    /// each connection reads ahead of its reservations.
    fn memory_bound(&self) -> usize {
        self.settings.budget + self.settings.max_connections * READ_SLACK
    }

    fn check_end(&mut self) -> Result<(), Failure> {
        for index in 0..self.conns.len() {
            if !self.conns[index].client.hung_up {
                self.conns[index]
                    .client
                    .core
                    .close("the run ended".to_owned());
                self.settle_client(index);
            }
        }
        self.check()?;
        for (index, conn) in self.conns.iter().enumerate() {
            if !matches!(conn.server, Server::Closed) {
                return Err(self.fail(format!("server connection {index} never closed")));
            }
            if let Some((task_id, _)) = conn.client.tasks.iter().find(|(_, o)| o.is_none()) {
                return Err(self.fail(format!("client {index}: task {task_id} never settled")));
            }
        }
        if self.slots.served() != 0 {
            return Err(self.fail(format!(
                "{} slots still held after every connection closed",
                self.slots.served()
            )));
        }
        if self.budget.held() != 0 {
            return Err(self.fail(format!(
                "{} bytes of the budget still held after every connection closed",
                self.budget.held()
            )));
        }
        if let Some(at) = self.shutdown_at
            && self.now > at + self.settings.grace + Duration::from_secs(1)
        {
            return Err(self.fail("shutdown took longer than grace + 1 s".to_owned()));
        }
        Ok(())
    }
}

impl Handler {
    fn outcome(&self) -> Result<Reply, String> {
        if self.panics {
            return Err("panicked: simulated".to_owned());
        }
        Ok(Reply::Owned(crate::sample::detection_result(
            &self.task_id,
            self.result_bytes,
        )))
    }
}

impl FrameClock {
    fn on_read(&mut self, count: usize, now: Instant) {
        self.read_total += count;
        while let Some(&(start, end)) = self.frames.front() {
            if self.read_total >= end {
                self.frames.pop_front();
                self.started = None;
                self.paused = Duration::ZERO;
                self.pause_began = None;
                continue;
            }
            if self.read_total > start && self.started.is_none() {
                self.started = Some(now);
            }
            break;
        }
    }

    /// When the frame in progress must have arrived whole, the time the
    /// server did not read excluded; `None` between frames.
    fn deadline(&mut self, reading: bool, timeout: Duration, now: Instant) -> Option<Instant> {
        let started = self.started?;
        match (reading, self.pause_began) {
            (false, None) => self.pause_began = Some(now),
            (true, Some(began)) => {
                self.paused += now - began;
                self.pause_began = None;
            }
            _ => {}
        }
        let paused = self.paused + self.pause_began.map_or(Duration::ZERO, |began| now - began);
        Some(started + timeout + paused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seeds to explore: `SIM_SEED` alone, or `SIM_SEEDS` from 0
    /// (default 2,000; ci/test.sh runs 50,000).
    fn seeds() -> (u64, u64) {
        if let Ok(seed) = std::env::var("SIM_SEED") {
            return (seed.parse().expect("SIM_SEED is a number"), 1);
        }
        let count = std::env::var("SIM_SEEDS")
            .ok()
            .and_then(|count| count.parse().ok())
            .unwrap_or(2000);
        (0, count)
    }

    #[test]
    fn every_invariant_holds_under_every_explored_schedule() {
        let (first, count) = seeds();
        let mut failures = Vec::new();
        let mut steps = 0;
        for seed in first..first + count {
            match Sim::new(seed).run() {
                Ok(taken) => steps += taken,
                Err(failure) => failures.push(failure),
            }
        }
        eprintln!("{count} seeds, {steps} steps, {} failed", failures.len());
        let mut report = String::new();
        for failure in failures.iter().take(3) {
            let _ = writeln!(report, "{failure}\n");
        }
        let summary: Vec<String> = failures
            .iter()
            .map(|f| {
                format!(
                    "{}: {}",
                    f.seed,
                    f.invariant.split(" (").next().unwrap_or("")
                )
            })
            .collect();
        assert!(
            failures.is_empty(),
            "{} of {count} seeds failed:\n{}\n\n{report}",
            failures.len(),
            summary.join("\n")
        );
    }
}
