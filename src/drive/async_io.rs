//! Moves bytes between an async stream and a core without waiting: the step
//! every async driving loop polls.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::StreamCore;

/// Writes whatever output the core has and reads if it wants to; ready once
/// either made progress (or failed, which the core records; a failed write
/// still lets the read run, for what the peer sent before it went). Pending
/// when nothing could be done, with `cx` registered for whichever would
/// help.
pub(crate) fn drive_io<S, C>(cx: &mut Context<'_>, stream: &mut S, core: &mut C) -> Poll<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: StreamCore,
{
    let wrote = match write(cx, stream, core) {
        Poll::Ready(Err(())) => true,
        Poll::Ready(Ok(wrote)) => wrote,
        Poll::Pending => false,
    };
    match read(cx, stream, core) {
        Poll::Pending if !wrote => Poll::Pending,
        _ => Poll::Ready(()),
    }
}

/// Reads what has arrived into the core, if it wants to read: ready once
/// bytes, the end or an error came (the core records which). Pending when
/// nothing has, with `cx` registered for it, or when the core wants nothing
/// (no registration).
pub(crate) fn read<S, C>(cx: &mut Context<'_>, stream: &mut S, core: &mut C) -> Poll<()>
where
    S: AsyncRead + Unpin,
    C: StreamCore,
{
    let window = core.read_window();
    if window == 0 {
        return Poll::Pending;
    }
    let mut room = core.read_buffer().limit(window);
    match tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, &mut room) {
        Poll::Ready(Ok(0)) => core.on_eof(Instant::now()),
        Poll::Ready(Ok(read)) => core.on_read(read, Instant::now()),
        Poll::Ready(Err(error)) => core.on_io_error(error),
        Poll::Pending => return Poll::Pending,
    }
    Poll::Ready(())
}

/// Writes the core's output as far as the stream takes it: `Ok(true)` if
/// any was written, `Err` if writing failed (the core knows why).
pub(crate) fn write<S, C>(
    cx: &mut Context<'_>,
    stream: &mut S,
    core: &mut C,
) -> Poll<Result<bool, ()>>
where
    S: AsyncWrite + Unpin,
    C: StreamCore,
{
    let mut wrote = false;
    while !core.pending_output().is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, core.pending_output()) {
            Poll::Ready(Ok(0)) => {
                core.on_write_error(std::io::ErrorKind::WriteZero.into());
                return Poll::Ready(Err(()));
            }
            Poll::Ready(Ok(written)) => {
                core.on_written(written, Instant::now());
                wrote = true;
            }
            Poll::Ready(Err(error)) => {
                core.on_write_error(error);
                return Poll::Ready(Err(()));
            }
            Poll::Pending if wrote => return Poll::Ready(Ok(true)),
            Poll::Pending => return Poll::Pending,
        }
    }
    Poll::Ready(Ok(wrote))
}
