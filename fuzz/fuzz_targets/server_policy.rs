#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| daemoneye_ipc::fuzzing::server_connection(data));
