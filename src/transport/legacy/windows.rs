//! The legacy backend on Windows: named pipes through the Win32 API, with
//! overlapped I/O so that every wait has a deadline and can be woken. The
//! `unsafe` calls are all in [`crate::win32`].

use std::io;
use std::os::windows::io::{BorrowedHandle, OwnedHandle};
use std::time::Instant;

use bytes::BytesMut;

use super::Interest;
use crate::endpoint::Endpoint;
use crate::endpoint::windows::{PipeInstances, open_pipe};
use crate::transport::PipeOwner;
use crate::win32::{Event, PipeIo, wait_any};

/// Bytes each read or write moves at most (the pipe's own buffer size).
const IO_BUFFER: usize = crate::win32::PIPE_BUFFER_BYTES as usize;

/// The endpoint's pipe instances, each wrapped for overlapped I/O; the
/// waiting one has a connect in flight.
#[derive(Debug)]
pub(crate) struct Listener {
    instances: PipeInstances<PipeIo>,
}

/// Wraps one pipe instance for overlapped I/O.
fn overlapped(pipe: OwnedHandle) -> io::Result<PipeIo> {
    PipeIo::new(pipe, IO_BUFFER)
}

impl Listener {
    /// Creates the pipe's first instance (failing if the name is taken).
    pub(crate) fn bind(endpoint: &Endpoint) -> io::Result<Listener> {
        let instances = PipeInstances::first(endpoint, overlapped)?;
        Ok(Listener { instances })
    }

    /// The next connected client if one has arrived; `WouldBlock` if none
    /// has.
    pub(crate) fn accept(&mut self) -> io::Result<Stream> {
        loop {
            let waiting = self.instances.waiting();
            let connected = if waiting.read_pending() {
                match waiting.poll_read() {
                    None => return Err(io::ErrorKind::WouldBlock.into()),
                    Some(outcome) => outcome.map(drop),
                }
            } else {
                match waiting.start_connect() {
                    Ok(true) => Ok(()),
                    Ok(false) => return Err(io::ErrorKind::WouldBlock.into()),
                    Err(error) => Err(error),
                }
            };
            let instance = self.instances.rotate(overlapped)?;
            match connected {
                Ok(()) => return Ok(Stream::new(instance, Side::Server)),
                // A client that came and went: wait on the fresh instance.
                Err(error) if error.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(error) => return Err(error),
            }
        }
    }

    /// Blocks until a client may have connected (if `accepting`), `waker`
    /// is woken, or `deadline` passes.
    pub(crate) fn wait(
        &mut self,
        accepting: bool,
        waker: &Waker,
        deadline: Option<Instant>,
    ) -> io::Result<()> {
        let waiting = self.instances.waiting();
        if accepting && !waiting.read_pending() && waiting.start_connect()? {
            // Connected already: the next accept takes it.
            return Ok(());
        }
        let mut handles = vec![waker.event.handle()];
        if accepting {
            handles.push(waiting.read_event());
        }
        wait(&handles, deadline)
    }
}

/// Which end of the pipe a stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Server,
    Client,
}

/// One connected pipe, server or client side.
#[derive(Debug)]
pub(crate) struct Stream {
    io: PipeIo,
    side: Side,
}

impl Stream {
    fn new(io: PipeIo, side: Side) -> Stream {
        Stream { io, side }
    }

    /// Reads what has arrived into the end of `buf`: at most `max` bytes
    /// (asked for when a read starts; the window never shrinks while it is
    /// in flight). `Ok(0)` is the end of the stream; `WouldBlock` means
    /// nothing has arrived (a read is then in flight, and
    /// [`wait`](Self::wait) watches it).
    pub(crate) fn read_into(&mut self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        if !self.io.read_pending() && !self.io.start_read(max)? {
            return Ok(0);
        }
        match self.io.poll_read() {
            None => Err(io::ErrorKind::WouldBlock.into()),
            // Empty: the end of the stream (our peers never write zero
            // bytes; one that does only ends its own connection).
            Some(Ok(bytes)) => {
                buf.extend_from_slice(bytes);
                Ok(bytes.len())
            }
            Some(Err(error)) => Err(error),
        }
    }

    /// Hands the first bytes of `data` to a write, or collects a finished
    /// one. Returns the bytes written once a write completes; `WouldBlock`
    /// while one is in flight. `data` must start with the bytes of the
    /// write in flight (the drivers only ever append to their output).
    pub(crate) fn write_from(&mut self, data: &[u8]) -> io::Result<usize> {
        if !self.io.write_pending() {
            self.io.start_write(data).map_err(broken_pipe)?;
        }
        match self.io.poll_write() {
            None => Err(io::ErrorKind::WouldBlock.into()),
            Some(outcome) => outcome.map_err(broken_pipe),
        }
    }

    /// Writing from another thread than the one that waits: not offered
    /// (an overlapped write's state lives with the stream), so callers hand
    /// their frames to the stream's thread.
    pub(crate) fn writer(&self) -> Option<Writer> {
        None
    }

    /// Blocks until the read or write in flight completes (as `interest`
    /// asks), `waker` is woken, or `deadline` passes.
    pub(crate) fn wait(
        &mut self,
        interest: Interest,
        waker: &Waker,
        deadline: Option<Instant>,
    ) -> io::Result<()> {
        let mut handles = vec![waker.event.handle()];
        if interest.read && self.io.read_pending() {
            handles.push(self.io.read_event());
        }
        if interest.write && self.io.write_pending() {
            handles.push(self.io.write_event());
        }
        wait(&handles, deadline)
    }

    /// Server side: the client's process id. Windows reports no uid; the
    /// pipe's security descriptor is what admits or refuses a client.
    pub(crate) fn peer(&self) -> io::Result<crate::peer::Peer> {
        match self.side {
            Side::Server => crate::peer::of_pipe(self.handle()),
            Side::Client => Ok(crate::peer::Peer::default()),
        }
    }

    /// Client side: who owns the pipe reached.
    pub(crate) fn pipe_owner(&self) -> io::Result<PipeOwner> {
        crate::win32::pipe_owner(self.handle())
    }

    fn handle(&self) -> BorrowedHandle<'_> {
        self.io.handle()
    }
}

/// Writes to a stream from another thread: none on Windows (see
/// [`Stream::writer`]).
#[derive(Debug, Clone)]
pub(crate) enum Writer {}

impl Writer {
    pub(crate) fn write_from(&self, _data: &[u8]) -> io::Result<usize> {
        match *self {}
    }
}

/// A pipe whose reader has gone reports `ERROR_NO_DATA` (232) on a write;
/// callers know that as a broken pipe.
fn broken_pipe(error: io::Error) -> io::Error {
    const ERROR_NO_DATA: i32 = 232;
    if error.raw_os_error() == Some(ERROR_NO_DATA) {
        io::Error::new(io::ErrorKind::BrokenPipe, error)
    } else {
        error
    }
}

/// Opens the endpoint's pipe: at once, or `ERROR_PIPE_BUSY` (every
/// instance taken) or `NotFound` (no server yet), which the client retries.
pub(crate) fn connect(endpoint: &Endpoint) -> io::Result<Stream> {
    let io = PipeIo::new(open_pipe(endpoint)?, IO_BUFFER)?;
    Ok(Stream::new(io, Side::Client))
}

/// Wakes a thread blocked in a [`Stream::wait`] or [`Listener::wait`] from
/// another thread: an auto-reset event the wait watches. Cheap to clone;
/// clones wake the same thread.
#[derive(Debug, Clone)]
pub(crate) struct Waker {
    event: std::sync::Arc<Event>,
}

impl Waker {
    pub(crate) fn new() -> io::Result<Waker> {
        Ok(Waker {
            event: std::sync::Arc::new(Event::new(false)?),
        })
    }

    /// Makes the waiting thread's current or next wait return.
    pub(crate) fn wake(&self) {
        self.event.set();
    }
}

fn wait(handles: &[BorrowedHandle<'_>], deadline: Option<Instant>) -> io::Result<()> {
    let timeout = deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()));
    wait_any(handles, timeout)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const READ: Interest = Interest {
        read: true,
        write: false,
    };
    const WRITE: Interest = Interest {
        read: false,
        write: true,
    };

    /// A peer that wrote and then closed before the next read began: its
    /// bytes are read, then the end of the stream, as when it closes
    /// during a read (a read started after the close fails at once with
    /// `ERROR_BROKEN_PIPE`, which is that end too).
    #[test]
    fn what_a_closed_peer_sent_is_read_then_the_end_of_the_stream() {
        let name = format!("daemoneye-test-legacy-eof-{}", std::process::id());
        let endpoint = Endpoint::parse(&name).unwrap();
        let give_up = Instant::now() + Duration::from_secs(10);
        let deadline = Some(give_up);
        let in_time = || assert!(Instant::now() < give_up, "nothing happened in 10 s");
        let waker = Waker::new().unwrap();
        let mut listener = Listener::bind(&endpoint).unwrap();
        let mut client = connect(&endpoint).unwrap();
        let mut server = loop {
            match listener.accept() {
                Ok(stream) => break stream,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    listener.wait(true, &waker, deadline).unwrap();
                    in_time();
                }
                Err(error) => panic!("accept: {error}"),
            }
        };
        let sent = b"half a frame";
        loop {
            match server.write_from(sent) {
                Ok(written) => break assert_eq!(written, sent.len()),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    server.wait(WRITE, &waker, deadline).unwrap();
                    in_time();
                }
                Err(error) => panic!("write: {error}"),
            }
        }
        drop(server);

        let mut received = BytesMut::new();
        while received.len() < sent.len() {
            match client.read_into(&mut received, usize::MAX) {
                Ok(read) => assert_ne!(read, 0, "the end came before the bytes"),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    client.wait(READ, &waker, deadline).unwrap();
                    in_time();
                }
                Err(error) => panic!("read: {error}"),
            }
        }
        assert_eq!(&received[..], sent);
        assert_eq!(client.read_into(&mut received, usize::MAX).unwrap(), 0);
    }
}
