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
    record_git_commit();
    // `cfg(async_backend)`: the build has a backend the async driver runs
    // (interprocess or tokio), as opposed to only the blocking legacy one.
    println!("cargo:rustc-check-cfg=cfg(async_backend)");
    if std::env::var_os("CARGO_FEATURE_IPC_INTERPROCESS").is_some()
        || std::env::var_os("CARGO_FEATURE_IPC_TOKIO").is_some()
    {
        println!("cargo:rustc-cfg=async_backend");
    }
    let descriptors = protox::compile(["proto/common.proto", "proto/ipc.proto"], ["proto"])?;
    prost_build::Config::new()
        // The CLI prints results as JSON with the proto's field names.
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_fds(descriptors)?;
    Ok(())
}

/// The commit (and whether the tree was dirty) this build comes from, for
/// `daemoneye-ipc compare`'s report. Empty outside a git checkout.
fn record_git_commit() {
    for watched in [".git/HEAD", ".git/index", "src"] {
        println!("cargo:rerun-if-changed={watched}");
    }
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_default();
    let dirty = match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(status) if !commit.is_empty() => (!status.is_empty()).to_string(),
        _ => String::new(),
    };
    println!("cargo:rustc-env=DAEMONEYE_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=DAEMONEYE_GIT_DIRTY={dirty}");
}
