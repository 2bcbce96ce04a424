//! The legacy backend on Unix: non-blocking `std::os::unix::net` sockets,
//! `poll(2)` for readiness, deadlines and wake-ups (an eventfd or a pipe).

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::net::SocketAddrUnix;

use super::Interest;
use crate::endpoint::Endpoint;

/// The smallest and largest room read into at once. It adapts: it doubles
/// while reads fill it and shrinks back when they do not. Safe code cannot
/// hand the kernel uninitialised memory, so room is zeroed before a read:
/// the smallest room is a landing area of its own, zeroed once, from which
/// what arrived is copied (most reads bring a few bytes or none); larger
/// room is zeroed in place, in proportion to what such reads bring.
const MIN_READ: usize = 4 * 1024;
const MAX_READ: usize = 256 * 1024;

/// A listening socket, the one [`crate::endpoint::unix::bind`] made.
#[derive(Debug)]
pub(crate) struct Listener {
    socket: UnixListener,
}

impl Listener {
    pub(crate) fn wrap(socket: UnixListener) -> io::Result<Listener> {
        socket.set_nonblocking(true)?;
        Ok(Listener { socket })
    }

    /// The next connection if one is queued; `WouldBlock` if none is.
    pub(crate) fn accept(&mut self) -> io::Result<Stream> {
        // Made non-blocking by the accept itself (`accept4`), rather than
        // by one more system call on every connection.
        #[cfg(not(target_vendor = "apple"))]
        let socket = {
            use rustix::net::SocketFlags;
            let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
            UnixStream::from(rustix::net::accept_with(&self.socket, flags)?)
        };
        #[cfg(target_vendor = "apple")]
        let socket = {
            let (socket, _address) = self.socket.accept()?;
            socket.set_nonblocking(true)?;
            socket
        };
        Ok(Stream::new(socket, Arrivals::Expected))
    }

    /// Blocks until a connection may be queued (if `accepting`), `waker` is
    /// woken, or `deadline` passes.
    pub(crate) fn wait(
        &mut self,
        accepting: bool,
        waker: &Waker,
        deadline: Option<Instant>,
    ) -> io::Result<()> {
        let socket = accepting.then(|| (self.socket.as_fd(), PollFlags::IN));
        wait(socket, waker, deadline)
    }
}

/// One connected socket, server or client side, in non-blocking mode.
#[derive(Debug)]
pub(crate) struct Stream {
    socket: Arc<UnixStream>,
    /// How much room the next read gets (see [`MIN_READ`]).
    read_room: usize,
    /// Where reads of the smallest room land (see [`MIN_READ`]).
    landing: Box<[u8; MIN_READ]>,
    /// The last read brought less than it had room for, and no wait has
    /// been since: the socket was empty then, and a read now would most
    /// likely only learn so with a system call (one per task on a client,
    /// two on a server: after the task and after the result). Reads answer `WouldBlock` until the next wait,
    /// which returns at once if bytes came meanwhile (`poll` reports the
    /// level, not the edge).
    drained: bool,
}

/// Writes to a [`Stream`] from another thread than the one that reads and
/// waits on it (a client's caller, sparing a hand-over to the connection's
/// thread). Writes are non-blocking; callers serialise them.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    socket: Arc<UnixStream>,
}

impl Writer {
    /// As [`Stream::write_from`].
    pub(crate) fn write_from(&self, data: &[u8]) -> io::Result<usize> {
        write(&self.socket, data)
    }
}

fn read(mut socket: &UnixStream, into: &mut [u8]) -> io::Result<usize> {
    loop {
        match socket.read(into) {
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn write(mut socket: &UnixStream, data: &[u8]) -> io::Result<usize> {
    loop {
        match socket.write(data) {
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

impl Drop for Stream {
    /// The connection ends with its stream, though a [`Writer`] (a
    /// client's link, kept until its next send) still holds the socket: the
    /// peer sees the end now and frees what it held for the connection.
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

impl Stream {
    /// Wraps `socket`, which is non-blocking already.
    fn new(socket: UnixStream, arrivals: Arrivals) -> Stream {
        Stream {
            socket: Arc::new(socket),
            read_room: MIN_READ,
            landing: Box::new([0; MIN_READ]),
            drained: arrivals == Arrivals::AfterAWait,
        }
    }

    /// A handle for writing from another thread.
    pub(crate) fn writer(&self) -> Option<Writer> {
        Some(Writer {
            socket: self.socket.clone(),
        })
    }

    /// Reads what has arrived, `max` bytes at most, into the end of `buf`.
    /// `Ok(0)` is the end of the stream; `WouldBlock` means nothing has
    /// arrived (or, after a read that emptied the socket, nothing is looked
    /// for until the next [`wait`](Self::wait)).
    pub(crate) fn read_into(&mut self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        if self.drained {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let room = self.read_room.min(max);
        let outcome = if room <= MIN_READ {
            let outcome = read(&self.socket, &mut self.landing[..room]);
            if let Ok(read) = outcome {
                buf.extend_from_slice(&self.landing[..read]);
            }
            outcome
        } else {
            let start = buf.len();
            buf.resize(start + room, 0);
            let outcome = read(&self.socket, &mut buf[start..]);
            buf.truncate(start + *outcome.as_ref().unwrap_or(&0));
            outcome
        };
        let read = *outcome.as_ref().unwrap_or(&0);
        // (Not after the end of the stream: a read there returns at once.)
        self.drained = (1..room).contains(&read);
        self.read_room = if read >= self.read_room {
            (self.read_room * 2).min(MAX_READ)
        } else {
            read.next_power_of_two().clamp(MIN_READ, MAX_READ)
        };
        outcome
    }

    /// Writes as much of `data` as the socket takes now; `WouldBlock` if it
    /// takes nothing.
    pub(crate) fn write_from(&mut self, data: &[u8]) -> io::Result<usize> {
        write(&self.socket, data)
    }

    /// Blocks until the socket is ready for what `interest` asks, `waker`
    /// is woken, or `deadline` passes. A socket with no interest is not
    /// watched at all (a peer that hung up meanwhile is noticed at the next
    /// read or write, not by a poll that would keep returning at once).
    pub(crate) fn wait(
        &mut self,
        interest: Interest,
        waker: &Waker,
        deadline: Option<Instant>,
    ) -> io::Result<()> {
        let mut flags = PollFlags::empty();
        if interest.read {
            flags |= PollFlags::IN;
        }
        if interest.write {
            flags |= PollFlags::OUT;
        }
        let socket = (!flags.is_empty()).then(|| (self.socket.as_fd(), flags));
        self.drained = false;
        wait(socket, waker, deadline)
    }

    pub(crate) fn peer(&self) -> io::Result<crate::peer::Peer> {
        crate::peer::of_socket(self.socket.as_fd())
    }
}

/// Connects to `endpoint` without waiting: a server whose accept queue is
/// full is `WouldBlock`, for the client to retry like a server not there
/// yet.
pub(crate) fn connect(endpoint: &Endpoint) -> io::Result<Stream> {
    let socket = crate::endpoint::unix::new_socket(true)?;
    rustix::net::connect(&socket, &SocketAddrUnix::new(endpoint.path())?)?;
    Ok(Stream::new(UnixStream::from(socket), Arrivals::AfterAWait))
}

/// Whether bytes may be waiting on a stream just made, before any wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrivals {
    /// Most likely: a server's connection, whose client sent its task as
    /// soon as it connected. The first read looks at once.
    Expected,
    /// Nothing is due before the wait: a client's connection, whose
    /// server answers only what is sent on it. The first read waits for
    /// the first wait, which returns at once if bytes came (a refusal sent
    /// on accepting, say), sparing a read that would find nothing.
    AfterAWait,
}

/// Wakes a thread blocked in a [`Stream::wait`] or [`Listener::wait`] from
/// another thread: an eventfd (Linux) or a self-pipe (elsewhere) that the
/// wait watches. Cheap to clone; clones wake the same thread.
#[derive(Debug, Clone)]
pub(crate) struct Waker {
    inner: Arc<WakeFd>,
}

/// What a waker writes to, and a wait watches.
#[derive(Debug)]
struct WakeFd {
    /// A wake-up has been written and the wait has not drained it yet: the
    /// wakes meanwhile write nothing. Pipelined callers each wake their
    /// connection's thread for the frame they queue; the thread writes
    /// every frame queued by the time it runs, so one write per round of
    /// the thread is enough, not one per frame (a system call each).
    pending: AtomicBool,
    /// Watched by the wait, and drained after it.
    watched: OwnedFd,
    /// Written to by `wake` (the same descriptor for an eventfd).
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    written: OwnedFd,
}

impl Waker {
    /// One descriptor on Linux (an eventfd), two elsewhere (a pipe).
    pub(crate) fn new() -> io::Result<Waker> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let inner = {
            use rustix::event::EventfdFlags;
            WakeFd {
                pending: AtomicBool::new(false),
                watched: rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?,
            }
        };
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let inner = {
            let (watched, written) = pipe()?;
            WakeFd {
                pending: AtomicBool::new(false),
                watched,
                written,
            }
        };
        Ok(Waker {
            inner: Arc::new(inner),
        })
    }

    /// Makes the waiting thread's current or next wait return.
    pub(crate) fn wake(&self) {
        // Whatever the waker did before this (queued a frame, set a flag)
        // is seen by the thread after its wait: the wait takes the flag
        // back with a swap, which reads this one's (or a later) swap.
        if self.inner.pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let written = loop {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            let written = rustix::io::write(&self.inner.watched, &1u64.to_ne_bytes());
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            let written = rustix::io::write(&self.inner.written, &[1]);
            if written != Err(rustix::io::Errno::INTR) {
                break written;
            }
        };
        // A full pipe, or a saturated counter, means a wake-up is pending
        // already: nothing is lost. Any other failure wrote nothing, and the
        // flag must not say otherwise: no later wake would write either.
        if matches!(written, Err(error) if error != rustix::io::Errno::AGAIN) {
            self.inner.pending.store(false, Ordering::Release);
        }
    }

    /// Empties it, so the next wait blocks again, and lets the next wake
    /// write again. Called after a wait returned and before the thread
    /// looks for work: a wake that wrote nothing because one was pending
    /// came after its waker's work was queued, so the thread finds that
    /// work on this round.
    fn drain(&self) {
        let mut sink = [0u8; 64];
        while matches!(rustix::io::read(&self.inner.watched, &mut sink), Ok(n) if n > 0) {}
        self.inner.pending.swap(false, Ordering::AcqRel);
    }
}

/// A non-blocking, close-on-exec pipe (read end, write end).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    #[cfg(not(target_vendor = "apple"))]
    {
        use rustix::pipe::PipeFlags;
        Ok(rustix::pipe::pipe_with(
            PipeFlags::CLOEXEC | PipeFlags::NONBLOCK,
        )?)
    }
    #[cfg(target_vendor = "apple")]
    {
        let (read, write) = rustix::pipe::pipe()?;
        for end in [&read, &write] {
            rustix::io::fcntl_setfd(end, rustix::io::FdFlags::CLOEXEC)?;
            rustix::io::ioctl_fionbio(end, true)?;
        }
        Ok((read, write))
    }
}

/// Polls the waker and, if given, a socket for `flags`, until `deadline`.
fn wait(
    socket: Option<(std::os::fd::BorrowedFd<'_>, PollFlags)>,
    waker: &Waker,
    deadline: Option<Instant>,
) -> io::Result<()> {
    let mut fds = Vec::with_capacity(2);
    fds.push(PollFd::new(&waker.inner.watched, PollFlags::IN));
    if let Some((socket, flags)) = socket {
        fds.push(PollFd::from_borrowed_fd(socket, flags));
    }
    let timeout = match deadline {
        Some(deadline) => Some(timespec_until(deadline)?),
        None => None,
    };
    match rustix::event::poll(&mut fds, timeout.as_ref()) {
        Ok(_) | Err(rustix::io::Errno::INTR) => {}
        Err(error) => return Err(error.into()),
    }
    if !fds[0].revents().is_empty() {
        waker.drain();
    }
    Ok(())
}

/// The time left until `deadline`, rounded up to a whole millisecond, so a
/// wait never ends just before its deadline and spins to reach it.
fn timespec_until(deadline: Instant) -> io::Result<Timespec> {
    let left = deadline.saturating_duration_since(Instant::now());
    let millis = left.as_nanos().div_ceil(1_000_000);
    let rounded = Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX));
    Timespec::try_from(rounded).map_err(|_| io::ErrorKind::InvalidInput.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ: Interest = Interest {
        read: true,
        write: false,
    };

    /// How many wake-ups were written since the last look (emptying the
    /// descriptor as a wait's drain does, but leaving the pending flag).
    fn take_written(waker: &Waker) -> u64 {
        let mut buf = [0u8; 64];
        match rustix::io::read(&waker.inner.watched, &mut buf) {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            Ok(8) => u64::from_ne_bytes(buf[..8].try_into().unwrap()),
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            Ok(n) => n as u64,
            Err(rustix::io::Errno::AGAIN) => 0,
            other => panic!("reading the waker: {other:?}"),
        }
    }

    #[test]
    fn wakes_before_a_wait_write_once_and_the_wait_lets_the_next_one_write() {
        let waker = Waker::new().unwrap();
        waker.wake();
        waker.wake();
        waker.clone().wake();
        assert_eq!(take_written(&waker), 1, "three wakes, one write");
        // What a wait does once it returns: afterwards a wake writes again,
        // or the next wait would block with a wake-up lost.
        waker.drain();
        waker.wake();
        assert_eq!(take_written(&waker), 1, "the wake after the drain wrote");
    }

    /// Two connected streams, as [`Stream::new`] takes them.
    fn pair() -> (Stream, Stream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (
            Stream::new(a, Arrivals::Expected),
            Stream::new(b, Arrivals::Expected),
        )
    }

    fn nonblocking(stream: &Stream) -> bool {
        rustix::fs::fcntl_getfl(&*stream.socket)
            .unwrap()
            .contains(rustix::fs::OFlags::NONBLOCK)
    }

    #[test]
    fn streams_are_non_blocking_and_only_a_clients_first_read_waits_for_a_wait() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let mut listener = Listener::wrap(UnixListener::bind(&path).unwrap()).unwrap();
        let endpoint = Endpoint::parse(path.to_str().unwrap()).unwrap();
        let mut client = connect(&endpoint).unwrap();
        let mut server = listener.accept().unwrap();
        assert!(nonblocking(&client), "connected non-blocking");
        assert!(nonblocking(&server), "accepted non-blocking");
        let mut buf = BytesMut::new();
        client.write_from(b"task").unwrap();
        // A server's first read looks at once: the task is there.
        assert_eq!(server.read_into(&mut buf, usize::MAX).unwrap(), 4);
        server.write_from(b"result").unwrap();
        // A client's does not (nothing was due before its task went out),
        // though the result has come; the wait finds it at once.
        assert_eq!(
            client.read_into(&mut buf, usize::MAX).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        client.wait(READ, &Waker::new().unwrap(), None).unwrap();
        assert_eq!(client.read_into(&mut buf, usize::MAX).unwrap(), 6);
        assert_eq!(&buf[..], b"taskresult");
    }

    #[test]
    fn a_waker_ends_a_wait_from_another_thread_and_then_resets() {
        let waker = Waker::new().unwrap();
        let remote = waker.clone();
        let woken = std::thread::spawn(move || remote.wake());
        // No socket, no deadline: only the waker can end this wait.
        wait(None, &waker, None).unwrap();
        woken.join().unwrap();
        let started = Instant::now();
        wait(None, &waker, Some(started + Duration::from_millis(20))).unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(20),
            "drained: the second wait ran to its deadline"
        );
    }

    #[test]
    fn reads_adapt_their_room_to_what_arrives() {
        let (mut reader, mut writer) = pair();
        let mut buf = BytesMut::new();
        assert_eq!(
            reader.read_into(&mut buf, usize::MAX).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        writer.write_from(&[7; MIN_READ]).unwrap();
        // The smallest room: read through the landing area.
        assert_eq!(reader.read_into(&mut buf, usize::MAX).unwrap(), MIN_READ);
        assert!(buf.iter().all(|&byte| byte == 7));
        assert_eq!(reader.read_room, MIN_READ * 2, "a full read doubles it");
        // Larger room: read in place, and what was not filled is dropped.
        writer.write_from(b"small").unwrap();
        assert_eq!(reader.read_into(&mut buf, usize::MAX).unwrap(), 5);
        assert_eq!(reader.read_room, MIN_READ);
        assert_eq!(buf.len(), MIN_READ + 5, "nothing but what was read is kept");
        assert_eq!(&buf[MIN_READ..], b"small");
        // The smallest room again: a short read keeps only what arrived.
        // (After a short read, a driver waits before it reads again.)
        writer.write_from(b"tail").unwrap();
        reader.wait(READ, &Waker::new().unwrap(), None).unwrap();
        assert_eq!(reader.read_into(&mut buf, usize::MAX).unwrap(), 4);
        assert_eq!(&buf[MIN_READ..], b"smalltail");
        drop(writer);
        reader.wait(READ, &Waker::new().unwrap(), None).unwrap();
        assert_eq!(
            reader.read_into(&mut buf, usize::MAX).unwrap(),
            0,
            "the end of the stream"
        );
    }

    #[test]
    fn after_a_read_that_emptied_the_socket_the_next_read_waits_for_a_wait() {
        let (mut reader, mut writer) = pair();
        let waker = Waker::new().unwrap();
        let mut buf = BytesMut::new();
        writer.write_from(b"first").unwrap();
        assert_eq!(reader.read_into(&mut buf, usize::MAX).unwrap(), 5);
        // More has come, but the read before found the socket empty: no
        // system call is spent on looking again before a wait.
        writer.write_from(b"second").unwrap();
        assert_eq!(
            reader.read_into(&mut buf, usize::MAX).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        // The wait sees the bytes there (it would block otherwise: no
        // deadline, and nothing wakes the waker) and the read takes them.
        reader.wait(READ, &waker, None).unwrap();
        assert_eq!(reader.read_into(&mut buf, usize::MAX).unwrap(), 6);
        assert_eq!(&buf[..], b"firstsecond");
        // A read that fills its room leaves the next one free to look.
        writer.write_from(&[1; MIN_READ + 1]).unwrap();
        reader.wait(READ, &waker, None).unwrap();
        assert_eq!(reader.read_into(&mut buf, MIN_READ).unwrap(), MIN_READ);
        assert_eq!(reader.read_into(&mut buf, usize::MAX).unwrap(), 1);
    }
}
