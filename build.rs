//! Compiles `proto/*.proto` into Rust with prost-build, parsing the schema with
//! protox so that no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // The tests start the daemoneye-ipc binary as a server; under user-mode
    // emulation they need the target's runner for that, which they find by
    // the target triple (see tests/support).
    println!(
        "cargo:rustc-env=DAEMONEYE_BUILD_TARGET={}",
        std::env::var("TARGET")?
    );
    let descriptors = protox::compile(["proto/common.proto", "proto/ipc.proto"], ["proto"])?;
    prost_build::Config::new()
        // The CLI prints results as JSON with the proto's field names.
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_fds(descriptors)?;
    Ok(())
}
