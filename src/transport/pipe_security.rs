//! The one module with `unsafe`: giving a Tokio named pipe a security
//! descriptor. Tokio only accepts raw `SECURITY_ATTRIBUTES`, and building a
//! descriptor from SDDL is a Win32 call; both are FFI with no safe wrapper in
//! the crates we use. (The interprocess backend uses interprocess' safe
//! `SecurityDescriptor` instead.)

#![allow(unsafe_code)]

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
