//! The one module with `unsafe`: Windows calls with no safe wrapper in the
//! crates we use, each behind a safe function or type.
//!
//! * Pipe instances with the owner-only security descriptor, the one way
//!   the `tokio` and `legacy` backends create them
//!   ([`create_pipe_instance`]), and their hand-over to Tokio.
//! * Reading who owns a pipe a client has reached, so that the client can
//!   refuse a pipe name squatted by another user ([`pipe_owner`]).
//! * The `legacy` backend's overlapped pipe I/O ([`PipeIo`]), its events,
//!   and the wait that puts a deadline on them ([`wait_any`]).

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::io;
use std::os::windows::io::{AsRawHandle, BorrowedHandle, FromRawHandle, OwnedHandle};
use std::ptr;

use windows_sys::Win32::Foundation::{HANDLE, INVALID_HANDLE_VALUE, LocalFree};
use windows_sys::Win32::Security::Authorization::{
    ConvertSidToStringSidW, ConvertStringSecurityDescriptorToSecurityDescriptorW, GetSecurityInfo,
    SDDL_REVISION_1, SE_KERNEL_OBJECT,
};
use windows_sys::Win32::Security::{
    EqualSid, GetTokenInformation, IsWellKnownSid, OWNER_SECURITY_INFORMATION,
    PSECURITY_DESCRIPTOR, PSID, SECURITY_ATTRIBUTES, TOKEN_INFORMATION_CLASS, TOKEN_OWNER,
    TOKEN_QUERY, TOKEN_USER, TokenOwner, TokenUser, WinBuiltinAdministratorsSid, WinLocalSystemSid,
};
use windows_sys::Win32::Storage::FileSystem::{
    FILE_FLAG_FIRST_PIPE_INSTANCE, FILE_FLAG_OVERLAPPED, PIPE_ACCESS_DUPLEX,
};
use windows_sys::Win32::System::Pipes::{
    CreateNamedPipeW, PIPE_READMODE_BYTE, PIPE_REJECT_REMOTE_CLIENTS, PIPE_TYPE_BYTE,
    PIPE_UNLIMITED_INSTANCES, PIPE_WAIT,
};
use windows_sys::Win32::System::Threading::{GetCurrentProcess, OpenProcessToken};

#[cfg(feature = "ipc-legacy")]
pub(crate) use self::overlapped::{Event, PipeIo, client_process_id, wait_any};

// ---- pipe instances ---------------------------------------------------------

/// A self-relative security descriptor owned by this value (freed on drop).
struct SecurityDescriptor(PSECURITY_DESCRIPTOR);

impl SecurityDescriptor {
    /// Parses a security descriptor in SDDL.
    fn from_sddl(sddl: &str) -> io::Result<SecurityDescriptor> {
        let wide = wide(sddl);
        let mut descriptor: PSECURITY_DESCRIPTOR = ptr::null_mut();
        // SAFETY: `wide` is NUL-terminated UTF-16 that outlives the call;
        // `descriptor` is a valid out-pointer; the size out-pointer may be null.
        let ok = unsafe {
            ConvertStringSecurityDescriptorToSecurityDescriptorW(
                wide.as_ptr(),
                SDDL_REVISION_1,
                &mut descriptor,
                ptr::null_mut(),
            )
        };
        if ok == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(SecurityDescriptor(descriptor))
    }
}

impl Drop for SecurityDescriptor {
    fn drop(&mut self) {
        // SAFETY: the descriptor was allocated with LocalAlloc by
        // ConvertStringSecurityDescriptorToSecurityDescriptorW and is freed
        // exactly once, here.
        unsafe {
            LocalFree(self.0);
        }
    }
}

/// `text` as NUL-terminated UTF-16.
fn wide(text: &str) -> Vec<u16> {
    text.encode_utf16().chain(std::iter::once(0)).collect()
}

/// Pipe buffer size requested for each direction (Tokio's default too).
pub(crate) const PIPE_BUFFER_BYTES: u32 = 64 * 1024;

/// How every pipe instance is created: a byte stream, blocking mode for
/// synchronous calls (every call here is overlapped anyway), and remote
/// clients refused by the pipe itself.
const PIPE_MODE: u32 = PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS;

/// How a pipe instance is opened: duplex, overlapped, and for the first
/// instance of a name, refused if the name exists already.
fn open_mode(first: bool) -> u32 {
    let mode = PIPE_ACCESS_DUPLEX | FILE_FLAG_OVERLAPPED;
    if first {
        mode | FILE_FLAG_FIRST_PIPE_INSTANCE
    } else {
        mode
    }
}

/// Creates one instance of the named pipe `name`, with the security
/// descriptor `sddl`: duplex, byte mode, opened for overlapped I/O, 64 KiB
/// buffers, remote clients refused (`PIPE_REJECT_REMOTE_CLIENTS`). With
/// `first`, the creation fails if the name exists already
/// (`FILE_FLAG_FIRST_PIPE_INSTANCE`), so a second server cannot start.
pub(crate) fn create_pipe_instance(name: &str, first: bool, sddl: &str) -> io::Result<OwnedHandle> {
    let descriptor = SecurityDescriptor::from_sddl(sddl)?;
    let attributes = SECURITY_ATTRIBUTES {
        nLength: std::mem::size_of::<SECURITY_ATTRIBUTES>() as u32,
        lpSecurityDescriptor: descriptor.0,
        bInheritHandle: 0,
    };
    let name = wide(name);
    // SAFETY: `name` is NUL-terminated UTF-16 and `attributes` a properly
    // sized SECURITY_ATTRIBUTES whose descriptor is valid; all outlive the
    // call, which copies what it keeps.
    let handle = unsafe {
        CreateNamedPipeW(
            name.as_ptr(),
            open_mode(first),
            PIPE_MODE,
            PIPE_UNLIMITED_INSTANCES,
            PIPE_BUFFER_BYTES,
            PIPE_BUFFER_BYTES,
            0,
            &attributes,
        )
    };
    if handle == INVALID_HANDLE_VALUE {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a valid handle just created for us, closed once by its owner.
    Ok(unsafe { OwnedHandle::from_raw_handle(handle) })
}

/// Hands a pipe instance from [`create_pipe_instance`] to Tokio.
#[cfg(feature = "ipc-tokio")]
pub(crate) fn tokio_pipe_server(
    instance: OwnedHandle,
) -> io::Result<tokio::net::windows::named_pipe::NamedPipeServer> {
    use std::os::windows::io::IntoRawHandle;
    let raw = instance.into_raw_handle();
    // SAFETY: `raw` is a named pipe server handle opened for overlapped I/O
    // (create_pipe_instance), whose ownership passes to Tokio here: nothing
    // else closes it. Must be called within a runtime, as the callers are.
    unsafe { tokio::net::windows::named_pipe::NamedPipeServer::from_raw_handle(raw) }
}

/// The pipe instances the `tokio` and `legacy` backends serve on (the
/// `interprocess` backend's options are tested in its own module).
#[cfg(test)]
mod instance_tests {
    use std::os::windows::io::AsRawHandle;

    use windows_sys::Win32::System::Pipes::{GetNamedPipeInfo, PIPE_SERVER_END};

    use super::*;

    #[test]
    fn pipe_instances_refuse_remote_clients_and_get_large_buffers() {
        assert_ne!(
            PIPE_MODE & PIPE_REJECT_REMOTE_CLIENTS,
            0,
            "PIPE_REJECT_REMOTE_CLIENTS must be set"
        );
        let name = format!(r"\\.\pipe\daemoneye-test-instance-{}", std::process::id());
        let instance = create_pipe_instance(&name, true, "D:P(A;;GA;;;OW)").unwrap();
        let (mut flags, mut out_size, mut in_size) = (0u32, 0u32, 0u32);
        // SAFETY: the handle is open (owned above); the out-pointers are
        // valid for the call, and the one left null is optional.
        let ok = unsafe {
            GetNamedPipeInfo(
                instance.as_raw_handle(),
                &mut flags,
                &mut out_size,
                &mut in_size,
                std::ptr::null_mut(),
            )
        };
        assert_ne!(ok, 0, "{}", io::Error::last_os_error());
        assert_ne!(flags & PIPE_SERVER_END, 0, "a server end");
        assert_eq!((out_size, in_size), (PIPE_BUFFER_BYTES, PIPE_BUFFER_BYTES));
        // A first instance refuses a live name. Wine 8 ignores the flag (the
        // refusal is then the probe's, shown by
        // `a_second_server_on_a_live_pipe_is_refused`), so there only the
        // request is checked; on Windows, the refusal too.
        assert_ne!(open_mode(true) & FILE_FLAG_FIRST_PIPE_INSTANCE, 0);
        assert_eq!(open_mode(false) & FILE_FLAG_FIRST_PIPE_INSTANCE, 0);
        if !cfg!(wine) {
            let second = create_pipe_instance(&name, true, "D:P(A;;GA;;;OW)");
            assert!(second.is_err(), "a second first instance was created");
        }
    }
}

// ---- who owns a pipe --------------------------------------------------------

/// Who owns a named pipe: the account its first instance was created under
/// (a server's descriptor names no owner, so Windows fills in the creator's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PipeOwner {
    /// The owner's SID in string form, e.g. `S-1-5-18`.
    pub(crate) sid: String,
    /// The owner is this process's own account (its user, or the default
    /// owner its token gives new objects), SYSTEM or Administrators: the
    /// accounts a server's descriptor admits, and the only ones a client
    /// trusts to serve it.
    pub(crate) trusted: bool,
}

/// The owner of the pipe behind `handle`, read from its security descriptor
/// (the handle needs `READ_CONTROL`, which `GENERIC_READ` includes).
pub(crate) fn pipe_owner(handle: BorrowedHandle<'_>) -> io::Result<PipeOwner> {
    let mut owner: PSID = ptr::null_mut();
    let mut descriptor: PSECURITY_DESCRIPTOR = ptr::null_mut();
    // SAFETY: the handle is open for the duration of the call (borrowed);
    // the out-pointers are valid; group, DACL and SACL are not requested.
    let status = unsafe {
        GetSecurityInfo(
            handle.as_raw_handle(),
            SE_KERNEL_OBJECT,
            OWNER_SECURITY_INFORMATION,
            &mut owner,
            ptr::null_mut(),
            ptr::null_mut(),
            ptr::null_mut(),
            &mut descriptor,
        )
    };
    if status != 0 {
        return Err(io::Error::from_raw_os_error(status as i32));
    }
    // `owner` points into the descriptor: it lives as long as this guard.
    let _descriptor = LocalAllocation(descriptor);
    if owner.is_null() {
        return Err(io::Error::other(
            "the pipe's security descriptor names no owner",
        ));
    }
    // SAFETY (both calls): `owner` is a valid SID inside the descriptor.
    let well_known = |kind| unsafe { IsWellKnownSid(owner, kind) } != 0;
    let trusted = well_known(WinLocalSystemSid)
        || well_known(WinBuiltinAdministratorsSid)
        || is_own_account(owner)?;
    Ok(PipeOwner {
        sid: sid_string(owner)?,
        trusted,
    })
}

/// Whether `sid` is one this process creates objects as: its user, or its
/// token's default owner (the user, or Administrators for some elevated
/// accounts; Wine uses a group of its own).
fn is_own_account(sid: PSID) -> io::Result<bool> {
    let mut raw_token: HANDLE = ptr::null_mut();
    // SAFETY: GetCurrentProcess returns a pseudo-handle that needs no
    // closing; `raw_token` is a valid out-pointer.
    if unsafe { OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &mut raw_token) } == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the token handle was just opened for us and is closed once, by
    // this owner.
    let token = unsafe { OwnedHandle::from_raw_handle(raw_token) };
    let user = token_information(&token, TokenUser)?;
    let owner = token_information(&token, TokenOwner)?;
    // SAFETY: each buffer holds the structure its class asked for, written
    // by GetTokenInformation, aligned for it, and the SID it points to lies
    // within the same buffer, alive for the comparison. `sid` is valid.
    let matches = unsafe {
        let user_sid = (*user.as_ptr().cast::<TOKEN_USER>()).User.Sid;
        let owner_sid = (*owner.as_ptr().cast::<TOKEN_OWNER>()).Owner;
        EqualSid(sid, user_sid) != 0 || EqualSid(sid, owner_sid) != 0
    };
    Ok(matches)
}

/// One class of information about `token`, in a buffer aligned for the
/// pointers the structures hold.
fn token_information(token: &OwnedHandle, class: TOKEN_INFORMATION_CLASS) -> io::Result<Vec<u64>> {
    let mut needed = 0u32;
    // SAFETY: a size query: no buffer, a valid out-pointer for the size. It
    // fails with ERROR_INSUFFICIENT_BUFFER by design.
    unsafe {
        GetTokenInformation(
            token.as_raw_handle(),
            class,
            ptr::null_mut(),
            0,
            &mut needed,
        );
    }
    let mut buffer = vec![0u64; (needed as usize).div_ceil(8).max(1)];
    let capacity = u32::try_from(buffer.len() * 8).unwrap_or(u32::MAX);
    // SAFETY: `buffer` is writable for `capacity` bytes and 8-byte aligned;
    // the token is open.
    let filled = unsafe {
        GetTokenInformation(
            token.as_raw_handle(),
            class,
            buffer.as_mut_ptr().cast::<c_void>(),
            capacity,
            &mut needed,
        )
    };
    if filled == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(buffer)
}

/// `sid` as text (`S-1-5-...`).
fn sid_string(sid: PSID) -> io::Result<String> {
    let mut text: *mut u16 = ptr::null_mut();
    // SAFETY: `sid` is a valid SID; `text` is a valid out-pointer.
    if unsafe { ConvertSidToStringSidW(sid, &mut text) } == 0 {
        return Err(io::Error::last_os_error());
    }
    let _text = LocalAllocation(text.cast());
    // SAFETY: the call above returned a NUL-terminated UTF-16 string, alive
    // until the guard frees it; reads stop at the NUL.
    let units = unsafe {
        let length = (0..).take_while(|&i| *text.add(i) != 0).count();
        std::slice::from_raw_parts(text, length)
    };
    Ok(String::from_utf16_lossy(units))
}

/// Memory a Win32 call allocated with `LocalAlloc` for us; freed on drop.
struct LocalAllocation(*mut c_void);

impl Drop for LocalAllocation {
    fn drop(&mut self) {
        // SAFETY: the pointer came from LocalAlloc (through the call that
        // returned it) and is freed exactly once, here.
        unsafe {
            LocalFree(self.0);
        }
    }
}

// ---- overlapped pipe I/O (the legacy backend) -------------------------------

#[cfg(feature = "ipc-legacy")]
mod overlapped {
    use std::io;
    use std::os::windows::io::{AsHandle, AsRawHandle, BorrowedHandle, FromRawHandle, OwnedHandle};
    use std::ptr::{self, NonNull};
    use std::time::Duration;

    use windows_sys::Win32::Foundation::{
        ERROR_BROKEN_PIPE, ERROR_IO_INCOMPLETE, ERROR_IO_PENDING, ERROR_NO_DATA,
        ERROR_PIPE_CONNECTED, HANDLE, WAIT_FAILED, WAIT_TIMEOUT,
    };
    use windows_sys::Win32::Storage::FileSystem::{ReadFile, WriteFile};
    use windows_sys::Win32::System::IO::{CancelIoEx, GetOverlappedResult, OVERLAPPED};
    use windows_sys::Win32::System::Pipes::{ConnectNamedPipe, GetNamedPipeClientProcessId};
    use windows_sys::Win32::System::Threading::{
        CreateEventW, INFINITE, SetEvent, WaitForMultipleObjects,
    };

    /// A Win32 event object.
    #[derive(Debug)]
    pub(crate) struct Event(OwnedHandle);

    impl Event {
        /// A new, unsignalled event. An auto-reset one unsignals itself when
        /// a wait returns for it; a manual-reset one stays signalled until
        /// the next overlapped operation that uses it starts.
        pub(crate) fn new(manual_reset: bool) -> io::Result<Event> {
            // SAFETY: no security attributes, no name: plain arguments.
            let handle =
                unsafe { CreateEventW(ptr::null(), i32::from(manual_reset), 0, ptr::null()) };
            if handle.is_null() {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a valid handle just created for us, closed once.
            Ok(Event(unsafe { OwnedHandle::from_raw_handle(handle) }))
        }

        /// Signals the event.
        pub(crate) fn set(&self) {
            // SAFETY: the handle is a live event owned by `self`. Failure is
            // impossible for a valid event handle.
            unsafe {
                SetEvent(self.0.as_raw_handle());
            }
        }

        pub(crate) fn handle(&self) -> BorrowedHandle<'_> {
            self.0.as_handle()
        }
    }

    /// Waits until one of `handles` is signalled or `timeout` passes
    /// (`None`: no limit).
    pub(crate) fn wait_any(
        handles: &[BorrowedHandle<'_>],
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        let raw: Vec<HANDLE> = handles.iter().map(AsRawHandle::as_raw_handle).collect();
        let millis = match timeout {
            // Rounded up, so a wait never ends just before its deadline.
            Some(timeout) => u32::try_from(timeout.as_nanos().div_ceil(1_000_000))
                .unwrap_or(INFINITE - 1)
                .min(INFINITE - 1),
            None => INFINITE,
        };
        // SAFETY: `raw` holds `raw.len()` (at most a handful) handles, each
        // borrowed and so open for the call.
        let outcome = unsafe { WaitForMultipleObjects(raw.len() as u32, raw.as_ptr(), 0, millis) };
        if outcome == WAIT_FAILED {
            return Err(io::Error::last_os_error());
        }
        debug_assert!(outcome == WAIT_TIMEOUT || (outcome as usize) < raw.len());
        Ok(())
    }

    /// The process id of the client connected to a server pipe instance.
    pub(crate) fn client_process_id(pipe: BorrowedHandle<'_>) -> io::Result<u32> {
        let mut pid = 0u32;
        // SAFETY: the handle is open (borrowed); `pid` is a valid out-pointer.
        if unsafe { GetNamedPipeClientProcessId(pipe.as_raw_handle(), &mut pid) } == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(pid)
    }

    /// One overlapped operation's slot: its `OVERLAPPED` (whose event is
    /// signalled on completion) and its buffer.
    ///
    /// The kernel writes both while an operation is in flight, from the call
    /// that starts it until its completion is seen (`GetOverlappedResult`)
    /// or it is cancelled and waited for. So they are not Rust values this
    /// struct holds (a `&mut` to the slot would then claim memory the kernel
    /// is writing) but allocations it owns through raw pointers, from
    /// `Box::into_raw`: they never move, and Rust code makes a reference
    /// into them only while no operation is pending ([`prepare`](Self::prepare),
    /// [`filled`](Self::filled), [`fill`](Self::fill) check). They are freed
    /// on drop, and leaked rather than freed if an operation could still be
    /// pending then (the owner cancels and waits first).
    struct Operation {
        overlapped: NonNull<OVERLAPPED>,
        buffer: NonNull<[u8]>,
        event: Event,
        /// Issued and not yet seen complete: the kernel may write the
        /// `OVERLAPPED` and the buffer.
        pending: bool,
    }

    // SAFETY: the allocations behind the pointers are owned by this value
    // alone, and the kernel finds an operation by its OVERLAPPED's address
    // (which does not move), not by the thread that started it; the event
    // handle is a process-wide value. So an Operation may move to another
    // thread. It is not Sync: `&self` methods read no memory the kernel
    // writes, and every other use takes `&mut self`.
    unsafe impl Send for Operation {}

    impl Operation {
        fn new(buffer_size: usize) -> io::Result<Operation> {
            let event = Event::new(true)?;
            let overlapped = Box::new(OVERLAPPED {
                hEvent: event.0.as_raw_handle(),
                ..OVERLAPPED::default()
            });
            let buffer = vec![0u8; buffer_size].into_boxed_slice();
            Ok(Operation {
                overlapped: NonNull::from(Box::leak(overlapped)),
                buffer: NonNull::from(Box::leak(buffer)),
                event,
                pending: false,
            })
        }

        fn capacity(&self) -> usize {
            self.buffer.len()
        }

        /// A fresh `OVERLAPPED` (keeping its event) for a new operation, as
        /// the pointer to hand the call that starts it. Refused while an
        /// operation is pending: the kernel would still be using this one.
        fn prepare(&mut self) -> io::Result<*mut OVERLAPPED> {
            if self.pending {
                return Err(io::Error::other(
                    "an overlapped operation is already in flight on this slot",
                ));
            }
            let fresh = OVERLAPPED {
                hEvent: self.event.0.as_raw_handle(),
                ..OVERLAPPED::default()
            };
            // SAFETY: the pointer is valid for writes and aligned (it came
            // from a Box and is freed only on drop); no operation is pending,
            // so the kernel does not use this memory now.
            unsafe { self.overlapped.as_ptr().write(fresh) };
            Ok(self.overlapped.as_ptr())
        }

        /// Copies the first bytes of `data` (as many as fit) into the buffer
        /// for a write about to start; `None` while an operation is
        /// pending.
        fn fill(&mut self, data: &[u8]) -> Option<usize> {
            if self.pending {
                return None;
            }
            let length = data.len().min(self.capacity());
            // SAFETY: the buffer is valid for `capacity` bytes of writes and
            // `length` is at most that; no operation is pending, so nothing
            // else uses it; `data` is a separate allocation.
            unsafe {
                ptr::copy_nonoverlapping(data.as_ptr(), self.buffer.as_ptr().cast::<u8>(), length);
            }
            Some(length)
        }

        /// The first `count` bytes the operation that just completed left
        /// in the buffer; `None` while one is pending.
        fn filled(&self, count: usize) -> Option<&[u8]> {
            if self.pending {
                return None;
            }
            let count = count.min(self.capacity());
            // SAFETY: the buffer is valid and initialised for `capacity`
            // bytes (zeroed when allocated, then written only by the kernel
            // and `fill`); no operation is pending, so nothing writes it
            // while the returned slice, tied to `&self`, lives (writing
            // needs `&mut self`).
            Some(unsafe { std::slice::from_raw_parts(self.buffer.as_ptr().cast::<u8>(), count) })
        }
    }

    impl Drop for Operation {
        fn drop(&mut self) {
            if self.pending {
                // The owner cancels and waits before dropping; if that wait
                // failed, the kernel might still write here: leak it.
                return;
            }
            // SAFETY: both came from Box::leak in `new`, are freed once,
            // here, and no operation uses them (none is pending).
            unsafe {
                drop(Box::from_raw(self.overlapped.as_ptr()));
                drop(Box::from_raw(self.buffer.as_ptr()));
            }
        }
    }

    /// How an operation that was started turned out so far.
    enum Started {
        Pending,
        Failed(io::Error),
    }

    /// After ReadFile/WriteFile/ConnectNamedPipe returned: an operation
    /// that completed at once or is pending is `Pending` (its completion is
    /// collected like any other, through GetOverlappedResult); anything else
    /// failed and is not pending.
    fn started(succeeded: bool) -> Started {
        if succeeded {
            return Started::Pending;
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(ERROR_IO_PENDING as i32) {
            Started::Pending
        } else {
            Started::Failed(error)
        }
    }

    /// A pipe handle opened for overlapped I/O with one read and one write
    /// slot. Dropping it cancels whatever is in flight and waits for the
    /// kernel to let go of the buffers before freeing them, then closes
    /// the handle.
    pub(crate) struct PipeIo {
        read: Operation,
        write: Operation,
        pipe: OwnedHandle,
    }

    impl std::fmt::Debug for PipeIo {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("PipeIo")
                .field("pipe", &self.pipe)
                .field("read_pending", &self.read.pending)
                .field("write_pending", &self.write.pending)
                .finish()
        }
    }

    impl PipeIo {
        /// `pipe` must have been opened with `FILE_FLAG_OVERLAPPED`.
        pub(crate) fn new(pipe: OwnedHandle, buffer_size: usize) -> io::Result<PipeIo> {
            Ok(PipeIo {
                read: Operation::new(buffer_size)?,
                write: Operation::new(buffer_size)?,
                pipe,
            })
        }

        pub(crate) fn handle(&self) -> BorrowedHandle<'_> {
            self.pipe.as_handle()
        }

        /// The event signalled when the read (or connect) completes.
        pub(crate) fn read_event(&self) -> BorrowedHandle<'_> {
            self.read.event.handle()
        }

        /// The event signalled when the write completes.
        pub(crate) fn write_event(&self) -> BorrowedHandle<'_> {
            self.write.event.handle()
        }

        pub(crate) fn read_pending(&self) -> bool {
            self.read.pending
        }

        pub(crate) fn write_pending(&self) -> bool {
            self.write.pending
        }

        /// Server instance: starts waiting for a client (in the read slot).
        /// `Ok(true)` if one is connected already. An error if a connect or
        /// read is in flight already.
        pub(crate) fn start_connect(&mut self) -> io::Result<bool> {
            let overlapped = self.read.prepare()?;
            // SAFETY: the pipe handle is open (owned by self); `overlapped`
            // points to memory `self.read` owns, which stays put and is not
            // freed or touched by Rust while the operation is pending (see
            // Operation).
            let ok = unsafe { ConnectNamedPipe(self.pipe.as_raw_handle(), overlapped) } != 0;
            if !ok && io::Error::last_os_error().raw_os_error() == Some(ERROR_PIPE_CONNECTED as i32)
            {
                return Ok(true);
            }
            match started(ok) {
                Started::Pending => {
                    self.read.pending = true;
                    Ok(false)
                }
                // A client that connected and left already: nothing to serve.
                Started::Failed(error) if error.raw_os_error() == Some(ERROR_NO_DATA as i32) => {
                    Err(io::ErrorKind::ConnectionAborted.into())
                }
                Started::Failed(error) => Err(error),
            }
        }

        /// Starts reading at most `max` bytes into the read slot's buffer,
        /// if no read is in flight (`Ok(true)` then as well). `Ok(false)` if
        /// the peer had closed its end already: the end of the stream, as
        /// [`poll_read`](Self::poll_read) reports one that closes during a
        /// read.
        pub(crate) fn start_read(&mut self, max: usize) -> io::Result<bool> {
            if self.read.pending {
                return Ok(true);
            }
            let length = u32::try_from(self.read.capacity().min(max)).unwrap_or(u32::MAX);
            let buffer = self.read.buffer.as_ptr().cast::<u8>();
            let overlapped = self.read.prepare()?;
            // SAFETY: `buffer` is valid for writes of `length` bytes (at most
            // its capacity); it and `overlapped` are memory `self.read` owns,
            // which stays put and which Rust neither touches nor frees while
            // the operation is pending (see Operation).
            let ok = unsafe {
                ReadFile(
                    self.pipe.as_raw_handle(),
                    buffer,
                    length,
                    ptr::null_mut(),
                    overlapped,
                )
            } != 0;
            match started(ok) {
                Started::Pending => {
                    self.read.pending = true;
                    Ok(true)
                }
                Started::Failed(error)
                    if error.raw_os_error() == Some(ERROR_BROKEN_PIPE as i32) =>
                {
                    Ok(false)
                }
                Started::Failed(error) => Err(error),
            }
        }

        /// Starts writing the first bytes of `data` (as many as the write
        /// slot holds), if no write is in flight; returns how many were
        /// handed to the kernel (0 if a write is in flight already).
        pub(crate) fn start_write(&mut self, data: &[u8]) -> io::Result<usize> {
            if data.is_empty() {
                return Ok(0);
            }
            let Some(length) = self.write.fill(data) else {
                return Ok(0);
            };
            let buffer = self.write.buffer.as_ptr().cast::<u8>().cast_const();
            let overlapped = self.write.prepare()?;
            // SAFETY: `buffer` holds `length` initialised bytes (just
            // copied); it and `overlapped` are memory `self.write` owns,
            // which stays put and which Rust neither touches nor frees while
            // the operation is pending (see Operation).
            let ok = unsafe {
                WriteFile(
                    self.pipe.as_raw_handle(),
                    buffer,
                    length as u32,
                    ptr::null_mut(),
                    overlapped,
                )
            } != 0;
            match started(ok) {
                Started::Pending => {
                    self.write.pending = true;
                    Ok(length)
                }
                Started::Failed(error) => Err(error),
            }
        }

        /// The read (or connect) in flight, if it has completed: the bytes
        /// read (empty at the end of the stream, or for a connect).
        pub(crate) fn poll_read(&mut self) -> Option<io::Result<&[u8]>> {
            match self.poll(Slot::Read)? {
                Ok(count) => Some(Ok(self.read.filled(count).expect("just completed"))),
                // The peer closed its end: the end of the stream.
                Err(error) if error.raw_os_error() == Some(ERROR_BROKEN_PIPE as i32) => {
                    Some(Ok(&[]))
                }
                Err(error) => Some(Err(error)),
            }
        }

        /// The write in flight, if it has completed: the bytes written.
        pub(crate) fn poll_write(&mut self) -> Option<io::Result<usize>> {
            self.poll(Slot::Write)
        }

        fn poll(&mut self, slot: Slot) -> Option<io::Result<usize>> {
            let operation = match slot {
                Slot::Read => &mut self.read,
                Slot::Write => &mut self.write,
            };
            if !operation.pending {
                return None;
            }
            let mut count = 0u32;
            // SAFETY: the operation was issued on this open pipe with this
            // OVERLAPPED, which is still valid; bWait = FALSE only asks how
            // it stands. The kernel reads the OVERLAPPED through the pointer;
            // no Rust reference to it exists.
            let done = unsafe {
                GetOverlappedResult(
                    self.pipe.as_raw_handle(),
                    operation.overlapped.as_ptr(),
                    &mut count,
                    0,
                )
            } != 0;
            if !done {
                let error = io::Error::last_os_error();
                if error.raw_os_error() == Some(ERROR_IO_INCOMPLETE as i32) {
                    return None;
                }
                operation.pending = false;
                return Some(Err(error));
            }
            operation.pending = false;
            Some(Ok(count as usize))
        }

        /// Cancels the operation in `slot`, if one is in flight, and waits
        /// until the kernel has let go of its memory.
        fn cancel(&mut self, slot: Slot) {
            let operation = match slot {
                Slot::Read => &mut self.read,
                Slot::Write => &mut self.write,
            };
            if !operation.pending {
                return;
            }
            let mut count = 0u32;
            // SAFETY: cancelling, then waiting (bWait = TRUE) for, the one
            // operation issued with this OVERLAPPED on this open pipe: once
            // the wait returns, the operation has completed or been
            // cancelled, and the kernel no longer touches the OVERLAPPED or
            // the buffer.
            let waited = unsafe {
                CancelIoEx(self.pipe.as_raw_handle(), operation.overlapped.as_ptr());
                GetOverlappedResult(
                    self.pipe.as_raw_handle(),
                    operation.overlapped.as_ptr(),
                    &mut count,
                    1,
                )
            } != 0;
            let error = io::Error::last_os_error().raw_os_error();
            // Done, cancelled, or failed on its own: not pending any more. A
            // wait that failed for another reason says nothing: the memory
            // is then leaked rather than freed (see Operation's drop).
            if waited || matches!(error, Some(code) if code != ERROR_IO_INCOMPLETE as i32) {
                operation.pending = false;
            }
        }
    }

    #[derive(Clone, Copy)]
    enum Slot {
        Read,
        Write,
    }

    impl Drop for PipeIo {
        fn drop(&mut self) {
            self.cancel(Slot::Read);
            self.cancel(Slot::Write);
            // Then the fields drop: the buffers, then the pipe handle.
        }
    }

    /// The unsafe code above, where it matters most: operations cancelled
    /// and dropped while the kernel still holds their memory. Run under
    /// Wine by ci/cross-test.sh.
    #[cfg(test)]
    mod tests {
        use std::os::windows::io::OwnedHandle;
        use std::time::{Duration, Instant};

        use super::*;
        use crate::endpoint::Endpoint;
        use crate::endpoint::windows::{create_pipe_instance, open_pipe};

        /// A connected pair of overlapped pipe ends: (server, client).
        fn pair(name: &str) -> (PipeIo, PipeIo) {
            let endpoint = Endpoint::parse(&format!("{name}-{}", std::process::id())).unwrap();
            let mut server =
                PipeIo::new(create_pipe_instance(&endpoint, true).unwrap(), 4096).unwrap();
            let waiting = !server.start_connect().unwrap();
            let client = PipeIo::new(open_pipe(&endpoint).unwrap(), 4096).unwrap();
            if waiting {
                let connected = wait_for(|| server.poll_read().map(|outcome| outcome.map(drop)));
                connected.unwrap();
            }
            (server, client)
        }

        /// Polls until `poll` has an answer, for at most ten seconds.
        fn wait_for<T>(mut poll: impl FnMut() -> Option<T>) -> T {
            let give_up = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(answer) = poll() {
                    return answer;
                }
                assert!(Instant::now() < give_up, "nothing happened in 10 s");
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        #[test]
        fn a_read_in_flight_is_cancelled_and_waited_for_when_its_pipe_is_dropped() {
            let (mut server, mut client) = pair("daemoneye-test-drop-read");
            assert!(server.start_read(4096).unwrap());
            assert!(server.read_pending(), "nothing to read: the read waits");
            drop(server);
            // The kernel let go of the server's buffer before it was freed,
            // and the client sees the pipe's end.
            let ended = if client.start_read(4096).unwrap() {
                wait_for(|| client.poll_read().map(|read| read.map(<[u8]>::is_empty))).unwrap()
            } else {
                true
            };
            assert!(ended, "the client reads the end of the stream");
        }

        #[test]
        fn a_write_in_flight_is_cancelled_and_waited_for_when_its_pipe_is_dropped() {
            let (mut server, client) = pair("daemoneye-test-drop-write");
            // The client reads nothing: writes fill the pipe until one waits.
            let data = vec![7u8; 4096];
            let mut waited = false;
            for _ in 0..1024 {
                server.start_write(&data).unwrap();
                if server.poll_write().is_none() {
                    waited = true;
                    break;
                }
            }
            assert!(waited, "some write waits for a reader");
            drop(server);
            drop(client);
        }

        #[test]
        fn a_connect_in_flight_is_cancelled_and_waited_for_when_its_instance_is_dropped() {
            let endpoint = Endpoint::parse(&format!(
                "daemoneye-test-drop-connect-{}",
                std::process::id()
            ))
            .unwrap();
            let instance: OwnedHandle = create_pipe_instance(&endpoint, true).unwrap();
            let mut server = PipeIo::new(instance, 4096).unwrap();
            assert!(!server.start_connect().unwrap(), "no client yet");
            assert!(server.read_pending());
            drop(server);
        }

        #[test]
        fn a_second_operation_on_a_busy_slot_is_refused_not_started() {
            let endpoint =
                Endpoint::parse(&format!("daemoneye-test-busy-slot-{}", std::process::id()))
                    .unwrap();
            let mut server =
                PipeIo::new(create_pipe_instance(&endpoint, true).unwrap(), 4096).unwrap();
            assert!(!server.start_connect().unwrap());
            // In release builds too: the OVERLAPPED in flight is not reused.
            let error = server.start_connect().unwrap_err();
            assert!(error.to_string().contains("already in flight"), "{error}");
            // A read on the same slot waits for the connect instead.
            assert!(server.start_read(4096).unwrap());
            assert!(server.read_pending());
        }
    }
}
