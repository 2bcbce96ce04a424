#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| daemoneye_ipc::fuzzing::client_connection(data));
