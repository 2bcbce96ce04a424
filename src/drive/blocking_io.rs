//! Moves bytes between a non-blocking `legacy` stream and a core: the step
//! every blocking driving loop runs before it waits.

use std::io::ErrorKind::WouldBlock;
use std::time::Instant;

use super::StreamCore;
use crate::transport::legacy::{Interest, Stream};

/// Writes and reads what can be without blocking; true if either made
/// progress (or failed, which the core records).
pub(crate) fn drive_io<C: StreamCore>(stream: &mut Stream, core: &mut C) -> bool {
    let mut progressed = false;
    if !core.pending_output().is_empty() {
        match stream.write_from(core.pending_output()) {
            Ok(written) => {
                core.on_written(written, Instant::now());
                progressed = true;
            }
            Err(error) if error.kind() == WouldBlock => {}
            Err(error) => {
                // What the peer sent before it went is still read below.
                core.on_write_error(error);
                progressed = true;
            }
        }
    }
    let window = core.read_window();
    if window > 0 {
        match stream.read_into(core.read_buffer(), window) {
            Ok(0) => core.on_eof(Instant::now()),
            Ok(read) => core.on_read(read, Instant::now()),
            Err(error) if error.kind() == WouldBlock => return progressed,
            Err(error) => core.on_io_error(error),
        }
        return true;
    }
    progressed
}

/// What to wait for after [`drive_io`] could do nothing more.
pub(crate) fn interest<C: StreamCore>(core: &C) -> Interest {
    Interest {
        read: core.read_window() > 0,
        write: !core.pending_output().is_empty(),
    }
}
