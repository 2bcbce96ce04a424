//! The threads the blocking drivers (`legacy`) run connections on, kept for
//! the next connection once one ends.
//!
//! Each `legacy` connection is driven by a thread of its own, on both sides.
//! Creating and ending those two threads was a third of a task over a new
//! connection (`compare --quick`, 64 B: 59 to 73 µs p50 with a new thread
//! each, 43 to 52 µs with kept ones), so a thread whose connection ended
//! waits a while for the next one. At most [`MAX_IDLE`] wait, each for at
//! most [`IDLE_KEEP`]; a connection that finds none waiting gets a new
//! thread. So a process holds at most its busy threads plus [`MAX_IDLE`].

use std::collections::VecDeque;
use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::config::LEGACY_THREAD_STACK_BYTES;

/// How long a thread with nothing to do waits for work before it ends.
pub(crate) const IDLE_KEEP: Duration = Duration::from_secs(5);

/// How many threads may wait for work at once; more end as they finish.
pub(crate) const MAX_IDLE: usize = 16;

/// The threads every blocking driver of this process shares.
pub(crate) static CONNECTION_THREADS: ThreadPool = ThreadPool::new(IDLE_KEEP, MAX_IDLE);

type Job = Box<dyn FnOnce() + Send>;

/// Threads that run one job after another, each waiting a while for the
/// next before it ends.
pub(crate) struct ThreadPool {
    state: Mutex<State>,
    /// Signalled once per job queued for a waiting thread.
    work: Condvar,
    idle_keep: Duration,
    max_idle: usize,
}

struct State {
    /// Jobs handed to waiting threads and not yet taken; never more than
    /// `idle` (a job no waiting thread will take gets a thread of its own).
    queued: VecDeque<Job>,
    /// Threads waiting for a job.
    idle: usize,
    /// Threads alive, running a job or waiting for one.
    threads: usize,
}

impl ThreadPool {
    pub(crate) const fn new(idle_keep: Duration, max_idle: usize) -> Self {
        Self {
            state: Mutex::new(State {
                queued: VecDeque::new(),
                idle: 0,
                threads: 0,
            }),
            work: Condvar::new(),
            idle_keep,
            max_idle,
        }
    }

    /// Runs `job` on a waiting thread, or on a new one if none is free (the
    /// only case that can fail: the OS refused a thread, and `job` was
    /// dropped unrun).
    pub(crate) fn run(&'static self, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let job: Job = Box::new(job);
        let mut state = self.lock();
        if state.idle > state.queued.len() {
            state.queued.push_back(job);
            drop(state);
            self.work.notify_one();
            return Ok(());
        }
        state.threads += 1;
        drop(state);
        let spawned = std::thread::Builder::new()
            .name("daemoneye-ipc-io".to_owned())
            .stack_size(LEGACY_THREAD_STACK_BYTES)
            .spawn(move || {
                // Counted out however the thread ends, unwinding included.
                let _alive = Alive(self);
                job();
                self.take_jobs();
            });
        if spawned.is_err() {
            self.lock().threads -= 1;
        }
        spawned.map(drop)
    }

    /// A thread's life after its first job: waits for the next, runs it,
    /// until none comes within `idle_keep` or enough threads wait already.
    fn take_jobs(&self) {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.queued.pop_front() {
                drop(state);
                job();
                state = self.lock();
                continue;
            }
            if state.idle >= self.max_idle {
                return;
            }
            state.idle += 1;
            let (woken, waited) = self
                .work
                .wait_timeout(state, self.idle_keep)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            state = woken;
            state.idle -= 1;
            // A job queued as the wait ran out is still taken: it was
            // queued because this thread was counted as waiting.
            if waited.timed_out() && state.queued.is_empty() {
                return;
            }
        }
    }

    /// Threads waiting for a job now.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.lock().idle
    }

    /// Threads alive now.
    #[cfg(test)]
    fn threads(&self) -> usize {
        self.lock().threads
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Jobs run outside the lock, so a panic cannot leave it half-updated.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A pool thread, counted in [`State::threads`] until dropped.
struct Alive(&'static ThreadPool);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.lock().threads -= 1;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::sync::{Arc, Barrier};
    use std::thread::ThreadId;
    use std::time::Instant;

    use super::*;

    /// A pool of the tests' own, so that tests running at once do not take
    /// each other's threads.
    fn pool(idle_keep: Duration, max_idle: usize) -> &'static ThreadPool {
        Box::leak(Box::new(ThreadPool::new(idle_keep, max_idle)))
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }

    fn thread_of_job(pool: &'static ThreadPool) -> ThreadId {
        let (tell, told) = mpsc::channel();
        pool.run(move || tell.send(std::thread::current().id()).unwrap())
            .unwrap();
        told.recv().unwrap()
    }

    #[test]
    fn a_thread_whose_job_ended_runs_the_next_one() {
        let pool = pool(Duration::from_secs(60), 4);
        let first = thread_of_job(pool);
        wait_until("the thread to wait for work", || pool.idle() == 1);
        assert_eq!(thread_of_job(pool), first, "the waiting thread took it");
        wait_until("the thread to wait again", || pool.idle() == 1);
        assert_eq!(pool.threads(), 1);
    }

    #[test]
    fn jobs_at_once_get_threads_of_their_own() {
        let pool = pool(Duration::from_secs(60), 4);
        let all_running = Arc::new(Barrier::new(3));
        let (tell, told) = mpsc::channel();
        for _ in 0..3 {
            let (all_running, tell) = (all_running.clone(), tell.clone());
            pool.run(move || {
                // Each blocks until all three run: one thread each.
                all_running.wait();
                tell.send(std::thread::current().id()).unwrap();
            })
            .unwrap();
        }
        let threads: std::collections::HashSet<_> = (0..3)
            .map(|_| {
                told.recv_timeout(Duration::from_secs(20))
                    .expect("every job runs, each on a thread of its own")
            })
            .collect();
        assert_eq!(threads.len(), 3);
    }

    #[test]
    fn a_waiting_thread_ends_after_idle_keep() {
        let pool = pool(Duration::from_millis(50), 4);
        thread_of_job(pool);
        wait_until("the thread to wait for work", || pool.idle() == 1);
        wait_until("the waiting thread to end", || pool.threads() == 0);
        assert_eq!(pool.idle(), 0);
    }

    #[test]
    fn no_more_than_max_idle_threads_wait() {
        let pool = pool(Duration::from_secs(60), 2);
        let release = Arc::new(Barrier::new(5));
        for _ in 0..4 {
            let release = release.clone();
            pool.run(move || {
                release.wait();
            })
            .unwrap();
        }
        wait_until("four threads", || pool.threads() == 4);
        release.wait();
        wait_until("all but two threads to end", || pool.threads() == 2);
        wait_until("the two to wait", || pool.idle() == 2);
    }

    #[test]
    fn a_job_that_panics_ends_its_thread_and_the_pool_goes_on() {
        let pool = pool(Duration::from_secs(60), 4);
        pool.run(|| panic!("a job's own panic")).unwrap();
        wait_until("the panicked thread to be counted out", || {
            pool.threads() == 0
        });
        thread_of_job(pool);
    }
}
