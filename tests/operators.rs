//! What operators and packagers use around the collector: shell completions
//! and man pages, JSON logs, live counters, the collector's words printed
//! safely, and a binary that says which feature a missing command needs.

mod support;

use daemoneye_ipc::TransportKind;
use support::*;

/// The subcommands an operator sees (`--help`); the hidden benchmark
/// helpers are left out of completions and pages alike.
const SUBCOMMANDS: [&str; 7] = [
    "serve",
    "send",
    "ping",
    "config",
    "compare",
    "completions",
    "man",
];

/// Whether `text` has `word` as a whole word: not inside another word, nor
/// inside a generated identifier like `daemoneye__ipc__subcmd__man`.
fn names(text: &str, word: &str) -> bool {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .any(|token| token == word)
}

fn run_ok(args: &[&str]) -> String {
    let output = daemoneye_ipc().args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn completions_for_every_shell_name_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let script = run_ok(&["completions", shell]);
        for subcommand in SUBCOMMANDS {
            assert!(
                names(&script, subcommand),
                "{shell} completions lack {subcommand}"
            );
        }
        for hidden in ["bench-server", "bench-client"] {
            assert!(
                !script.contains(hidden),
                "{shell}: hidden commands are not offered"
            );
        }
        // Flags of subcommands complete too.
        assert!(
            names(&script, "log-format") || names(&script, "--log-format"),
            "{shell}: serve's flags"
        );
    }
    let output = daemoneye_ipc()
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn the_man_page_lists_every_subcommand_and_each_has_a_page() {
    let main = run_ok(&["man"]);
    assert!(main.contains(".TH daemoneye-ipc 1"), "{main}");
    for subcommand in SUBCOMMANDS {
        // roff escapes the hyphens of the page names.
        assert!(
            main.contains(&format!(r"daemoneye\-ipc\-{subcommand}(1)")),
            "the main page lists {subcommand}"
        );
        let page = run_ok(&["man", subcommand]);
        assert!(
            page.contains(&format!(".TH daemoneye-ipc-{subcommand} 1")),
            "{subcommand}'s page: {page}"
        );
    }
    assert!(run_ok(&["man", "serve"]).contains(r"\-\-log\-format"));
    assert!(
        !main.contains(r"daemoneye\-ipc\-help"),
        "no page is listed that does not exist: {main}"
    );
    for page in [main.clone(), run_ok(&["man", "send"])] {
        for section in [".SH ENVIRONMENT", ".SH \"EXIT STATUS\"", ".SH EXAMPLES"] {
            assert!(page.contains(section), "{section}: {page}");
        }
        assert!(page.contains(r"DAEMONEYE_IPC_MAX_FRAME_BYTES"), "{page}");
    }
    assert!(run_ok(&["man", "send"]).contains(r"\-\-expected\-hash: the hash differs"));
    let unknown = daemoneye_ipc().args(["man", "nosuch"]).output().unwrap();
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("the pages are: serve"));
}

each_backend!(serve_logs_one_json_object_per_line_with_the_tracing_fields);
fn serve_logs_one_json_object_per_line_with_the_tracing_fields(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let mut server = ServerProcess::start(&endpoint.name, transport, &["--log-format", "json"]);
    let counters = server.counters_json();
    assert_eq!(counters["transport"], transport.name());
    assert!(counters["accepted"].is_u64(), "{counters}");
    #[cfg(unix)]
    server.terminate();
    #[cfg(windows)]
    server.kill();
    let logs = server.logs();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("not a JSON object ({error}): {line}"))
        })
        .collect();
    let listening = lines
        .iter()
        .find(|line| {
            line["message"]
                .as_str()
                .is_some_and(|m| m.contains("listening"))
        })
        .unwrap_or_else(|| panic!("a start-up line: {logs}"));
    assert_eq!(listening["level"], "INFO");
    assert_eq!(listening["transport"], transport.name(), "{listening}");
    assert!(listening["timestamp"].is_string(), "{listening}");
    #[cfg(unix)]
    assert!(
        lines.iter().any(|line| line["when"] == "at shutdown"),
        "the counters at shutdown: {logs}"
    );
}

#[test]
fn an_unknown_log_format_is_a_usage_error_naming_the_choices() {
    let output = daemoneye_ipc()
        .args(["serve", "--log-format", "xml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("text") && message.contains("json"),
        "{message}"
    );
}

each_backend!(ping_prints_the_collectors_error_escaped);
/// A collector whose error text carries terminal controls: `ping` prints it
/// escaped, so that it cannot recolour or move anything on the operator's
/// terminal.
fn ping_prints_the_collectors_error_escaped(transport: TransportKind) {
    use daemoneye_ipc::DetectionResult;
    use daemoneye_ipc::frame::{FrameSettings, encode_message};
    use support::raw_server::RawServer;

    let endpoint = Endpoint::fresh();
    block_on(async {
        let mut hostile = RawServer::bind(&endpoint).await;
        let mut ping = daemoneye_ipc();
        ping.args([
            "ping",
            "--endpoint",
            &endpoint.name,
            "--transport",
            transport.name(),
        ]);
        let ping = tokio::task::spawn_blocking(move || ping.output());
        let answering = async {
            let mut connection = hostile.accept().await;
            let ids = connection.read_tasks(1).await;
            let mut wire = bytes::BytesMut::new();
            let result = DetectionResult {
                task_id: ids[0].clone(),
                success: false,
                error_message: Some("bad \u{1b}[2J\u{1b}[31mred\u{9b}1m".to_owned()),
                ..Default::default()
            };
            encode_message(&result, FrameSettings::DEFAULT, &mut wire).unwrap();
            connection.write(&wire).await;
            connection
        };
        let (output, _connection) = tokio::join!(ping, answering);
        let output = output.unwrap().unwrap();
        assert_eq!(output.status.code(), Some(1));
        let message = String::from_utf8(output.stderr).unwrap();
        assert!(
            !message.chars().any(|c| c.is_control() && c != '\n'),
            "{message:?}"
        );
        assert!(
            message.contains(r#""bad \u{1b}[2J\u{1b}[31mred\u{9b}1m""#),
            "{message}"
        );
    });
}

each_backend!(an_agent_with_the_other_checksum_is_told_which_each_side_uses);
/// A rollback is when the two sides' settings drift apart: an agent sending
/// CRC-32C to a collector on IEEE is told so, in words, not "connection
/// lost"; and the collector goes on serving agents that agree with it.
fn an_agent_with_the_other_checksum_is_told_which_each_side_uses(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let mut server = ServerProcess::start(&endpoint.name, transport, &[]);
    let endpoint = server.endpoint.clone();
    let send = |crc32: &str, task_id: &str| {
        daemoneye_ipc()
            .args(["send", "--endpoint", &endpoint, "--transport"])
            .args([transport.name(), "--crc32", crc32, "--task-id", task_id])
            .output()
            .unwrap()
    };
    let output = send("castagnoli", "c1");
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty(), "no result");
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("uses crc32_variant = ieee")
            && message.contains("checksummed with castagnoli")
            && message.contains("--crc32")
            && message.contains("did not run"),
        "{message}"
    );
    assert!(!message.contains("lost"), "{message}");
    server.wait_for_log("crc32_variant = ieee", 1);
    assert!(
        send("ieee", "c2").status.success(),
        "an agent that agrees is served"
    );
    assert_eq!(server.counters()["crc_errors"], 1);
}

each_backend!(send_checks_an_expected_hash_and_exits_3_when_it_differs);
/// Scripts go by exit codes: `send --expected-hash` exits 3, saying why on
/// stderr, when the hash differs; 0 when it matches. A relative
/// `--hash-path` is the agent's, made absolute before it is sent.
fn send_checks_an_expected_hash_and_exits_3_when_it_differs(transport: TransportKind) {
    let endpoint = Endpoint::fresh();
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("payload"), b"what the agent checks").unwrap();
    let allow = files.path().canonicalize().unwrap();
    let server = ServerProcess::start(
        &endpoint.name,
        transport,
        &["--hash-allow", allow.to_str().unwrap()],
    );
    let send = |extra: &[&str]| {
        daemoneye_ipc()
            .current_dir(&allow)
            .args(["send", "--endpoint", &server.endpoint, "--transport"])
            .args([transport.name(), "--task-id", "h", "--hash-path", "payload"])
            .args(extra)
            .output()
            .unwrap()
    };
    let plain = send(&[]);
    assert!(
        plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&plain.stdout).unwrap();
    // Compared canonical: Windows spells the agent's directory without the
    // \\?\ prefix that canonicalize gives.
    let sent = std::path::Path::new(result["hash_result"]["file_path"].as_str().unwrap());
    assert!(
        sent.is_absolute(),
        "the relative path, made absolute: {result}"
    );
    assert_eq!(
        sent.canonicalize().unwrap(),
        allow.join("payload"),
        "the agent's own file: {result}"
    );
    let hash = result["hash_result"]["hash_value"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(hash.len(), 64);

    assert!(send(&["--expected-hash", &hash]).status.success());
    let differs = send(&["--expected-hash", "00"]);
    assert_eq!(differs.status.code(), Some(3));
    let message = String::from_utf8_lossy(&differs.stderr);
    assert!(
        message.contains(&format!("is {hash}, not the expected 00")),
        "{message}"
    );
    let printed: serde_json::Value = serde_json::from_slice(&differs.stdout).unwrap();
    assert_eq!(
        printed["hash_result"]["success"], false,
        "the result is printed too"
    );

    let missing = daemoneye_ipc()
        .args(["send", "--endpoint", &server.endpoint, "--task-id", "m"])
        .args(["--task-type", "check-process-hash"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("needs --hash-path FILE"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}

/// A build without the `bench` feature has no `compare`: asked for it, the
/// binary says which feature brings it back.
#[cfg(not(feature = "bench"))]
#[test]
fn compare_without_the_bench_feature_names_the_feature() {
    let output = daemoneye_ipc()
        .args(["compare", "--quick"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("needs the Cargo feature `bench`"),
        "{message}"
    );
}
