//! What `compare` found: the raw figures of every round, their medians and
//! spreads, the decision record's verdict, and the goals; as a terminal
//! table, Markdown, JSON (schema in docs/compare-json.md) and an SVG chart.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use daemoneye_ipc::{Crc32Variant, TransportKind};
use serde::Serialize;

use super::system::{Machine, Placement};
use super::workload::{Latencies, Plan, Throughput};
use super::{Backend, IN_FLIGHT};

/// Bumped whenever a field changes meaning or disappears.
pub const SCHEMA_VERSION: u32 = 1;

/// The decision record's bars.
const LATENCY_BAR: f64 = 1.05;
const THROUGHPUT_BAR: f64 = 1.00;
const MEMORY_BAR: f64 = 1.10;
/// The in-flight level the one-number throughput comparisons use.
pub const REFERENCE_IN_FLIGHT: usize = 8;

/// A goal against a floor: `backend`'s `figure` at `size`, over the
/// floor's, must reach `bar` (at least, or at most).
struct FloorGoal {
    /// Which product backends it applies to (none: every one).
    backends: &'static [TransportKind],
    floor: &'static str,
    size: usize,
    figure: Figure,
    bar: f64,
}

/// A figure a goal is about.
#[derive(Clone, Copy)]
enum Figure {
    LatencyP50,
    TasksPerSecond {
        in_flight: usize,
    },
    ViewTasksPerSecond,
    /// Per-task p50 with a new connection for each task (64 B).
    FreshConnectionP50,
}

impl Figure {
    fn higher_is_better(self) -> bool {
        matches!(
            self,
            Figure::TasksPerSecond { .. } | Figure::ViewTasksPerSecond
        )
    }

    fn describe(self, size: usize) -> String {
        let size = size_label(size);
        match self {
            Figure::LatencyP50 => format!("{size} round trip p50"),
            Figure::TasksPerSecond { in_flight } => {
                format!("{size} tasks/s, {in_flight} in flight")
            }
            Figure::ViewTasksPerSecond => {
                format!("{size} tasks/s, {REFERENCE_IN_FLIGHT} in flight, views")
            }
            Figure::FreshConnectionP50 => "a new connection per 64 B task, p50".to_owned(),
        }
    }
}

/// The goals against the floors, each named by what it measures (figures
/// from one run, not timed tests).
const FLOOR_GOALS: [FloorGoal; 7] = [
    FloorGoal {
        backends: &[TransportKind::Interprocess, TransportKind::Tokio],
        floor: "raw-tokio",
        size: 64,
        figure: Figure::LatencyP50,
        bar: 1.2,
    },
    FloorGoal {
        backends: &[TransportKind::Legacy],
        floor: "raw-std",
        size: 64,
        figure: Figure::LatencyP50,
        bar: 1.5,
    },
    FloorGoal {
        backends: &[],
        floor: "raw-tokio",
        size: 64,
        figure: Figure::TasksPerSecond { in_flight: 1 },
        bar: 0.8,
    },
    FloorGoal {
        backends: &[],
        floor: "raw-std",
        size: 64,
        figure: Figure::TasksPerSecond { in_flight: 32 },
        bar: 1.1,
    },
    FloorGoal {
        backends: &[TransportKind::Interprocess],
        floor: "raw-std",
        size: 64,
        figure: Figure::FreshConnectionP50,
        bar: 1.3,
    },
    FloorGoal {
        backends: &[TransportKind::Legacy],
        floor: "raw-std",
        size: 64,
        figure: Figure::FreshConnectionP50,
        bar: 1.6,
    },
    FloorGoal {
        backends: &[],
        floor: "raw-tokio",
        size: 64 * 1024,
        figure: Figure::ViewTasksPerSecond,
        bar: 0.25,
    },
];

/// Instructions per 64 B task at 8 in flight, at most (`--instructions`):
/// the client's and the server's. Counted, not timed: the same every run.
const INSTRUCTION_GOALS: [(&str, f64); 2] = [("client", 3500.0), ("server", 3000.0)];

// ---- raw figures -------------------------------------------------------------

/// One round of one backend.
#[derive(Debug, Clone, Serialize)]
pub struct RoundFigures {
    pub round: u32,
    /// Server RSS right after it started.
    pub rss_idle_bytes: u64,
    /// Server peak RSS once 16 clients had each made a round trip of the
    /// largest size and stayed connected.
    pub rss_held_peak_bytes: u64,
    /// Connect plus first 64-byte round trip.
    pub connect_p50_ns: u64,
    pub connect_p99_ns: u64,
    /// Tasks per second with a new connection for each (connect, one 64 B
    /// round trip, close), one after another.
    pub fresh_connection_tasks_per_second: f64,
    pub sizes: Vec<SizeFigures>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SizeFigures {
    pub size: usize,
    pub latency_p50_ns: u64,
    /// Absent with fewer than 1000 samples (ten beyond the percentile).
    pub latency_p99_ns: Option<u64>,
    /// Absent with fewer than 10000 samples.
    pub latency_p999_ns: Option<u64>,
    pub latency_samples: u64,
    pub throughput: Vec<ThroughputFigures>,
    /// Product backends: the pipelined run at 8 in flight again, the
    /// results decoded as views (`IpcClient::send_view`).
    pub view_throughput: Option<ThroughputFigures>,
}

impl SizeFigures {
    pub fn new(
        size: usize,
        latency: &Latencies,
        throughput: Vec<ThroughputFigures>,
        view_throughput: Option<ThroughputFigures>,
    ) -> SizeFigures {
        SizeFigures {
            size,
            latency_p50_ns: latency.value_at_quantile(0.50),
            latency_p99_ns: quantile(latency, 0.99),
            latency_p999_ns: quantile(latency, 0.999),
            latency_samples: latency.len(),
            throughput,
            view_throughput,
        }
    }
}

/// The quantile `q`, if there are enough samples for it to mean more than
/// the few slowest: at least ten beyond it (1000 for p99, 10000 for p99.9).
fn quantile(latency: &Latencies, q: f64) -> Option<u64> {
    let needed = (10.0 / (1.0 - q)).round() as u64;
    (latency.len() >= needed).then(|| latency.value_at_quantile(q))
}

#[derive(Debug, Clone, Serialize)]
pub struct ThroughputFigures {
    pub in_flight: usize,
    pub tasks: u64,
    pub elapsed_ns: u64,
    pub tasks_per_second: f64,
    /// Payload bytes (the requested size) per second, 10^6 bytes per MB.
    pub megabytes_per_second: f64,
    /// Server CPU time (user + system) per task.
    pub server_cpu_ns_per_task: f64,
    /// Minor page faults per task in the server and in the client (Linux).
    pub server_minor_faults_per_task: Option<f64>,
    pub client_minor_faults_per_task: Option<f64>,
}

impl ThroughputFigures {
    pub fn new(
        in_flight: usize,
        size: usize,
        run: Throughput,
        server_cpu_ns: u64,
        (server_faults, client_faults): (Option<u64>, Option<u64>),
    ) -> ThroughputFigures {
        let seconds = run.elapsed.as_secs_f64().max(f64::EPSILON);
        let tasks_per_second = run.tasks as f64 / seconds;
        let per_task = |faults: Option<u64>| faults.map(|f| f as f64 / run.tasks.max(1) as f64);
        ThroughputFigures {
            in_flight,
            tasks: run.tasks,
            elapsed_ns: run.elapsed.as_nanos() as u64,
            tasks_per_second,
            megabytes_per_second: tasks_per_second * size as f64 / 1e6,
            server_cpu_ns_per_task: server_cpu_ns as f64 / run.tasks.max(1) as f64,
            server_minor_faults_per_task: per_task(server_faults),
            client_minor_faults_per_task: per_task(client_faults),
        }
    }
}

// ---- summaries ----------------------------------------------------------------

/// A figure over rounds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    fn of(values: impl IntoIterator<Item = f64>) -> Stat {
        let mut values: Vec<f64> = values.into_iter().collect();
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Stat {
            median,
            min: values[0],
            max: values[n - 1],
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendSummary {
    pub rss_idle_bytes: Stat,
    pub rss_held_peak_bytes: Stat,
    pub connect_p50_ns: Stat,
    pub connect_p99_ns: Stat,
    pub fresh_connection_tasks_per_second: Stat,
    pub sizes: Vec<SizeSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SizeSummary {
    pub size: usize,
    pub latency_p50_ns: Stat,
    /// Absent unless every round had enough samples.
    pub latency_p99_ns: Option<Stat>,
    pub latency_p999_ns: Option<Stat>,
    pub throughput: Vec<ThroughputSummary>,
    /// Product backends: tasks per second at 8 in flight, results as views.
    pub view_tasks_per_second: Option<Stat>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ThroughputSummary {
    pub in_flight: usize,
    pub tasks_per_second: Stat,
    pub megabytes_per_second: Stat,
    pub server_cpu_ns_per_task: Stat,
}

impl SizeSummary {
    fn throughput_at(&self, in_flight: usize) -> &ThroughputSummary {
        self.throughput
            .iter()
            .find(|t| t.in_flight == in_flight)
            .expect("every in-flight level is measured")
    }
}

fn summarize(rounds: &[RoundFigures]) -> BackendSummary {
    let stat = |f: &dyn Fn(&RoundFigures) -> f64| Stat::of(rounds.iter().map(f));
    let sizes = rounds[0]
        .sizes
        .iter()
        .enumerate()
        .map(|(i, first)| {
            let size_stat =
                |f: &dyn Fn(&SizeFigures) -> f64| Stat::of(rounds.iter().map(|r| f(&r.sizes[i])));
            let optional_stat = |f: &dyn Fn(&SizeFigures) -> Option<u64>| {
                let values: Option<Vec<f64>> = rounds
                    .iter()
                    .map(|r| f(&r.sizes[i]).map(|v| v as f64))
                    .collect();
                values.map(Stat::of)
            };
            SizeSummary {
                size: first.size,
                latency_p50_ns: size_stat(&|s| s.latency_p50_ns as f64),
                latency_p99_ns: optional_stat(&|s| s.latency_p99_ns),
                latency_p999_ns: optional_stat(&|s| s.latency_p999_ns),
                throughput: first
                    .throughput
                    .iter()
                    .enumerate()
                    .map(|(j, t)| {
                        let t_stat = |f: &dyn Fn(&ThroughputFigures) -> f64| {
                            size_stat(&|s| f(&s.throughput[j]))
                        };
                        ThroughputSummary {
                            in_flight: t.in_flight,
                            tasks_per_second: t_stat(&|t| t.tasks_per_second),
                            megabytes_per_second: t_stat(&|t| t.megabytes_per_second),
                            server_cpu_ns_per_task: t_stat(&|t| t.server_cpu_ns_per_task),
                        }
                    })
                    .collect(),
                view_tasks_per_second: rounds
                    .iter()
                    .map(|r| {
                        r.sizes[i]
                            .view_throughput
                            .as_ref()
                            .map(|t| t.tasks_per_second)
                    })
                    .collect::<Option<Vec<f64>>>()
                    .map(Stat::of),
            }
        })
        .collect();
    BackendSummary {
        rss_idle_bytes: stat(&|r| r.rss_idle_bytes as f64),
        rss_held_peak_bytes: stat(&|r| r.rss_held_peak_bytes as f64),
        connect_p50_ns: stat(&|r| r.connect_p50_ns as f64),
        connect_p99_ns: stat(&|r| r.connect_p99_ns as f64),
        fresh_connection_tasks_per_second: stat(&|r| r.fresh_connection_tasks_per_second),
        sizes,
    }
}

// ---- verdicts -----------------------------------------------------------------

/// How a ratio stands against its bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every round meets the bar.
    Pass,
    /// Some rounds meet the bar and some do not: this run cannot tell.
    WithinNoise,
    /// No round meets the bar.
    Fail,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::WithinNoise => "within noise",
            Outcome::Fail => "FAIL",
        }
    }
}

/// `subject / baseline` of one figure, judged against `bar`, from ratios
/// paired by round: rounds interleave the backends, so round i of each ran
/// back to back, under the same conditions.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ratio {
    /// Median of the per-round ratios.
    pub ratio: f64,
    /// Lowest and highest per-round ratio.
    pub ratio_min: f64,
    pub ratio_max: f64,
    pub bar: f64,
    pub higher_is_better: bool,
    pub outcome: Outcome,
}

impl Ratio {
    fn paired(subject: &[f64], baseline: &[f64], bar: f64, higher_is_better: bool) -> Ratio {
        let ratios = Stat::of(subject.iter().zip(baseline).map(|(s, b)| s / b));
        let meets = |r: f64| if higher_is_better { r >= bar } else { r <= bar };
        // Every round on one side of the bar, or rounds on both sides.
        let outcome = match (meets(ratios.min), meets(ratios.max)) {
            (true, true) => Outcome::Pass,
            (false, false) => Outcome::Fail,
            _ => Outcome::WithinNoise,
        };
        Ratio {
            ratio: ratios.median,
            ratio_min: ratios.min,
            ratio_max: ratios.max,
            bar,
            higher_is_better,
            outcome,
        }
    }

    fn cell(&self) -> String {
        let sign = if self.higher_is_better { ">=" } else { "<=" };
        format!(
            "{:.3} ({} {sign} {:.2})",
            self.ratio,
            self.outcome.label(),
            self.bar
        )
    }
}

/// One product backend against another, per the decision record.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub subject: &'static str,
    pub baseline: &'static str,
    pub sizes: Vec<SizeComparison>,
    /// Peak RSS with 16 clients.
    pub memory: Ratio,
}

impl Comparison {
    /// Every check of the comparison, named.
    fn checks(&self) -> Vec<(String, Ratio)> {
        let mut checks = Vec::new();
        for size in &self.sizes {
            let label = size_label(size.size);
            checks.push((
                format!("{label} latency {:.3}x", size.latency_p50.ratio),
                size.latency_p50,
            ));
            for (in_flight, ratio) in &size.throughput {
                checks.push((
                    format!(
                        "{label} tasks/s at {in_flight} in flight {:.3}x",
                        ratio.ratio
                    ),
                    *ratio,
                ));
            }
        }
        checks.push((format!("RSS {:.3}x", self.memory.ratio), self.memory));
        checks
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SizeComparison {
    pub size: usize,
    /// p50 round trip, one in flight.
    pub latency_p50: Ratio,
    /// Tasks per second, by in-flight level.
    pub throughput: Vec<(usize, Ratio)>,
}

/// A backend's cost over a floor.
#[derive(Debug, Clone, Serialize)]
pub struct Overhead {
    pub backend: &'static str,
    pub floor: &'static str,
    pub size: usize,
    /// p50 latency, backend / floor (1.0 = as fast as the floor).
    pub latency_p50_ratio: f64,
    /// Tasks per second at 8 in flight, backend / floor (1.0 = as fast).
    pub throughput_ratio: f64,
}

/// One of the goals the comparison reports against.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    pub goal: String,
    pub backend: &'static str,
    pub figure: String,
    pub outcome: Outcome,
}

// ---- the report -----------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub struct BackendReport {
    pub name: &'static str,
    pub kind: &'static str,
    pub rounds: Vec<RoundFigures>,
    pub summary: BackendSummary,
    /// Instructions per 64 B task at 8 in flight, counted by callgrind;
    /// `null` unless run with `--instructions` and size 64.
    pub instructions_per_task: Option<PerTaskInstructions>,
}

/// Instructions each side runs per task.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PerTaskInstructions {
    pub client: f64,
    pub server: f64,
}

impl BackendReport {
    /// One figure per round, in round order.
    fn per_round(&self, figure: impl Fn(&RoundFigures) -> f64) -> Vec<f64> {
        self.rounds.iter().map(figure).collect()
    }

    /// p50 latency per round at `size`.
    fn latency(&self, size: usize) -> Option<Vec<f64>> {
        let i = self.rounds[0].sizes.iter().position(|s| s.size == size)?;
        Some(self.per_round(|r| r.sizes[i].latency_p50_ns as f64))
    }

    /// Tasks per second per round at `size` and `in_flight`.
    fn tasks_per_second(&self, size: usize, in_flight: usize) -> Option<Vec<f64>> {
        let i = self.rounds[0].sizes.iter().position(|s| s.size == size)?;
        let j = self.rounds[0].sizes[i]
            .throughput
            .iter()
            .position(|t| t.in_flight == in_flight)?;
        Some(self.per_round(|r| r.sizes[i].throughput[j].tasks_per_second))
    }

    /// Tasks per second per round at `size`, results as views.
    fn view_tasks_per_second(&self, size: usize) -> Option<Vec<f64>> {
        let i = self.rounds[0].sizes.iter().position(|s| s.size == size)?;
        self.rounds
            .iter()
            .map(|r| {
                r.sizes[i]
                    .view_throughput
                    .as_ref()
                    .map(|t| t.tasks_per_second)
            })
            .collect()
    }

    /// `figure` per round at `size`.
    fn figure(&self, figure: Figure, size: usize) -> Option<Vec<f64>> {
        match figure {
            Figure::FreshConnectionP50 => Some(self.per_round(|r| r.connect_p50_ns as f64)),
            Figure::LatencyP50 => self.latency(size),
            Figure::TasksPerSecond { in_flight } => self.tasks_per_second(size, in_flight),
            // A floor has no views: it is compared by its plain figure.
            Figure::ViewTasksPerSecond if self.kind == "floor" => {
                self.tasks_per_second(size, REFERENCE_IN_FLIGHT)
            }
            Figure::ViewTasksPerSecond => self.view_tasks_per_second(size),
        }
    }
}

/// Instructions per task, counted by callgrind (`compare --instructions`).
#[derive(Debug, Clone, Serialize)]
pub struct InstructionCounts {
    pub backend: &'static str,
    pub size: usize,
    pub in_flight: usize,
    /// The client process (this binary's `bench-client`), per task.
    pub client_per_task: f64,
    /// The server process, per task.
    pub server_per_task: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Build {
    pub version: &'static str,
    pub profile: &'static str,
    pub git_commit: Option<String>,
    pub git_dirty: Option<bool>,
    pub compiled_transports: Vec<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub generated_at_unix: u64,
    pub generated_at: String,
    pub command: String,
    pub build: Build,
    pub machine: Machine,
    pub placement: Placement,
    pub plan: Plan,
    pub rounds: u32,
    pub sizes: Vec<usize>,
    pub in_flight_levels: Vec<usize>,
    pub crc32: &'static str,
    pub backends: Vec<BackendReport>,
    pub comparisons: Vec<Comparison>,
    pub overheads: Vec<Overhead>,
    pub goals: Vec<Goal>,
    /// Empty unless run with `--instructions`.
    pub instructions: Vec<InstructionCounts>,
}

impl Report {
    pub fn new(
        command: String,
        placement: Placement,
        plan: Plan,
        rounds: u32,
        sizes: Vec<usize>,
        crc32: Crc32Variant,
        figures: Vec<(Backend, Vec<RoundFigures>)>,
    ) -> Report {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let backends: Vec<BackendReport> = figures
            .into_iter()
            .map(|(backend, rounds)| BackendReport {
                name: backend.name(),
                kind: if backend.is_floor() {
                    "floor"
                } else {
                    "product"
                },
                summary: summarize(&rounds),
                rounds,
                instructions_per_task: None,
            })
            .collect();
        let mut report = Report {
            schema_version: SCHEMA_VERSION,
            generated_at_unix: now,
            generated_at: utc_timestamp(now),
            command,
            build: Build {
                version: env!("CARGO_PKG_VERSION"),
                profile: if cfg!(debug_assertions) {
                    "debug"
                } else {
                    "release"
                },
                // Recorded by build.rs: the commit this binary was built from.
                git_commit: Some(env!("DAEMONEYE_GIT_COMMIT"))
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned),
                git_dirty: env!("DAEMONEYE_GIT_DIRTY").parse().ok(),
                compiled_transports: TransportKind::compiled().map(TransportKind::name).collect(),
            },
            machine: Machine::describe(),
            placement,
            plan,
            rounds,
            sizes,
            in_flight_levels: IN_FLIGHT.to_vec(),
            crc32: crc32.name(),
            backends,
            comparisons: Vec::new(),
            overheads: Vec::new(),
            goals: Vec::new(),
            instructions: Vec::new(),
        };
        report.judge();
        report
    }

    /// Adds the instruction counts of `compare --instructions`, and judges
    /// the goals on them.
    pub fn with_instructions(mut self, counts: Vec<InstructionCounts>) -> Report {
        for backend in &mut self.backends {
            backend.instructions_per_task = counts
                .iter()
                .find(|c| c.backend == backend.name && c.size == 64)
                .map(|c| PerTaskInstructions {
                    client: c.client_per_task,
                    server: c.server_per_task,
                });
        }
        self.instructions = counts;
        self.judge();
        self
    }

    fn backend(&self, name: &str) -> Option<&BackendReport> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// The decision record's comparison (interprocess against each other
    /// product backend), overheads over the floors, and the goals.
    fn judge(&mut self) {
        let products: Vec<&BackendReport> = self
            .backends
            .iter()
            .filter(|b| b.kind == "product")
            .collect();
        let floors: Vec<&BackendReport> =
            self.backends.iter().filter(|b| b.kind == "floor").collect();
        let mut comparisons = Vec::new();
        if let Some(subject) = products
            .iter()
            .find(|b| b.name == TransportKind::Interprocess.name())
        {
            for baseline in products.iter().filter(|b| b.name != subject.name) {
                comparisons.push(compare(subject, baseline, &self.sizes));
            }
        }
        let mut overheads = Vec::new();
        for product in &products {
            for floor in &floors {
                for size in &self.sizes {
                    let (Some(latency), Some(throughput)) = (
                        product.latency(*size).zip(floor.latency(*size)),
                        product
                            .tasks_per_second(*size, REFERENCE_IN_FLIGHT)
                            .zip(floor.tasks_per_second(*size, REFERENCE_IN_FLIGHT)),
                    ) else {
                        continue;
                    };
                    overheads.push(Overhead {
                        backend: product.name,
                        floor: floor.name,
                        size: *size,
                        latency_p50_ratio: Ratio::paired(&latency.0, &latency.1, 1.0, false).ratio,
                        throughput_ratio: Ratio::paired(&throughput.0, &throughput.1, 1.0, true)
                            .ratio,
                    });
                }
            }
        }
        let mut goals = Vec::new();
        for comparison in &comparisons {
            let all: Vec<Outcome> = comparison
                .sizes
                .iter()
                .flat_map(|s| {
                    std::iter::once(s.latency_p50.outcome)
                        .chain(s.throughput.iter().map(|(_, r)| r.outcome))
                })
                .chain(std::iter::once(comparison.memory.outcome))
                .collect();
            goals.push(Goal {
                goal: format!(
                    "parity with {} (the decision record's bars)",
                    comparison.baseline
                ),
                backend: comparison.subject,
                figure: format!(
                    "{}/{} checks pass",
                    all.iter().filter(|o| **o == Outcome::Pass).count(),
                    all.len()
                ),
                outcome: worst(&all),
            });
        }
        for goal in &FLOOR_GOALS {
            for product in &products {
                goals.extend(self.floor_goal(goal, product));
            }
        }
        for (side, most) in INSTRUCTION_GOALS {
            for product in &products {
                let Some(counted) = product.instructions_per_task else {
                    continue;
                };
                let per_task = if side == "client" {
                    counted.client
                } else {
                    counted.server
                };
                goals.push(Goal {
                    goal: format!(
                        "64 B instructions per task, {side}, {REFERENCE_IN_FLIGHT} in flight <= {}",
                        instruction_count(most)
                    ),
                    backend: product.name,
                    figure: instruction_count(per_task),
                    outcome: if per_task <= most {
                        Outcome::Pass
                    } else {
                        Outcome::Fail
                    },
                });
            }
        }
        self.comparisons = comparisons;
        self.overheads = overheads;
        self.goals = goals;
    }

    /// `goal` for `product`, if it applies and both figures were measured.
    fn floor_goal(&self, goal: &FloorGoal, product: &BackendReport) -> Option<Goal> {
        if !goal.backends.is_empty() && !goal.backends.iter().any(|k| k.name() == product.name) {
            return None;
        }
        let higher_is_better = goal.figure.higher_is_better();
        let ratio = Ratio::paired(
            &product.figure(goal.figure, goal.size)?,
            &self.backend(goal.floor)?.figure(goal.figure, goal.size)?,
            goal.bar,
            higher_is_better,
        );
        let sign = if higher_is_better { ">=" } else { "<=" };
        Some(Goal {
            goal: format!(
                "{} {sign} {}x {}",
                goal.figure.describe(goal.size),
                goal.bar,
                goal.floor,
            ),
            backend: product.name,
            figure: format!("{:.2}x", ratio.ratio),
            outcome: ratio.outcome,
        })
    }

    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self).map(|mut json| {
            json.push('\n');
            json
        })
    }

    /// The terminal report: within 100 columns, or every table with
    /// `wide`.
    pub fn to_text(&self, wide: bool) -> String {
        let mut out = if wide {
            self.render(Style::Terminal)
        } else {
            self.render_compact()
        };
        out.push('\n');
        out.push_str(&wrap(&self.verdict(), COLUMNS));
        out
    }

    pub fn to_markdown(&self) -> String {
        let mut out = self.render(Style::Markdown);
        let _ = writeln!(out, "\n**{}**", self.verdict());
        out
    }

    /// One line a reader can quote: interprocess against tokio by the
    /// decision record's bar, and how the goals stand.
    pub fn verdict(&self) -> String {
        let goals = {
            let count = |outcome| self.goals.iter().filter(|g| g.outcome == outcome).count();
            format!(
                "goals: {} pass, {} within noise, {} FAIL",
                count(Outcome::Pass),
                count(Outcome::WithinNoise),
                count(Outcome::Fail)
            )
        };
        let Some(comparison) = self
            .comparisons
            .iter()
            .find(|c| c.baseline == TransportKind::Tokio.name())
        else {
            return format!(
                "Verdict: no interprocess-against-tokio comparison (both backends are needed in \
                 this build and among --backends); {goals}."
            );
        };
        let checks = comparison.checks();
        let failing: Vec<&String> = checks
            .iter()
            .filter(|(_, ratio)| ratio.outcome == Outcome::Fail)
            .map(|(name, _)| name)
            .collect();
        let passing = checks
            .iter()
            .filter(|(_, ratio)| ratio.outcome == Outcome::Pass)
            .count();
        let standing = if !failing.is_empty() {
            format!(
                "not at parity: {} of {} checks fail in every round ({}); the decision record's bar \
                 is not met",
                failing.len(),
                checks.len(),
                failing
                    .iter()
                    .map(|name| name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else if passing < checks.len() {
            format!(
                "parity within noise ({passing} of {} checks pass in every round, none fails in \
                 every round, the others fall on both sides of their bar); this run cannot tell \
                 whether the decision record's bar is met",
                checks.len()
            )
        } else {
            format!(
                "parity ({} of {} checks pass in every round); the decision record's bar is met",
                passing,
                checks.len()
            )
        };
        format!(
            "Verdict: {} vs {}: {standing}; {goals}.",
            comparison.subject, comparison.baseline
        )
    }

    /// How the run was made: rounds, sizes, placement, checksum, build and
    /// machine, as both reports open with it.
    fn run_described(&self) -> String {
        let sizes: Vec<String> = self.sizes.iter().map(|&s| size_label(s)).collect();
        let commit = self
            .build
            .git_commit
            .as_deref()
            .map_or("(no git)", |c| &c[..c.len().min(12)]);
        let dirty = if self.build.git_dirty == Some(true) {
            " (dirty)"
        } else {
            ""
        };
        format!(
            "{} rounds interleaved, sizes {}; {}; crc32 {}; {} build {}{}; {} ({} logical CPUs)",
            self.rounds,
            sizes.join(", "),
            self.placement.description,
            self.crc32,
            self.build.profile,
            commit,
            dirty,
            self.machine.cpu_model,
            self.machine.logical_cpus,
        )
    }

    /// The default terminal report: medians only, the goals and the
    /// verdict, within 100 columns.
    fn render_compact(&self) -> String {
        let mut out = String::new();
        let intro = format!(
            "daemoneye-ipc compare: {}; {}.",
            self.run_described(),
            self.generated_at
        );
        out.push_str(&wrap(&intro, COLUMNS));
        if self.build.profile == "debug" {
            out.push_str(&wrap(
                "WARNING: a debug build; run `cargo run --release --all-features -- compare` for \
                 figures worth reading.",
                COLUMNS,
            ));
        }
        out.push_str(&wrap(
            &format!(
                "Medians over rounds. A goal passes when every round meets it, FAILs when none \
                 does, and is within noise when rounds fall on both sides. Parity (the decision \
                 record's bars): latency <= {LATENCY_BAR}x, tasks/s >= {THROUGHPUT_BAR:.2}x at \
                 every size and in-flight level, RSS <= {MEMORY_BAR}x. --wide (or --markdown \
                 FILE) shows spreads, p99, every in-flight level, views and the cost over the \
                 floors."
            ),
            COLUMNS,
        ));

        let per_backend = || {
            Table::new(
                std::iter::once("size".to_owned())
                    .chain(self.backends.iter().map(|b| b.name.to_owned())),
            )
        };
        let _ = writeln!(out, "\nRound trip p50, one task in flight (us)");
        let mut table = per_backend();
        for (i, size) in self.sizes.iter().enumerate() {
            table.row(
                std::iter::once(size_label(*size)).chain(
                    self.backends
                        .iter()
                        .map(|b| micros(b.summary.sizes[i].latency_p50_ns.median)),
                ),
            );
        }
        out.push_str(&table.render(Style::Terminal));

        let _ = writeln!(out, "\nTasks/s, {REFERENCE_IN_FLIGHT} in flight");
        let mut table = per_backend();
        for (i, size) in self.sizes.iter().enumerate() {
            table.row(
                std::iter::once(size_label(*size)).chain(self.backends.iter().map(|b| {
                    format!(
                        "{:.0}",
                        b.summary.sizes[i]
                            .throughput_at(REFERENCE_IN_FLIGHT)
                            .tasks_per_second
                            .median
                    )
                })),
            );
        }
        out.push_str(&table.render(Style::Terminal));

        let _ = writeln!(
            out,
            "\nNew connection per 64 B task p50 (us); server RSS peak with 16 clients (MiB);\n\
             instructions per 64 B task, {REFERENCE_IN_FLIGHT} in flight, client / server"
        );
        let mut table = Table::new(
            ["backend", "new connection", "RSS peak", "instructions"]
                .into_iter()
                .map(str::to_owned),
        );
        for b in &self.backends {
            table.row([
                b.name.to_owned(),
                micros(b.summary.connect_p50_ns.median),
                format!("{:.1}", b.summary.rss_held_peak_bytes.median / MIB),
                b.instructions_per_task
                    .map_or("- (--instructions)".to_owned(), |counted| {
                        format!(
                            "{} / {}",
                            instruction_count(counted.client),
                            instruction_count(counted.server)
                        )
                    }),
            ]);
        }
        out.push_str(&table.render(Style::Terminal));

        if !self.goals.is_empty() {
            let _ = writeln!(out);
            let mut table = Table::new(["outcome", "backend", "goal: this run"].map(str::to_owned));
            for goal in &self.goals {
                table.row([
                    goal.outcome.label().to_owned(),
                    goal.backend.to_owned(),
                    format!("{}: {}", goal.goal, goal.figure),
                ]);
            }
            out.push_str(&table.render(Style::Terminal));
        }
        out
    }

    fn render(&self, style: Style) -> String {
        let mut out = String::new();
        let heading = |out: &mut String, text: &str| match style {
            Style::Terminal => {
                let _ = writeln!(out, "\n{text}\n{}", "-".repeat(text.chars().count()));
            }
            Style::Markdown => {
                let _ = writeln!(out, "\n### {text}\n");
            }
        };
        match style {
            Style::Terminal => {
                let _ = writeln!(out, "daemoneye-ipc compare");
            }
            Style::Markdown => {
                let _ = writeln!(out, "## daemoneye-ipc compare");
            }
        }
        let _ = writeln!(out, "\n{}, {}", self.run_described(), self.generated_at);
        if self.build.profile == "debug" {
            let _ = writeln!(
                out,
                "\nWARNING: a debug build; run `cargo run --release -- compare` for figures worth reading."
            );
        }
        let _ = writeln!(
            out,
            "Figures are medians over rounds, [min-max] across rounds. Ratios pair each round of one \
             backend with the same round of the other (they ran back to back): `pass` when every \
             round meets the bar, `FAIL` when none does, `within noise` when rounds fall on both \
             sides. A percentile needs ten samples beyond it, else it shows as -."
        );

        heading(
            &mut out,
            "Round-trip latency, one task in flight (p50 / p99 / p99.9, microseconds)",
        );
        let mut table = Table::new(
            std::iter::once("size".to_owned())
                .chain(self.backends.iter().map(|b| b.name.to_owned())),
        );
        for (i, size) in self.sizes.iter().enumerate() {
            table.row(
                std::iter::once(size_label(*size)).chain(self.backends.iter().map(|b| {
                    let s = &b.summary.sizes[i];
                    format!(
                        "{} / {} / {}",
                        micros_with_spread(s.latency_p50_ns),
                        optional_micros(s.latency_p99_ns),
                        optional_micros(s.latency_p999_ns)
                    )
                })),
            );
        }
        out.push_str(&table.render(style));

        heading(&mut out, "Pipelined throughput (tasks/s, MB/s of payload)");
        let mut table = Table::new(
            ["size", "in flight"]
                .into_iter()
                .map(str::to_owned)
                .chain(self.backends.iter().map(|b| b.name.to_owned())),
        );
        for (i, size) in self.sizes.iter().enumerate() {
            for in_flight in IN_FLIGHT {
                table.row(
                    [size_label(*size), in_flight.to_string()]
                        .into_iter()
                        .chain(self.backends.iter().map(|b| {
                            let t = b.summary.sizes[i].throughput_at(in_flight);
                            format!(
                                "{} ({:.0} MB/s)",
                                count_with_spread(t.tasks_per_second),
                                t.megabytes_per_second.median
                            )
                        })),
                );
            }
        }
        out.push_str(&table.render(style));

        let products: Vec<&BackendReport> = self
            .backends
            .iter()
            .filter(|b| b.kind == "product")
            .collect();
        if !products.is_empty() {
            heading(
                &mut out,
                &format!(
                    "Results as views (IpcClient::send_view), {REFERENCE_IN_FLIGHT} in flight: tasks/s (with send, as above)"
                ),
            );
            let mut table = Table::new(
                std::iter::once("size".to_owned())
                    .chain(products.iter().map(|b| b.name.to_owned())),
            );
            for (i, size) in self.sizes.iter().enumerate() {
                table.row(
                    std::iter::once(size_label(*size)).chain(products.iter().map(|b| {
                        let s = &b.summary.sizes[i];
                        match s.view_tasks_per_second {
                            Some(views) => format!(
                                "{} ({:.0})",
                                count_with_spread(views),
                                s.throughput_at(REFERENCE_IN_FLIGHT).tasks_per_second.median
                            ),
                            None => "-".to_owned(),
                        }
                    })),
                );
            }
            out.push_str(&table.render(style));
        }

        heading(
            &mut out,
            "A new connection per task (connect + one 64 B round trip + close), and server resources",
        );
        let mut table = Table::new(
            [
                "backend",
                "per task p50 (us)",
                "p99 (us)",
                "tasks/s",
                "reusing one connection (64 B, 1 in flight)",
                "RSS idle",
                "RSS peak, 16 clients",
                "server CPU per task (8 in flight)",
            ]
            .into_iter()
            .map(str::to_owned),
        );
        for b in &self.backends {
            let cpu: Vec<String> = b
                .summary
                .sizes
                .iter()
                .map(|s| {
                    format!(
                        "{} {}",
                        size_label(s.size),
                        micros(
                            s.throughput_at(REFERENCE_IN_FLIGHT)
                                .server_cpu_ns_per_task
                                .median
                        )
                    )
                })
                .collect();
            let fresh = b.summary.fresh_connection_tasks_per_second;
            let reused =
                b.summary
                    .sizes
                    .iter()
                    .find(|s| s.size == 64)
                    .map_or("-".to_owned(), |s| {
                        let reused = s.throughput_at(1).tasks_per_second.median;
                        format!("{reused:.0} tasks/s ({:.1}x)", reused / fresh.median)
                    });
            table.row([
                b.name.to_owned(),
                micros_with_spread(b.summary.connect_p50_ns),
                micros(b.summary.connect_p99_ns.median),
                count_with_spread(fresh),
                reused,
                mib_with_spread(b.summary.rss_idle_bytes),
                mib_with_spread(b.summary.rss_held_peak_bytes),
                cpu.join(", "),
            ]);
        }
        out.push_str(&table.render(style));

        heading(
            &mut out,
            &format!(
                "Instructions per task (callgrind, {REFERENCE_IN_FLIGHT} in flight): client / server"
            ),
        );
        if self.instructions.is_empty() {
            let _ = writeln!(
                out,
                "Not measured: run with --instructions (needs valgrind) to count them."
            );
        } else {
            let mut table = Table::new(
                std::iter::once("size".to_owned())
                    .chain(self.backends.iter().map(|b| b.name.to_owned())),
            );
            for size in &self.sizes {
                table.row(
                    std::iter::once(size_label(*size)).chain(self.backends.iter().map(|b| {
                        self.instructions
                            .iter()
                            .find(|c| c.backend == b.name && c.size == *size)
                            .map_or("-".to_owned(), |c| {
                                format!(
                                    "{} / {}",
                                    instruction_count(c.client_per_task),
                                    instruction_count(c.server_per_task)
                                )
                            })
                    })),
                );
            }
            out.push_str(&table.render(style));
        }

        for comparison in &self.comparisons {
            heading(
                &mut out,
                &format!(
                    "Verdict: {} against {} (decision record: latency <= {LATENCY_BAR}, throughput >= {THROUGHPUT_BAR:.2}, memory <= {MEMORY_BAR})",
                    comparison.subject, comparison.baseline
                ),
            );
            let mut table = Table::new(
                std::iter::once("size".to_owned())
                    .chain(std::iter::once("latency p50 ratio".to_owned()))
                    .chain(
                        IN_FLIGHT
                            .iter()
                            .map(|k| format!("throughput ratio, {k} in flight")),
                    ),
            );
            for size in &comparison.sizes {
                table.row(
                    [size_label(size.size), size.latency_p50.cell()]
                        .into_iter()
                        .chain(size.throughput.iter().map(|(_, r)| r.cell())),
                );
            }
            out.push_str(&table.render(style));
            let _ = writeln!(
                out,
                "\nMemory (peak RSS with 16 clients) ratio: {}",
                comparison.memory.cell()
            );
        }
        if self.comparisons.is_empty() {
            heading(&mut out, "Verdict");
            let _ = writeln!(
                out,
                "Needs the interprocess backend and another product backend in one build and among --backends."
            );
        }

        if !self.overheads.is_empty() {
            heading(
                &mut out,
                "Cost over the floors (backend / floor: p50 latency; tasks/s at 8 in flight)",
            );
            let mut table = Table::new(
                ["backend", "floor", "size", "latency", "throughput"]
                    .into_iter()
                    .map(str::to_owned),
            );
            for o in &self.overheads {
                table.row([
                    o.backend.to_owned(),
                    o.floor.to_owned(),
                    size_label(o.size),
                    format!("{:.2}x", o.latency_p50_ratio),
                    format!("{:.2}x", o.throughput_ratio),
                ]);
            }
            out.push_str(&table.render(style));
        }

        if !self.goals.is_empty() {
            heading(&mut out, "Goals");
            let mut table = Table::new(
                ["goal", "backend", "figure", "outcome"]
                    .into_iter()
                    .map(str::to_owned),
            );
            for g in &self.goals {
                table.row([
                    g.goal.clone(),
                    g.backend.to_owned(),
                    g.figure.clone(),
                    g.outcome.label().to_owned(),
                ]);
            }
            out.push_str(&table.render(style));
        }
        out
    }

    /// p50 and p99 latency, and throughput at 8 in flight, per backend and
    /// size (log scales).
    pub fn write_svg(&self, path: &Path) -> Result<(), String> {
        use plotters::prelude::*;

        let root = SVGBackend::new(path, (1280, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let title = format!(
            "daemoneye-ipc compare: {} rounds, {}",
            self.rounds, self.placement.description
        );
        let root = root
            .titled(&title, ("sans-serif", 18))
            .map_err(|e| e.to_string())?;
        let (left, right) = root.split_horizontally(640);
        let points = |figure: &dyn Fn(&SizeSummary) -> Option<f64>| -> Vec<Vec<(f64, f64)>> {
            self.backends
                .iter()
                .map(|b| {
                    b.summary
                        .sizes
                        .iter()
                        .enumerate()
                        .filter_map(|(i, s)| Some((i as f64, figure(s)?)))
                        .collect()
                })
                .collect()
        };
        let latency = Panel {
            caption: "round trip, one in flight (us): p50 solid, p99 thin".to_owned(),
            y_desc: "microseconds",
            main: points(&|s| Some(s.latency_p50_ns.median / 1000.0)),
            thin: points(&|s| Some(s.latency_p99_ns?.median / 1000.0)),
        };
        let throughput = Panel {
            caption: format!("throughput, {REFERENCE_IN_FLIGHT} in flight (MB/s of payload)"),
            y_desc: "MB/s",
            main: points(&|s| {
                Some(
                    s.throughput_at(REFERENCE_IN_FLIGHT)
                        .megabytes_per_second
                        .median,
                )
            }),
            thin: Vec::new(),
        };
        let names: Vec<&str> = self.backends.iter().map(|b| b.name).collect();
        latency.draw(&left, &names, &self.sizes)?;
        throughput.draw(&right, &names, &self.sizes)?;
        root.present().map_err(|e| e.to_string())
    }
}

/// One chart of the SVG: a line per backend across the sizes (log scale),
/// optionally a thinner second line per backend.
struct Panel {
    caption: String,
    y_desc: &'static str,
    /// Per backend, (size index, value) points.
    main: Vec<Vec<(f64, f64)>>,
    thin: Vec<Vec<(f64, f64)>>,
}

impl Panel {
    fn draw<DB: plotters::prelude::DrawingBackend>(
        &self,
        area: &plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
        names: &[&'static str],
        sizes: &[usize],
    ) -> Result<(), String> {
        use plotters::prelude::*;

        let palette = [
            RGBColor(31, 119, 180),
            RGBColor(214, 39, 40),
            RGBColor(44, 160, 44),
            RGBColor(148, 103, 189),
            RGBColor(255, 127, 14),
        ];
        let error = |e: &dyn std::fmt::Display| e.to_string();
        let values: Vec<f64> = self
            .main
            .iter()
            .chain(&self.thin)
            .flatten()
            .map(|&(_, v)| v)
            .collect();
        let (lo, hi) = bounds(&values);
        let labels: Vec<String> = sizes.iter().map(|&s| size_label(s)).collect();
        let x_label = |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        let mut chart = ChartBuilder::on(area)
            .caption(&self.caption, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(-0.3f64..(sizes.len() as f64 - 0.7), (lo..hi).log_scale())
            .map_err(|e| error(&e))?;
        chart
            .configure_mesh()
            .x_labels(sizes.len() * 4)
            .x_label_formatter(&x_label)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .y_desc(self.y_desc)
            .x_desc("payload size")
            .draw()
            .map_err(|e| error(&e))?;
        for (i, (name, color)) in names.iter().zip(palette.iter().cycle()).enumerate() {
            let main = self.main[i].clone();
            chart
                .draw_series(LineSeries::new(main.clone(), color.stroke_width(3)))
                .map_err(|e| error(&e))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
            chart
                .draw_series(main.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| error(&e))?;
            if let Some(thin) = self.thin.get(i) {
                chart
                    .draw_series(LineSeries::new(thin.clone(), color.stroke_width(1)))
                    .map_err(|e| error(&e))?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| error(&e))
    }
}

fn compare(subject: &BackendReport, baseline: &BackendReport, sizes: &[usize]) -> Comparison {
    let sizes = sizes
        .iter()
        .filter_map(|&size| {
            Some(SizeComparison {
                size,
                latency_p50: Ratio::paired(
                    &subject.latency(size)?,
                    &baseline.latency(size)?,
                    LATENCY_BAR,
                    false,
                ),
                throughput: IN_FLIGHT
                    .iter()
                    .map(|&k| {
                        let ratio = Ratio::paired(
                            &subject.tasks_per_second(size, k)?,
                            &baseline.tasks_per_second(size, k)?,
                            THROUGHPUT_BAR,
                            true,
                        );
                        Some((k, ratio))
                    })
                    .collect::<Option<_>>()?,
            })
        })
        .collect();
    let memory = |b: &BackendReport| b.per_round(|r| r.rss_held_peak_bytes as f64);
    Comparison {
        subject: subject.name,
        baseline: baseline.name,
        sizes,
        memory: Ratio::paired(&memory(subject), &memory(baseline), MEMORY_BAR, false),
    }
}

fn worst(outcomes: &[Outcome]) -> Outcome {
    if outcomes.contains(&Outcome::Fail) {
        Outcome::Fail
    } else if outcomes.contains(&Outcome::WithinNoise) {
        Outcome::WithinNoise
    } else {
        Outcome::Pass
    }
}

/// Log-scale bounds around `values`, with some air.
fn bounds(values: &[f64]) -> (f64, f64) {
    let lo = values
        .iter()
        .copied()
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(0.0, f64::max);
    if !lo.is_finite() || hi <= 0.0 {
        return (0.1, 10.0);
    }
    (lo / 1.5, hi * 1.5)
}

/// The terminal report's width, by default.
const COLUMNS: usize = 100;

const MIB: f64 = 1024.0 * 1024.0;

/// `text` as lines of at most `width` columns, broken at spaces (a word
/// longer than that stands alone).
fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            out.push_str(&line);
            out.push('\n');
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// `64 B`, `1 KiB`, `64 KiB`, `1 MiB`.
pub fn size_label(size: usize) -> String {
    if size >= 1 << 20 && size.is_multiple_of(1 << 20) {
        format!("{} MiB", size >> 20)
    } else if size >= 1024 && size.is_multiple_of(1024) {
        format!("{} KiB", size >> 10)
    } else {
        format!("{size} B")
    }
}

/// An instruction count, in thousands or millions.
fn instruction_count(count: f64) -> String {
    if count >= 1e6 {
        format!("{:.2}M", count / 1e6)
    } else {
        format!("{:.1}k", count / 1e3)
    }
}

fn micros(ns: f64) -> String {
    let us = ns / 1000.0;
    if us >= 100.0 {
        format!("{us:.0}")
    } else {
        format!("{us:.1}")
    }
}

/// A percentile there were too few samples for shows as "-".
fn optional_micros(stat: Option<Stat>) -> String {
    stat.map_or_else(|| "-".to_owned(), |stat| micros(stat.median))
}

fn micros_with_spread(stat: Stat) -> String {
    format!(
        "{} [{}-{}]",
        micros(stat.median),
        micros(stat.min),
        micros(stat.max)
    )
}

fn count_with_spread(stat: Stat) -> String {
    format!("{:.0} [{:.0}-{:.0}]", stat.median, stat.min, stat.max)
}

fn mib_with_spread(stat: Stat) -> String {
    let mib = |b: f64| b / (1024.0 * 1024.0);
    format!(
        "{:.1} MiB [{:.1}-{:.1}]",
        mib(stat.median),
        mib(stat.min),
        mib(stat.max)
    )
}

/// `2026-11-29T20:15:00Z` from Unix seconds (civil-from-days).
fn utc_timestamp(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let seconds = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

#[derive(Clone, Copy)]
enum Style {
    Terminal,
    Markdown,
}

/// Columns aligned for the terminal, or a Markdown table.
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: impl IntoIterator<Item = String>) -> Table {
        Table {
            header: header.into_iter().collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: impl IntoIterator<Item = String>) {
        self.rows.push(cells.into_iter().collect());
    }

    fn render(&self, style: Style) -> String {
        let mut out = String::new();
        match style {
            Style::Markdown => {
                let _ = writeln!(out, "| {} |", self.header.join(" | "));
                let _ = writeln!(out, "|{}", "---|".repeat(self.header.len()));
                for row in &self.rows {
                    let _ = writeln!(out, "| {} |", row.join(" | "));
                }
            }
            Style::Terminal => {
                let widths: Vec<usize> = (0..self.header.len())
                    .map(|c| {
                        std::iter::once(&self.header)
                            .chain(&self.rows)
                            .map(|row| row.get(c).map_or(0, |cell| cell.chars().count()))
                            .max()
                            .unwrap_or(0)
                    })
                    .collect();
                for row in std::iter::once(&self.header).chain(&self.rows) {
                    let line: Vec<String> = row
                        .iter()
                        .zip(&widths)
                        .map(|(cell, width)| format!("{cell:<width$}"))
                        .collect();
                    let _ = writeln!(out, "{}", line.join("  ").trim_end());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_ratios_pass_fail_or_admit_noise() {
        // Lower is better (latency), bar 1.05.
        let pass = Ratio::paired(&[10.2, 10.3, 10.0], &[10.0, 10.0, 10.0], 1.05, false);
        assert_eq!(pass.outcome, Outcome::Pass);
        assert!(
            (pass.ratio - 1.02).abs() < 1e-9,
            "the median of the per-round ratios"
        );
        // Rounds on both sides of the bar: this run cannot tell.
        let noise = Ratio::paired(&[10.0, 11.0, 12.0], &[10.0, 10.0, 10.0], 1.05, false);
        assert_eq!(noise.outcome, Outcome::WithinNoise);
        assert_eq!((noise.ratio_min, noise.ratio_max), (1.0, 1.2));
        // Every round worse than the bar.
        let fail = Ratio::paired(&[15.0, 14.0, 16.0], &[10.0, 10.0, 10.0], 1.05, false);
        assert_eq!(fail.outcome, Outcome::Fail);
        // Higher is better (throughput): pairing by round cancels a slow round
        // that slowed both backends alike.
        let paired = Ratio::paired(&[100.0, 50.0, 101.0], &[99.0, 49.0, 100.0], 1.0, true);
        assert_eq!(paired.outcome, Outcome::Pass);
    }

    #[test]
    fn medians_and_spreads() {
        let s = Stat::of([3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Stat::of([1.0, 2.0, 3.0, 10.0]).median, 2.5);
    }

    /// One round of a backend at 64 B: `latency_us` round trip p50, the
    /// same tasks/s at every in-flight level, `connect_us` per new
    /// connection.
    fn round(latency_us: u64, tasks_per_second: f64, connect_us: u64) -> RoundFigures {
        RoundFigures {
            round: 0,
            rss_idle_bytes: 8 << 20,
            rss_held_peak_bytes: 10 << 20,
            connect_p50_ns: connect_us * 1000,
            connect_p99_ns: connect_us * 1000,
            fresh_connection_tasks_per_second: 1e6 / connect_us as f64,
            sizes: vec![SizeFigures {
                size: 64,
                latency_p50_ns: latency_us * 1000,
                latency_p99_ns: None,
                latency_p999_ns: None,
                latency_samples: 100,
                throughput: IN_FLIGHT
                    .map(|in_flight| ThroughputFigures {
                        in_flight,
                        tasks: 1000,
                        elapsed_ns: 1,
                        tasks_per_second,
                        megabytes_per_second: 0.0,
                        server_cpu_ns_per_task: 0.0,
                        server_minor_faults_per_task: None,
                        client_minor_faults_per_task: None,
                    })
                    .to_vec(),
                view_throughput: None,
            }],
        }
    }

    fn synthetic(interprocess: RoundFigures, tokio: RoundFigures) -> Report {
        let placement = Placement {
            pin: super::super::system::Pin::None,
            client_cpu: None,
            server_cpu: None,
            description: "not pinned".to_owned(),
        };
        Report::new(
            "compare".to_owned(),
            placement,
            super::super::workload::Plan::quick(),
            1,
            vec![64],
            Crc32Variant::Ieee,
            vec![
                (
                    Backend::Product(TransportKind::Interprocess),
                    vec![interprocess],
                ),
                (Backend::Product(TransportKind::Tokio), vec![tokio]),
                (Backend::RawStd, vec![round(10, 100_000.0, 50)]),
                (Backend::RawTokio, vec![round(15, 80_000.0, 45)]),
            ],
        )
    }

    #[test]
    fn goals_are_named_by_what_they_measure_and_judged_on_the_floors() {
        let report = synthetic(round(17, 90_000.0, 60), round(17, 90_000.0, 60));
        let goal = |name: &str, backend: &str| {
            report
                .goals
                .iter()
                .find(|g| g.goal == name && g.backend == backend)
                .unwrap_or_else(|| panic!("no goal {name:?} for {backend}: {:?}", report.goals))
        };
        // 17 against raw-tokio's 15 us: 1.13x, within 1.2x.
        let latency = goal("64 B round trip p50 <= 1.2x raw-tokio", "interprocess");
        assert_eq!(
            (latency.outcome, latency.figure.as_str()),
            (Outcome::Pass, "1.13x")
        );
        // 60 against raw-std's 50 us per new connection: 1.2x, within 1.3x.
        let fresh = goal(
            "a new connection per 64 B task, p50 <= 1.3x raw-std",
            "interprocess",
        );
        assert_eq!(fresh.outcome, Outcome::Pass);
        // 90k against raw-std's 100k at 32 in flight: 0.9x, short of 1.1x.
        let pipelined = goal("64 B tasks/s, 32 in flight >= 1.1x raw-std", "tokio");
        assert_eq!(pipelined.outcome, Outcome::Fail);
        assert!(
            report.goals.iter().all(|g| !g.goal.contains('#')),
            "no issue numbers: {:?}",
            report.goals
        );
    }

    #[test]
    fn instruction_counts_go_in_the_json_per_backend_and_are_goals() {
        let counted = |backend: &'static str, client: f64, server: f64| InstructionCounts {
            backend,
            size: 64,
            in_flight: REFERENCE_IN_FLIGHT,
            client_per_task: client,
            server_per_task: server,
        };
        let report =
            synthetic(round(17, 90_000.0, 60), round(17, 90_000.0, 60)).with_instructions(vec![
                counted("interprocess", 3400.0, 3100.0),
                counted("tokio", 9000.0, 2900.0),
            ]);
        let json: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
        let interprocess = &json["backends"][0];
        assert_eq!(interprocess["name"], "interprocess");
        assert_eq!(interprocess["instructions_per_task"]["client"], 3400.0);
        assert_eq!(interprocess["instructions_per_task"]["server"], 3100.0);
        assert!(
            json["backends"][2]["instructions_per_task"].is_null(),
            "not counted"
        );
        let outcome = |side: &str, backend: &str| {
            report
                .goals
                .iter()
                .find(|g| g.backend == backend && g.goal.contains(&format!("per task, {side},")))
                .map(|g| g.outcome)
        };
        assert_eq!(outcome("client", "interprocess"), Some(Outcome::Pass));
        assert_eq!(outcome("server", "interprocess"), Some(Outcome::Fail));
        assert_eq!(outcome("client", "tokio"), Some(Outcome::Fail));
        assert_eq!(outcome("server", "tokio"), Some(Outcome::Pass));
    }

    #[test]
    fn the_report_fits_in_100_columns_and_ends_with_one_verdict() {
        let report = synthetic(round(17, 90_000.0, 60), round(17, 90_000.0, 60));
        let text = report.to_text(false);
        for line in text.lines() {
            assert!(
                line.chars().count() <= COLUMNS,
                "{} columns: {line}",
                line.chars().count()
            );
        }
        let verdict = report.verdict();
        assert!(
            verdict.starts_with("Verdict: interprocess vs tokio: parity (")
                && verdict.contains("the decision record's bar is met"),
            "{verdict}"
        );
        assert!(
            text.trim_end()
                .ends_with(verdict.split_whitespace().last().unwrap())
        );
        // Slower in the one round: every check fails, and the verdict says so.
        let slower = synthetic(round(25, 60_000.0, 60), round(17, 90_000.0, 60));
        let verdict = slower.verdict();
        assert!(
            verdict.contains("not at parity") && verdict.contains("is not met"),
            "{verdict}"
        );
    }

    #[test]
    fn labels_and_timestamps() {
        assert_eq!(size_label(64), "64 B");
        assert_eq!(size_label(1024), "1 KiB");
        assert_eq!(size_label(65536), "64 KiB");
        assert_eq!(size_label(1 << 20), "1 MiB");
        assert_eq!(size_label(1500), "1500 B");
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(1_764_441_600), "2025-11-29T18:40:00Z");
    }
}
