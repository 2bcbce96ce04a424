//! What only Windows has: pipe names with or without `\\.\pipe\`, a second
//! server on a live name, and the pipe's security descriptor, read back with
//! the Win32 API. (Refusal of remote clients is checked where the pipe
//! options are built: unit tests in src/transport.)
#![cfg(windows)]

mod support;

use daemoneye_ipc::IpcClient;
use support::*;

/// `daemoneye-test\<unique>` and its full form `\\.\pipe\daemoneye-test\<unique>`.
fn both_forms(endpoint: &Endpoint) -> (String, String) {
    let full = endpoint.name.clone();
    let bare = full
        .strip_prefix(r"\\.\pipe\")
        .expect("support names pipes in full")
        .to_owned();
    (bare, full)
}

#[test]
fn a_pipe_name_with_or_without_the_prefix_reaches_the_same_pipe() {
    for server_transport in transports() {
        let endpoint = Endpoint::fresh();
        let (bare, full) = both_forms(&endpoint);
        for (served_as, reached_as) in [(&bare, &full), (&full, &bare)] {
            let server = ServerProcess::start(served_as, server_transport, &[]);
            for client_transport in transports() {
                let mut config = server.client_config(client_transport);
                config.endpoint_path = reached_as.to_string();
                let client = IpcClient::new(config).unwrap();
                let result = block_on(client.send(quick_task("named"))).unwrap();
                assert!(
                    result.success,
                    "{server_transport} served as {served_as}, {client_transport} reached {reached_as}"
                );
                assert_eq!(client.endpoint().to_string(), full);
            }
        }
    }
}

#[test]
fn a_second_server_on_a_live_pipe_is_refused() {
    for transport in transports() {
        let endpoint = Endpoint::fresh();
        let first = ServerProcess::start(&endpoint.name, transport, &[]);
        // Named without the prefix: still the same, live pipe.
        let (bare, _) = both_forms(&endpoint);
        first.assert_second_servers_refused(&bare);
    }
}

#[test]
fn the_pipe_admits_only_its_owner_system_and_administrators() {
    for transport in transports() {
        let endpoint = Endpoint::fresh();
        let _server = ServerProcess::start(&endpoint.name, transport, &[]);
        let dacl = security::pipe_dacl(&endpoint.name);
        // "D:P(A;;FA;;;OW)(A;;FA;;;SY)(A;;FA;;;BA)": protected, three grants.
        let (flags, aces) = security::parse_dacl(&dacl);
        assert!(
            flags.contains('P'),
            "{transport}: the DACL is protected from inheritance: {dacl}"
        );
        let mut trustees: Vec<&str> = aces.iter().map(|ace| ace.trustee).collect();
        trustees.sort_unstable();
        assert_eq!(trustees, ["BA", "OW", "SY"], "{transport}: {dacl}");
        for ace in &aces {
            assert_eq!(ace.kind, "A", "{transport}: only grants: {dacl}");
        }
    }
}

/// Reading a pipe's DACL back through the Win32 API.
mod security {
    use std::os::windows::fs::OpenOptionsExt;
    use std::os::windows::io::AsRawHandle;
    use std::ptr;

    use windows_sys::Win32::Foundation::{GENERIC_READ, LocalFree};
    use windows_sys::Win32::Security::Authorization::{
        ConvertSecurityDescriptorToStringSecurityDescriptorW, GetSecurityInfo, SDDL_REVISION_1,
        SE_KERNEL_OBJECT,
    };
    use windows_sys::Win32::Security::{DACL_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR};

    /// READ_CONTROL (winnt.h): the right to read an object's security descriptor.
    const READ_CONTROL: u32 = 0x0002_0000;

    /// The pipe's DACL in SDDL, read through a client handle.
    pub fn pipe_dacl(pipe: &str) -> String {
        let handle = std::fs::OpenOptions::new()
            .access_mode(GENERIC_READ | READ_CONTROL)
            .open(pipe)
            .unwrap_or_else(|error| panic!("opening {pipe}: {error}"));
        let mut descriptor: PSECURITY_DESCRIPTOR = ptr::null_mut();
        // SAFETY: the handle is open for the duration of the call; the
        // out-pointers are valid; owner, group and ACL pointers are not
        // requested (null), only the self-contained descriptor.
        let status = unsafe {
            GetSecurityInfo(
                handle.as_raw_handle(),
                SE_KERNEL_OBJECT,
                DACL_SECURITY_INFORMATION,
                ptr::null_mut(),
                ptr::null_mut(),
                ptr::null_mut(),
                ptr::null_mut(),
                &mut descriptor,
            )
        };
        assert_eq!(status, 0, "GetSecurityInfo failed with {status}");
        let mut text: *mut u16 = ptr::null_mut();
        let mut length = 0u32;
        // SAFETY: `descriptor` came from GetSecurityInfo above; the out
        // pointers are valid.
        let converted = unsafe {
            ConvertSecurityDescriptorToStringSecurityDescriptorW(
                descriptor,
                SDDL_REVISION_1,
                DACL_SECURITY_INFORMATION,
                &mut text,
                &mut length,
            )
        };
        assert_ne!(
            converted, 0,
            "ConvertSecurityDescriptorToStringSecurityDescriptorW failed"
        );
        // SAFETY: `text` points to `length` UTF-16 units (including the NUL)
        // allocated by the call above.
        let sddl =
            String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(text, length as usize) });
        // SAFETY: both were allocated with LocalAlloc by the calls above and
        // are freed once.
        unsafe {
            LocalFree(text.cast());
            LocalFree(descriptor);
        }
        sddl.trim_end_matches('\0').to_owned()
    }

    pub struct Ace<'a> {
        pub kind: &'a str,
        pub trustee: &'a str,
    }

    /// "D:P(A;;FA;;;OW)(...)" into its flags ("P") and entries.
    pub fn parse_dacl(sddl: &str) -> (&str, Vec<Ace<'_>>) {
        let dacl = sddl
            .strip_prefix("D:")
            .unwrap_or_else(|| panic!("no DACL in {sddl:?}"));
        let (flags, entries) = dacl.split_at(dacl.find('(').unwrap_or(dacl.len()));
        let aces = entries
            .split(['(', ')'])
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                let fields: Vec<&str> = entry.split(';').collect();
                assert_eq!(fields.len(), 6, "ACE {entry:?} in {sddl:?}");
                Ace {
                    kind: fields[0],
                    trustee: fields[5],
                }
            })
            .collect();
        (flags, aces)
    }
}

/// A pipe name squatted by another account is refused before any task goes
/// out. The squatter is this test, creating the pipe with a descriptor that
/// names LocalService (S-1-5-19) as its owner.
#[test]
#[cfg_attr(
    not(wine),
    ignore = "naming another account as a pipe's owner needs SeRestorePrivilege on Windows; \
              Wine (cfg wine) does not check"
)]
fn a_client_refuses_a_pipe_owned_by_another_account() {
    block_on(async {
        for transport in transports() {
            // A fresh name each time: a refused client leaves the squatter's
            // one instance busy.
            let endpoint = Endpoint::fresh();
            let _squatter =
                support::described_pipe::create(&endpoint.name, "O:LSD:(A;;GA;;;WD)", true);
            let config = daemoneye_ipc::IpcConfig {
                transport,
                endpoint_path: endpoint.name.clone(),
                accept_timeout_ms: 2_000,
                ..Default::default()
            };
            match IpcClient::connect(config).await {
                Err(error @ daemoneye_ipc::IpcError::UntrustedServer { .. }) => {
                    let message = error.to_string();
                    assert!(message.contains("S-1-5-19"), "{transport}: {message}");
                }
                other => panic!("{transport}: expected UntrustedServer, got {other:?}"),
            }
        }
    });
}
