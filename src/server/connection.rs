//! One served connection: read tasks while earlier ones run, answer each as
//! it completes.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::task::{Id as TaskHandle, JoinSet};
use tokio::time::Instant;

use super::{Shared, TaskHandler};
use crate::error::IpcError;
use crate::framed_io::{FrameReader, FrameWriter};
use crate::proto::{DetectionResult, DetectionTask};
use crate::telemetry::{add, bump};
use crate::transport::Connection;

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
    if outcome.is_err() {
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
            _ = shared.abort.cancelled() => return Ok(()),
            Some(outcome) = in_flight.next_done() => {
                let result = outcome.into_result(&shared.counters);
                tokio::select! {
                    // A client that stops reading must not hold up a hard stop.
                    _ = shared.abort.cancelled() => return Ok(()),
                    answered = answer(connection, &mut writer, result, shared) => answered?,
                }
                last_activity = Instant::now();
            }
            _ = shared.stop_reading.cancelled(), if reading => reading = false,
            read = reader.next(connection, idle_deadline), if may_read => {
                add(&shared.counters.bytes_in, reader.bytes_read() - bytes_counted);
                bytes_counted = reader.bytes_read();
                match read? {
                    Some(task) => {
                        bump(&shared.counters.frames_in);
                        tracing::debug!(task_id = %task.task_id, task_type = task.task_type, "task received");
                        in_flight.start(task, &handler);
                        last_activity = Instant::now();
                    }
                    // The peer closed its side: answer what is in flight, then close.
                    None => reading = false,
                }
            }
        }
    }
}

/// Writes one result; a result too large for a frame is replaced by an error
/// result naming the size and the limit, so the client gets an answer.
async fn answer(
    connection: &mut Connection,
    writer: &mut FrameWriter<DetectionResult>,
    result: DetectionResult,
    shared: &Shared,
) -> Result<(), IpcError> {
    let written = match writer.send(connection, &result).await {
        Err(IpcError::MessageTooLarge { length, limit }) => {
            bump(&shared.counters.oversize_results);
            tracing::warn!(task_id = %result.task_id, length, limit, "result exceeds max_frame_bytes; answering with an error");
            let refusal = DetectionResult {
                task_id: result.task_id,
                success: false,
                error_message: Some(format!(
                    "the result is {length} bytes, over max_frame_bytes = {limit}; narrow the task \
                     (for example a process_filter with pids or names) or raise ipc.max_frame_bytes on \
                     both sides"
                )),
                ..Default::default()
            };
            writer.send(connection, &refusal).await?
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
    tasks: JoinSet<DetectionResult>,
    /// The task id of each running handler, to answer for it if it panics.
    ids: HashMap<TaskHandle, String>,
}

/// How a handler ended.
struct Done {
    task_id: String,
    outcome: Result<DetectionResult, tokio::task::JoinError>,
}

impl InFlight {
    fn len(&self) -> usize {
        self.tasks.len()
    }

    fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    fn start<H: TaskHandler>(&mut self, task: DetectionTask, handler: &Arc<H>) {
        let handler = handler.clone();
        let task_id = task.task_id.clone();
        let handle = self.tasks.spawn(async move { handler.handle(task).await });
        self.ids.insert(handle.id(), task_id);
    }

    /// The next handler to finish; `None` at once if none is running.
    async fn next_done(&mut self) -> Option<Done> {
        let (handle, outcome) = match self.tasks.join_next_with_id().await? {
            Ok((handle, result)) => (handle, Ok(result)),
            Err(error) => (error.id(), Err(error)),
        };
        let task_id = self.ids.remove(&handle).unwrap_or_default();
        Some(Done { task_id, outcome })
    }
}

impl Done {
    /// The result to send: the handler's, with the task's own id, or an
    /// error result if the handler panicked.
    fn into_result(self, counters: &crate::telemetry::Counters) -> DetectionResult {
        match self.outcome {
            Ok(mut result) => {
                if result.task_id != self.task_id {
                    tracing::debug!(handler_said = %result.task_id, task_id = %self.task_id, "result task_id set to the task's");
                    result.task_id = self.task_id;
                }
                result
            }
            Err(error) => {
                bump(&counters.handler_errors);
                tracing::error!(task_id = %self.task_id, %error, "handler failed");
                DetectionResult {
                    task_id: self.task_id,
                    success: false,
                    error_message: Some(format!(
                        "the collector's handler failed on this task ({error}); the collector is still \
                         running, other tasks are unaffected"
                    )),
                    ..Default::default()
                }
            }
        }
    }
}
