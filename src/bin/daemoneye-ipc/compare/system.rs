//! What the comparison asks of the OS: CPU placement, and a process's memory
//! and CPU time from the OS's own accounting.

use serde::Serialize;

/// Where the client (this process) and the servers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pin {
    /// Client and server on one CPU: no cross-CPU wake-ups, the steadiest
    /// figures on small VMs.
    Same,
    /// Client and server on two different CPUs.
    Split,
    /// Wherever the scheduler puts them.
    None,
}

impl Pin {
    /// `same` where pinning is supported (Linux), `none` elsewhere.
    pub fn default_for_os() -> Pin {
        if cfg!(any(target_os = "linux", target_os = "android")) {
            Pin::Same
        } else {
            Pin::None
        }
    }
}

/// The placement actually used.
#[derive(Debug, Clone, Serialize)]
pub struct Placement {
    pub pin: Pin,
    /// CPU the client runs on, when pinned.
    pub client_cpu: Option<usize>,
    /// CPU the servers run on, when pinned.
    pub server_cpu: Option<usize>,
    /// A sentence for the report.
    pub description: String,
}

impl Placement {
    /// Chooses CPUs for `pin` and pins this process's calling thread (call
    /// before starting any other thread, so everything inherits it).
    pub fn apply(pin: Pin) -> Result<Placement, String> {
        if pin == Pin::None {
            return Ok(Placement {
                pin,
                client_cpu: None,
                server_cpu: None,
                description: "unpinned: client and servers go where the scheduler puts them"
                    .to_owned(),
            });
        }
        imp::pin(pin)
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod imp {
    use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};

    use super::{Pin, Placement};

    pub fn pin(pin: Pin) -> Result<Placement, String> {
        let allowed =
            sched_getaffinity(None).map_err(|e| format!("cannot read the CPU affinity: {e}"))?;
        let cpus: Vec<usize> = (0..CpuSet::MAX_CPU)
            .filter(|&cpu| allowed.is_set(cpu))
            .collect();
        let (client, server) = match (pin, cpus.as_slice()) {
            (Pin::Same, [first, ..]) => (*first, *first),
            (Pin::Split, [first, second, ..]) => (*first, *second),
            (Pin::Split, _) => {
                return Err("--pin split needs two CPUs; this process may use one".to_owned());
            }
            _ => return Err("no CPU is available to this process".to_owned()),
        };
        pin_current_thread(client)?;
        let description = match pin {
            Pin::Same => format!("pinned: client and server on CPU {client} (sched_setaffinity)"),
            _ => format!(
                "pinned: client on CPU {client}, server on CPU {server} (sched_setaffinity)"
            ),
        };
        Ok(Placement {
            pin,
            client_cpu: Some(client),
            server_cpu: Some(server),
            description,
        })
    }

    /// Pins the calling thread (and the threads it starts later) to `cpu`.
    pub fn pin_current_thread(cpu: usize) -> Result<(), String> {
        let mut set = CpuSet::new();
        set.set(cpu);
        sched_setaffinity(None, &set).map_err(|e| format!("cannot pin to CPU {cpu}: {e}"))
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod imp {
    use super::{Pin, Placement};

    pub fn pin(pin: Pin) -> Result<Placement, String> {
        Err(format!(
            "--pin {} is not supported on this OS (pinning uses Linux's sched_setaffinity); use --pin none",
            match pin {
                Pin::Same => "same",
                Pin::Split => "split",
                Pin::None => "none",
            }
        ))
    }

    pub fn pin_current_thread(_cpu: usize) -> Result<(), String> {
        Err("pinning is not supported on this OS".to_owned())
    }
}

pub use imp::pin_current_thread;

/// A process's resident memory, CPU time and page faults, read from the OS.
pub struct ProcessProbe {
    pid: u32,
    system: sysinfo::System,
}

impl ProcessProbe {
    pub fn new(pid: u32) -> ProcessProbe {
        ProcessProbe {
            pid,
            system: sysinfo::System::new(),
        }
    }

    fn refresh(&mut self) -> Result<&sysinfo::Process, String> {
        let pid = sysinfo::Pid::from_u32(self.pid);
        let kind = sysinfo::ProcessRefreshKind::nothing()
            .with_memory()
            .with_cpu();
        self.system.refresh_processes_specifics(
            sysinfo::ProcessesToUpdate::Some(&[pid]),
            true,
            kind,
        );
        self.system
            .process(pid)
            .ok_or_else(|| format!("process {} is gone: cannot read its memory", self.pid))
    }

    /// Resident set size now, in bytes.
    pub fn rss(&mut self) -> Result<u64, String> {
        self.refresh().map(sysinfo::Process::memory)
    }

    /// Peak resident set size since the process started, in bytes, where
    /// the OS keeps one (Linux `VmHWM`); elsewhere the current RSS, which
    /// callers sample at the busiest moment.
    pub fn peak_rss(&mut self) -> Result<u64, String> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Some(peak) = linux::status_kib(self.pid, "VmHWM:") {
            return Ok(peak * 1024);
        }
        self.rss()
    }

    /// Minor page faults so far (Linux; `None` elsewhere).
    pub fn minor_faults(&self) -> Option<u64> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            linux::minor_faults(self.pid)
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            None
        }
    }

    /// CPU time (user + system) used so far, in nanoseconds: Linux sums the
    /// threads' scheduler statistics (nanosecond resolution, so callers read
    /// it while the threads they measure still exist); elsewhere the OS's
    /// millisecond accounting. One source per platform, never mixed.
    pub fn cpu_time_ns(&mut self) -> u64 {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            linux::cpu_time_ns(self.pid)
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            self.refresh()
                .map_or(0, |p| p.accumulated_cpu_time() * 1_000_000)
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod linux {
    /// A `kB` field of /proc/PID/status.
    pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// Field 10 of /proc/PID/stat, after the parenthesised command name.
    pub fn minor_faults(pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after_name = &stat[stat.rfind(')')? + 2..];
        after_name.split_whitespace().nth(7)?.parse().ok()
    }

    /// Sum over the process's live threads of the time spent on a CPU
    /// (/proc/PID/task/TID/schedstat, first field, nanoseconds). A thread
    /// that exits between the listing and the read is skipped.
    pub fn cpu_time_ns(pid: u32) -> u64 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return 0;
        };
        tasks
            .flatten()
            .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
            .filter_map(|schedstat| schedstat.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
}

/// The machine, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub os: String,
    pub kernel: String,
    pub arch: &'static str,
    pub cpu_model: String,
    pub logical_cpus: usize,
    pub memory_bytes: u64,
    pub hostname: String,
}

impl Machine {
    pub fn describe() -> Machine {
        use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        Machine {
            os: System::long_os_version().unwrap_or_else(|| std::env::consts::OS.to_owned()),
            kernel: System::kernel_version().unwrap_or_default(),
            arch: std::env::consts::ARCH,
            cpu_model: system
                .cpus()
                .first()
                .map(|cpu| cpu.brand().trim().to_owned())
                .unwrap_or_default(),
            logical_cpus: system.cpus().len(),
            memory_bytes: system.total_memory(),
            hostname: System::host_name().unwrap_or_default(),
        }
    }
}
