//! Server counters: updated lock-free on the hot path, read as a consistent
//! enough [`ServerStats`] snapshot by [`IpcServer::stats`](crate::IpcServer::stats).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::IpcError;

/// A snapshot of a server's counters since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ServerStats {
    /// The backend serving (`interprocess`, `tokio`, `legacy`).
    pub transport: &'static str,
    /// Connections handed over by the OS, whether served or rejected.
    pub accepted: u64,
    /// Connections closed because no slot freed within `accept_timeout_ms`.
    pub rejected_limit: u64,
    /// Connections refused because of the peer's credentials.
    pub rejected_peer: u64,
    /// Connections being served now.
    pub active: u64,
    /// The most connections served at once since the server started: never
    /// more than `max_connections`.
    pub active_peak: u64,
    /// Frames received (tasks).
    pub frames_in: u64,
    /// Frames sent (results).
    pub frames_out: u64,
    /// Bytes received, headers included.
    pub bytes_in: u64,
    /// Bytes sent, headers included.
    pub bytes_out: u64,
    /// Frames whose checksum did not match.
    pub crc_errors: u64,
    /// Frames whose header announced more than `max_frame_bytes`.
    pub oversize_frames: u64,
    /// Frames that passed the checksum but were not a `DetectionTask`.
    pub malformed_frames: u64,
    /// Connections that ended in the middle of a frame.
    pub truncated_frames: u64,
    /// Connections closed for a read deadline (idle or a slow frame).
    pub read_timeouts: u64,
    /// Connections closed for a write deadline.
    pub write_timeouts: u64,
    /// Results too large for `max_frame_bytes`, answered with an error instead.
    pub oversize_results: u64,
    /// Tasks whose handler panicked (answered with an error result).
    pub handler_errors: u64,
    /// Tasks whose handler did not finish within `task_timeout_ms`
    /// (answered with an error result, their work stopped).
    pub task_timeouts: u64,
    /// Failed `accept` calls (each followed by a backoff).
    pub accept_errors: u64,
    /// Bytes reserved now for tasks in flight, every connection together:
    /// each task's frame and room for its result until the result is
    /// encoded, then the result until it is written. Never more than the
    /// server's `max_bytes_in_flight`.
    pub bytes_held: u64,
    /// Times a connection stopped reading to wait for room in the server's
    /// budget of bytes for tasks in flight.
    pub budget_pauses: u64,
}

/// The live counters behind [`ServerStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) accepted: AtomicU64,
    pub(crate) rejected_limit: AtomicU64,
    pub(crate) rejected_peer: AtomicU64,
    pub(crate) active: AtomicU64,
    pub(crate) active_peak: AtomicU64,
    pub(crate) frames_in: AtomicU64,
    pub(crate) frames_out: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) crc_errors: AtomicU64,
    pub(crate) oversize_frames: AtomicU64,
    pub(crate) malformed_frames: AtomicU64,
    pub(crate) truncated_frames: AtomicU64,
    pub(crate) read_timeouts: AtomicU64,
    pub(crate) write_timeouts: AtomicU64,
    pub(crate) oversize_results: AtomicU64,
    pub(crate) handler_errors: AtomicU64,
    pub(crate) task_timeouts: AtomicU64,
    pub(crate) accept_errors: AtomicU64,
    pub(crate) budget_pauses: AtomicU64,
}

/// Adds one.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

/// Adds `n`.
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Relaxed);
}

impl Counters {
    /// The counters now; `bytes_held` is the budget's, read by the caller.
    pub(crate) fn snapshot(&self, transport: &'static str, bytes_held: u64) -> ServerStats {
        let get = |counter: &AtomicU64| counter.load(Relaxed);
        ServerStats {
            transport,
            accepted: get(&self.accepted),
            rejected_limit: get(&self.rejected_limit),
            rejected_peer: get(&self.rejected_peer),
            active: get(&self.active),
            active_peak: get(&self.active_peak),
            frames_in: get(&self.frames_in),
            frames_out: get(&self.frames_out),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            crc_errors: get(&self.crc_errors),
            oversize_frames: get(&self.oversize_frames),
            malformed_frames: get(&self.malformed_frames),
            truncated_frames: get(&self.truncated_frames),
            read_timeouts: get(&self.read_timeouts),
            write_timeouts: get(&self.write_timeouts),
            oversize_results: get(&self.oversize_results),
            handler_errors: get(&self.handler_errors),
            task_timeouts: get(&self.task_timeouts),
            accept_errors: get(&self.accept_errors),
            bytes_held,
            budget_pauses: get(&self.budget_pauses),
        }
    }

    /// Counts the error that ended a connection under its kind. Returns
    /// false for errors that are not the peer's fault (plain I/O).
    pub(crate) fn count_connection_error(&self, error: &IpcError) -> bool {
        let counter = match error {
            IpcError::ChecksumMismatch { .. } => &self.crc_errors,
            IpcError::FrameTooLarge { .. } => &self.oversize_frames,
            IpcError::MalformedMessage { .. } => &self.malformed_frames,
            IpcError::TruncatedFrame { .. } => &self.truncated_frames,
            IpcError::ReadTimeout { .. } => &self.read_timeouts,
            IpcError::WriteTimeout { .. } => &self.write_timeouts,
            _ => return false,
        };
        bump(counter);
        true
    }
}

/// Keeps `active` right however a connection ends.
pub(crate) struct ActiveConnection<'a>(&'a Counters);

impl<'a> ActiveConnection<'a> {
    pub(crate) fn enter(counters: &'a Counters) -> Self {
        let active = counters.active.fetch_add(1, Relaxed) + 1;
        counters.active_peak.fetch_max(active, Relaxed);
        ActiveConnection(counters)
    }
}

impl Drop for ActiveConnection<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

/// Lets a kind of event be logged at most once per `interval`, saying how
/// many happened since the last line: a flood of rejected connections is
/// counted in full but logged a line a second.
#[derive(Debug)]
pub(crate) struct LogThrottle {
    interval: Duration,
    state: Mutex<Throttled>,
}

#[derive(Debug, Default)]
struct Throttled {
    last_line: Option<Instant>,
    since_last_line: u64,
}

impl LogThrottle {
    pub(crate) fn per_second() -> LogThrottle {
        LogThrottle {
            interval: Duration::from_secs(1),
            state: Mutex::default(),
        }
    }

    /// One event at `now`: `Some(n)` if it may be logged, `n` counting it and
    /// those not logged since the last line; `None` if it must not be.
    pub(crate) fn admit(&self, now: Instant) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.since_last_line += 1;
        let due = state
            .last_line
            .is_none_or(|last| now.duration_since(last) >= self.interval);
        if !due {
            return None;
        }
        state.last_line = Some(now);
        Some(std::mem::take(&mut state.since_last_line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_logged_once_a_second_with_the_count_since_the_last_line() {
        let throttle = LogThrottle::per_second();
        let t0 = Instant::now();
        assert_eq!(throttle.admit(t0), Some(1), "the first is logged");
        for n in 1..=99 {
            let now = t0 + Duration::from_millis(10 * n);
            assert_eq!(throttle.admit(now), None, "not within the second");
        }
        assert_eq!(
            throttle.admit(t0 + Duration::from_secs(1)),
            Some(100),
            "a second later: this one and the 99 held back"
        );
        assert_eq!(throttle.admit(t0 + Duration::from_secs(5)), Some(1));
    }
}
