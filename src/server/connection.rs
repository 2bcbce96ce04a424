//! One served connection: read tasks while earlier ones run, answer each as
//! it completes.

use std::collections::HashMap;
use std::future::Future;
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::task::{Id as TaskHandle, JoinSet};
use tokio::time::Instant;

use super::{Reply, Shared, TaskHandler};
use crate::error::IpcError;
use crate::framed_io::{FrameReader, FrameWriter};
use crate::proto::{DetectionResult, DetectionTask};
use crate::telemetry::{add, bump};
use crate::transport::Connection;
use tracing::Instrument;

/// Serves `connection` until the peer leaves, a frame is bad, a deadline
/// passes, or the server stops.
///
/// Reading and answering interleave in one task: the read future is dropped
/// whenever a result is ready (reads are cancel-safe), the result is written,
/// and reading resumes. Up to `max_in_flight` handlers run at once; beyond
/// that the connection is not read, so a client cannot queue unbounded work.
pub(super) async fn serve<H: TaskHandler>(
    mut connection: Connection,
    shared: &Shared,
    handler: Arc<H>,
) -> Result<(), IpcError> {
    let outcome = serve_frames(&mut connection, shared, handler).await;
    if outcome.is_err() || shared.abort.is_cancelled() {
        // Whatever we had not delivered is moot: do not hold the connection
        // open on the peer's account (Windows pipes otherwise wait for it).
        connection.discard_unsent();
    }
    outcome
}

async fn serve_frames<H: TaskHandler>(
    connection: &mut Connection,
    shared: &Shared,
    handler: Arc<H>,
) -> Result<(), IpcError> {
    let mut reader = FrameReader::<DetectionTask>::new(shared.settings, shared.read_timeout);
    let mut writer = FrameWriter::<DetectionResult>::new(shared.settings, shared.write_timeout);
    let mut in_flight = InFlight::default();
    let mut reading = true;
    let mut paused = false;
    let mut bytes_counted = 0;
    // The idle window runs only while nothing is in flight: a client waiting
    // on a slow handler is not idle.
    let mut last_activity = Instant::now();
    // Registered once, not once per frame.
    let abort = shared.abort.cancelled();
    let stop_reading = shared.stop_reading.cancelled();
    tokio::pin!(abort, stop_reading);

    loop {
        if !reading && in_flight.is_empty() {
            return Ok(());
        }
        let idle_deadline = in_flight
            .is_empty()
            .then(|| last_activity + shared.read_timeout);
        let may_read = reading && in_flight.len() < shared.max_in_flight;
        if may_read && paused {
            // Our own backpressure is not the peer's delay.
            reader.resume();
        }
        paused = !may_read;
        tokio::select! {
            biased;
            _ = &mut abort => return Ok(()),
            Some(done) = in_flight.next_done() => {
                if deliver(connection, &mut writer, done, shared).await?.is_break() {
                    return Ok(());
                }
                last_activity = Instant::now();
            }
            _ = &mut stop_reading, if reading => reading = false,
            read = reader.next(connection, idle_deadline), if may_read => {
                add(&shared.counters.bytes_in, reader.bytes_read() - bytes_counted);
                bytes_counted = reader.bytes_read();
                match read? {
                    Some(task) => {
                        bump(&shared.counters.frames_in);
                        tracing::debug!(task_id = %task.task_id, task_type = task.task_type, "task received");
                        if let Some(done) = in_flight.start(task, &handler)
                            && deliver(connection, &mut writer, done, shared).await?.is_break()
                        {
                            return Ok(());
                        }
                        last_activity = Instant::now();
                    }
                    // The peer closed its side: answer what is in flight, then close.
                    None => reading = false,
                }
            }
        }
    }
}

/// Answers a finished task, unless the server is stopping hard
/// (`Break`): a client that stops reading must not hold up a hard stop.
async fn deliver(
    connection: &mut Connection,
    writer: &mut FrameWriter<DetectionResult>,
    done: Done,
    shared: &Shared,
) -> Result<ControlFlow<()>, IpcError> {
    let (task_id, reply) = done.into_reply(&shared.counters);
    tokio::select! {
        _ = shared.abort.cancelled() => Ok(ControlFlow::Break(())),
        answered = answer(connection, writer, task_id, reply, shared) => answered.map(ControlFlow::Continue),
    }
}

/// Writes one reply; a result too large for a frame is replaced by an error
/// result naming the size and the limit, so the client gets an answer.
async fn answer(
    connection: &mut Connection,
    writer: &mut FrameWriter<DetectionResult>,
    task_id: String,
    reply: Reply,
    shared: &Shared,
) -> Result<(), IpcError> {
    let sent = match &reply {
        Reply::Owned(result) => writer.send(connection, &[result]).await,
        Reply::Shared(result) => {
            // This reply's id, then the shared result, merged by the reader.
            let head = DetectionResult {
                task_id: task_id.clone(),
                ..Default::default()
            };
            writer.send(connection, &[&head, result]).await
        }
    };
    let written = match sent {
        Err(IpcError::MessageTooLarge { length, limit }) => {
            bump(&shared.counters.oversize_results);
            tracing::warn!(%task_id, length, limit, "result exceeds max_frame_bytes; answering with an error");
            let refusal = DetectionResult {
                task_id,
                success: false,
                error_message: Some(format!(
                    "the result is {length} bytes, over max_frame_bytes = {limit}; narrow the task \
                     (for example a process_filter with pids or names) or raise ipc.max_frame_bytes on \
                     both sides"
                )),
                ..Default::default()
            };
            writer.send(connection, &[&refusal]).await?
        }
        other => other?,
    };
    bump(&shared.counters.frames_out);
    add(&shared.counters.bytes_out, written as u64);
    Ok(())
}

/// Handlers running for one connection.
#[derive(Default)]
struct InFlight {
    tasks: JoinSet<Reply>,
    /// The task id of each running handler, to answer for it if it panics.
    ids: HashMap<TaskHandle, String>,
}

/// How a handler ended.
struct Done {
    task_id: String,
    /// The reply, or why there is none (the handler panicked).
    outcome: Result<Reply, String>,
}

impl InFlight {
    fn len(&self) -> usize {
        self.tasks.len()
    }

    fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Starts the handler. One that finishes on its first poll (nothing to
    /// wait for) is answered at once, without the cost of a task; one that
    /// must wait carries on as a task of its own, polled with a real waker
    /// from then on.
    fn start<H: TaskHandler>(&mut self, task: DetectionTask, handler: &Arc<H>) -> Option<Done> {
        let handler = handler.clone();
        let task_id = task.task_id.clone();
        let mut running = Box::pin(async move { handler.handle(task).await });
        let mut first_poll = Context::from_waker(Waker::noop());
        match std::panic::catch_unwind(AssertUnwindSafe(|| running.as_mut().poll(&mut first_poll)))
        {
            Ok(Poll::Ready(result)) => Some(Done {
                task_id,
                outcome: Ok(result),
            }),
            Ok(Poll::Pending) => {
                let handle = self.tasks.spawn(running.in_current_span());
                self.ids.insert(handle.id(), task_id);
                None
            }
            Err(panic) => Some(Done {
                task_id,
                outcome: Err(format!("panicked: {}", panic_message(&*panic))),
            }),
        }
    }

    /// The next handler to finish; `None` at once if none is running.
    async fn next_done(&mut self) -> Option<Done> {
        let (handle, outcome) = match self.tasks.join_next_with_id().await? {
            Ok((handle, result)) => (handle, Ok(result)),
            Err(error) => (error.id(), Err(error.to_string())),
        };
        let task_id = self.ids.remove(&handle).unwrap_or_default();
        Some(Done { task_id, outcome })
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

impl Done {
    /// The id and reply to send: the handler's, carrying the task's own id,
    /// or an error result if the handler panicked.
    fn into_reply(self, counters: &crate::telemetry::Counters) -> (String, Reply) {
        let task_id = self.task_id;
        let reply = match self.outcome {
            Ok(Reply::Owned(mut result)) => {
                if result.task_id != task_id {
                    tracing::debug!(handler_said = %result.task_id, %task_id, "result task_id set to the task's");
                    result.task_id.clone_from(&task_id);
                }
                Reply::Owned(result)
            }
            Ok(Reply::Shared(result)) if !result.task_id.is_empty() => {
                // Merging would let the shared id win: fall back to a copy.
                tracing::debug!(handler_said = %result.task_id, %task_id, "shared result carries a task_id; copied");
                let mut result = DetectionResult::clone(&result);
                result.task_id.clone_from(&task_id);
                Reply::Owned(result)
            }
            Ok(shared) => shared,
            Err(error) => {
                bump(&counters.handler_errors);
                tracing::error!(%task_id, %error, "handler failed");
                Reply::Owned(DetectionResult {
                    task_id: task_id.clone(),
                    success: false,
                    error_message: Some(format!(
                        "the collector's handler failed on this task ({error}); the collector is still \
                         running, other tasks are unaffected"
                    )),
                    ..Default::default()
                })
            }
        };
        (task_id, reply)
    }
}
