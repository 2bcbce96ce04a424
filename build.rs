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
    let mut descriptors = protox::compile(["proto/common.proto", "proto/ipc.proto"], ["proto"])?;
    descriptors.file.push(result_views(&descriptors));
    let mut config = prost_build::Config::new();
    if std::env::var_os("CARGO_FEATURE_SERDE_MESSAGES").is_some() {
        // The CLI prints results as JSON with the proto's field names;
        // DaemonEye's own crates read tasks back from JSON.
        config.type_attribute(
            ".daemoneye.ipc",
            "#[derive(serde::Serialize, serde::Deserialize)]",
        );
    }
    // As DaemonEye has it: a task type this build does not know is a value
    // code must expect. MonitoringDomain stays exhaustive, as DaemonEye's own
    // code matches it without a wildcard.
    config.enum_attribute(".daemoneye.ipc.TaskType", "#[non_exhaustive]");
    config.bytes([VIEW_PACKAGE_PATH]).compile_fds(descriptors)?;
    Ok(())
}

/// The package of the result views (`daemoneye_ipc::view`).
const VIEW_PACKAGE: &str = "daemoneye.ipc_view";
const VIEW_PACKAGE_PATH: &str = ".daemoneye.ipc_view";
/// The messages a result is made of, which get a view each.
const RESULT_MESSAGES: [&str; 6] = [
    "DetectionResult",
    "ProcessRecord",
    "HashResult",
    "NetworkRecord",
    "FilesystemRecord",
    "PerformanceRecord",
];

/// The result messages again, in a package of their own, with every `string`
/// field declared `bytes`: the same wire encoding (both are length-delimited),
/// so the views decode the same frames, but prost (told to use `Bytes` for
/// that package) then takes each such field as a slice of the frame instead
/// of allocating and copying it. Derived from the schema here so that the two
/// can never drift apart.
fn result_views(descriptors: &prost_types::FileDescriptorSet) -> prost_types::FileDescriptorProto {
    use prost_types::field_descriptor_proto::Type;
    let messages = descriptors
        .file
        .iter()
        .flat_map(|file| &file.message_type)
        .filter(|message| RESULT_MESSAGES.contains(&message.name()))
        .map(|message| {
            let mut view = message.clone();
            for field in &mut view.field {
                if field.r#type() == Type::String {
                    field.set_type(Type::Bytes);
                }
                if let Some(name) = &mut field.type_name {
                    let referenced = name.trim_start_matches(".daemoneye.ipc.");
                    assert!(
                        RESULT_MESSAGES.contains(&referenced),
                        "a result view refers to {name}, which has no view: add it to RESULT_MESSAGES"
                    );
                    *name = format!("{VIEW_PACKAGE_PATH}.{referenced}");
                }
            }
            view
        })
        .collect::<Vec<_>>();
    assert_eq!(
        messages.len(),
        RESULT_MESSAGES.len(),
        "every result message is in the schema"
    );
    prost_types::FileDescriptorProto {
        name: Some("daemoneye_ipc_view.proto".to_owned()),
        package: Some(VIEW_PACKAGE.to_owned()),
        message_type: messages,
        syntax: Some("proto3".to_owned()),
        ..Default::default()
    }
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
