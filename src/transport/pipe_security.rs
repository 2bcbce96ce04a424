//! The one module with `unsafe`: Windows security calls with no safe
//! wrapper in the crates we use.
//!
//! * Giving a Tokio named pipe a security descriptor: Tokio only accepts raw
//!   `SECURITY_ATTRIBUTES`, and building a descriptor from SDDL is a Win32
//!   call. (The interprocess backend uses interprocess' safe
//!   `SecurityDescriptor` instead.)
//! * Reading who owns a pipe a client has reached, so that the client can
//!   refuse a pipe name squatted by another user.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::io;
use std::os::windows::io::{AsRawHandle, BorrowedHandle, FromRawHandle, OwnedHandle};
use std::ptr;

use windows_sys::Win32::Foundation::{HANDLE, LocalFree};
use windows_sys::Win32::Security::Authorization::{
    ConvertSidToStringSidW, GetSecurityInfo, SE_KERNEL_OBJECT,
};
use windows_sys::Win32::Security::{
    EqualSid, GetTokenInformation, IsWellKnownSid, OWNER_SECURITY_INFORMATION,
    PSECURITY_DESCRIPTOR, PSID, TOKEN_INFORMATION_CLASS, TOKEN_OWNER, TOKEN_QUERY, TOKEN_USER,
    TokenOwner, TokenUser, WinBuiltinAdministratorsSid, WinLocalSystemSid,
};
use windows_sys::Win32::System::Threading::{GetCurrentProcess, OpenProcessToken};

#[cfg(feature = "ipc-tokio")]
pub(crate) use self::descriptor::PipeSecurity;

/// Security descriptors for the Tokio backend's pipe instances.
#[cfg(feature = "ipc-tokio")]
mod descriptor {
    use std::ffi::c_void;
    use std::io;
    use std::ptr;

    use tokio::net::windows::named_pipe::{NamedPipeServer, ServerOptions};
    use windows_sys::Win32::Foundation::LocalFree;
    use windows_sys::Win32::Security::Authorization::{
        ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1,
    };
    use windows_sys::Win32::Security::{PSECURITY_DESCRIPTOR, SECURITY_ATTRIBUTES};

    /// A self-relative security descriptor owned by this value (freed on drop).
    #[derive(Debug)]
    pub(crate) struct PipeSecurity {
        descriptor: PSECURITY_DESCRIPTOR,
    }

    // SAFETY: the descriptor is written once by
    // ConvertStringSecurityDescriptorToSecurityDescriptorW and only read after
    // that; the allocation belongs to this value alone, so moving it to or sharing
    // it with another thread cannot race.
    unsafe impl Send for PipeSecurity {}
    // SAFETY: as above; every use through `&self` is a read.
    unsafe impl Sync for PipeSecurity {}

    impl PipeSecurity {
        /// Parses a security descriptor in SDDL.
        pub(crate) fn from_sddl(sddl: &str) -> io::Result<PipeSecurity> {
            let wide: Vec<u16> = sddl.encode_utf16().chain(std::iter::once(0)).collect();
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
            Ok(PipeSecurity { descriptor })
        }

        /// Creates a pipe instance named `name` with this descriptor.
        pub(crate) fn create(
            &self,
            options: &ServerOptions,
            name: &str,
        ) -> io::Result<NamedPipeServer> {
            let mut attributes = SECURITY_ATTRIBUTES {
                nLength: std::mem::size_of::<SECURITY_ATTRIBUTES>() as u32,
                lpSecurityDescriptor: self.descriptor,
                bInheritHandle: 0,
            };
            // SAFETY: `attributes` is a properly sized SECURITY_ATTRIBUTES that
            // lives across the call, and its descriptor is a valid self-relative
            // descriptor owned by `self`. CreateNamedPipeW copies what it needs.
            unsafe {
                options.create_with_security_attributes_raw(
                    name,
                    (&mut attributes as *mut SECURITY_ATTRIBUTES).cast::<c_void>(),
                )
            }
        }
    }

    impl Drop for PipeSecurity {
        fn drop(&mut self) {
            // SAFETY: the descriptor was allocated with LocalAlloc by
            // ConvertStringSecurityDescriptorToSecurityDescriptorW and is freed
            // exactly once, here.
            unsafe {
                LocalFree(self.descriptor);
            }
        }
    }
}

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
