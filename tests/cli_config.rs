//! `daemoneye-ipc config`, run as a real process: the effective settings with
//! their origins, and exit code 2 with a one-line reason for bad settings.

mod support;

use std::io::Write;
use std::process::Output;

use support::daemoneye_ipc;

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

#[test]
fn config_prints_each_value_with_its_origin() {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    writeln!(file, "[ipc]\nread_timeout_ms = 1234\nmax_connections = 3").unwrap();

    let output = daemoneye_ipc()
        .args(["config", "--config"])
        .arg(file.path())
        .args(["--max-connections", "9", "--crc32", "castagnoli"])
        .env("DAEMONEYE_IPC_WRITE_TIMEOUT_MS", "777")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let line = |key: &str| {
        text.lines()
            .find(|line| line.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} line in:\n{text}"))
            .to_owned()
    };
    assert!(
        line("max_connections").starts_with("max_connections = 9 "),
        "{text}"
    );
    assert!(
        line("max_connections").ends_with("# command-line flag"),
        "{text}"
    );
    assert!(
        line("crc32_variant").starts_with("crc32_variant = \"castagnoli\""),
        "{text}"
    );
    assert!(
        line("write_timeout_ms").ends_with("# env DAEMONEYE_IPC_WRITE_TIMEOUT_MS"),
        "{text}"
    );
    assert!(
        line("read_timeout_ms").starts_with("read_timeout_ms = 1234 "),
        "{text}"
    );
    assert!(
        line("read_timeout_ms").ends_with(&format!("# file {}", file.path().display())),
        "{text}"
    );
    assert!(line("accept_timeout_ms").ends_with("# default"), "{text}");
    assert!(text.starts_with("[ipc]\n"), "{text}");
}

#[test]
fn invalid_settings_exit_2_with_one_line_naming_the_problem() {
    let output = daemoneye_ipc()
        .args(["config", "--max-connections", "0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(
        message.contains("invalid ipc.max_connections = 0 (from command-line flag)"),
        "{message}"
    );

    let output = daemoneye_ipc()
        .arg("config")
        .env("DAEMONEYE_IPC_TRANSPROT", "tokio")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("unknown environment variable DAEMONEYE_IPC_TRANSPROT"),
        "{}",
        stderr(&output)
    );

    let output = daemoneye_ipc()
        .args(["config", "--transport", "shared-memory"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("unknown transport \"shared-memory\""),
        "{}",
        stderr(&output)
    );
}

#[test]
fn byte_counts_take_units_on_the_command_line_as_in_the_file() {
    let output = daemoneye_ipc()
        .args(["config", "--max-frame-bytes", "64K"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("max_frame_bytes = 65536"),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let output = daemoneye_ipc()
        .args(["config", "--max-frame-bytes", "1K2"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains("--max-frame-bytes") && message.contains("1K = 1024"),
        "{message}"
    );
}

/// A backend this build lacks is a usage error (exit 2) naming what the
/// build has and the feature that adds it, for every command that takes a
/// transport. A build with all three has none to refuse: ci/test.sh's
/// feature matrix builds each backend alone, and runs this there.
#[test]
fn a_transport_not_built_in_exits_2_naming_the_feature() {
    use daemoneye_ipc::TransportKind;
    let missing: Vec<TransportKind> = TransportKind::ALL
        .into_iter()
        .filter(|kind| !kind.is_compiled())
        .collect();
    assert_eq!(
        missing.len() + TransportKind::compiled().count(),
        TransportKind::ALL.len()
    );
    for kind in missing {
        // Each command otherwise complete, so that only the transport is wrong.
        let commands: [&[&str]; 4] = [
            &["serve"],
            &["send", "--task-id", "t"],
            &["ping"],
            &["config"],
        ];
        for words in commands {
            let command = words[0];
            let output = daemoneye_ipc()
                .args(words)
                .args(["--transport", kind.name()])
                .output()
                .unwrap();
            let message = stderr(&output);
            assert_eq!(output.status.code(), Some(2), "{command}: {message}");
            assert!(
                message.contains(&format!(
                    "transport \"{kind}\" (from command-line flag) is not compiled into this build"
                )) && message.contains(&format!("ipc-{kind}")),
                "{command}: {message}"
            );
            assert_eq!(message.lines().count(), 1, "{command}: one line: {message}");
        }
    }
}
