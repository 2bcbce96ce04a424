//! Windows: a pipe instance created with a given security descriptor (SDDL),
//! for tests that play the server by hand. A pipe created without one gets
//! the system's default descriptor, which under Wine names no owner, and the
//! client refuses a pipe whose owner it cannot read.

use std::ffi::c_void;
use std::ptr;

use tokio::net::windows::named_pipe::{NamedPipeServer, ServerOptions};
use windows_sys::Win32::Foundation::LocalFree;
use windows_sys::Win32::Security::Authorization::{
    ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1,
};
use windows_sys::Win32::Security::{PSECURITY_DESCRIPTOR, SECURITY_ATTRIBUTES};

/// Creates an instance of the pipe `name` whose security descriptor is
/// `sddl`; with `first`, fails if the name is already taken.
pub fn create(name: &str, sddl: &str, first: bool) -> NamedPipeServer {
    let wide: Vec<u16> = sddl.encode_utf16().chain(std::iter::once(0)).collect();
    let mut descriptor: PSECURITY_DESCRIPTOR = ptr::null_mut();
    // SAFETY: `wide` is NUL-terminated and outlives the call; the
    // out-pointer is valid.
    let parsed = unsafe {
        ConvertStringSecurityDescriptorToSecurityDescriptorW(
            wide.as_ptr(),
            SDDL_REVISION_1,
            &mut descriptor,
            ptr::null_mut(),
        )
    };
    assert_ne!(
        parsed,
        0,
        "SDDL {sddl:?}: {}",
        std::io::Error::last_os_error()
    );
    let mut attributes = SECURITY_ATTRIBUTES {
        nLength: std::mem::size_of::<SECURITY_ATTRIBUTES>() as u32,
        lpSecurityDescriptor: descriptor,
        bInheritHandle: 0,
    };
    // SAFETY: `attributes` and its descriptor are valid for the call.
    let pipe = unsafe {
        ServerOptions::new()
            .first_pipe_instance(first)
            .create_with_security_attributes_raw(
                name,
                (&mut attributes as *mut SECURITY_ATTRIBUTES).cast::<c_void>(),
            )
    };
    // SAFETY: allocated by the conversion above, freed once.
    unsafe { LocalFree(descriptor) };
    pipe.unwrap_or_else(|error| panic!("creating {name} described by {sddl:?}: {error}"))
}
