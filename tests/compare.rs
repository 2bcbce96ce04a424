//! `daemoneye-ipc compare`, run as an operator would: every backend, real
//! server processes, and its JSON, Markdown and SVG outputs.

mod support;

use std::process::Output;

use support::*;

fn compare(args: &[&str]) -> Output {
    let mut command = daemoneye_ipc();
    command.arg("compare").args(args);
    // Under emulation the server children need the emulator too.
    let emulator = emulator();
    if !emulator.is_empty() {
        command.env("DAEMONEYE_COMPARE_RUNNER", emulator);
    }
    command.output().unwrap()
}

#[test]
fn a_quick_comparison_measures_every_backend_and_writes_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let markdown = dir.path().join("report.md");
    let svg = dir.path().join("report.svg");
    let output = compare(&[
        "--quick",
        "--sizes",
        "64,2K",
        "--pin",
        "none",
        "--json",
        json.to_str().unwrap(),
        "--markdown",
        markdown.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("Round trip p50"), "{stdout}");
    assert!(stdout.contains("Tasks/s, 8 in flight"), "{stdout}");
    for line in stdout.lines() {
        assert!(line.chars().count() <= 100, "over 100 columns: {line}");
    }
    // The verdict is the last paragraph, wrapped at 100 columns.
    let verdict = stdout
        .split("\nVerdict: ")
        .nth(1)
        .unwrap_or_else(|| panic!("no verdict: {stdout}"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        verdict.starts_with("interprocess vs tokio: ")
            && verdict.contains("the decision record's bar is")
            && verdict.contains("goals: "),
        "{verdict}"
    );

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["schema_version"], 1);
    assert_eq!(report["rounds"], 3);
    assert_eq!(report["sizes"], serde_json::json!([64, 2048]));
    assert_eq!(report["placement"]["pin"], "none");
    let names: Vec<&str> = report["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    for transport in transports() {
        assert!(names.contains(&transport.name()), "{names:?}");
    }
    assert!(names.contains(&"raw-tokio"), "{names:?}");
    if cfg!(unix) {
        assert!(names.contains(&"raw-std"), "{names:?}");
    }
    for backend in report["backends"].as_array().unwrap() {
        let rounds = backend["rounds"].as_array().unwrap();
        assert_eq!(rounds.len(), 3, "{}", backend["name"]);
        for round in rounds {
            assert!(round["rss_idle_bytes"].as_u64().unwrap() > 0);
            for size in round["sizes"].as_array().unwrap() {
                let p50 = size["latency_p50_ns"].as_u64().unwrap();
                assert!(p50 > 0);
                // A percentile is reported only with enough samples behind it.
                let samples = size["latency_samples"].as_u64().unwrap();
                assert_eq!(size["latency_p99_ns"].is_null(), samples < 1000, "{size}");
                if let Some(p99) = size["latency_p99_ns"].as_u64() {
                    assert!(p99 >= p50);
                }
                let levels: Vec<u64> = size["throughput"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t["in_flight"].as_u64().unwrap())
                    .collect();
                assert_eq!(levels, [1, 8, 32]);
                for level in size["throughput"].as_array().unwrap() {
                    assert!(level["tasks"].as_u64().unwrap() > 0);
                }
            }
        }
        let median = &backend["summary"]["sizes"][0]["latency_p50_ns"];
        let figure = |name: &str| {
            median[name]
                .as_f64()
                .unwrap_or_else(|| panic!("summary latency {name} in {median}"))
        };
        assert!(figure("min") <= figure("median"));
        assert!(figure("median") <= figure("max"));
    }
    if transports().len() > 1 {
        let comparison = &report["comparisons"][0];
        assert_eq!(comparison["subject"], "interprocess");
        assert_eq!(comparison["baseline"], "tokio");
        // Every verdict follows from its own rounds: pass when every round
        // meets the bar, fail when none does, within noise otherwise.
        let mut ratios = vec![&comparison["memory"]];
        for size in comparison["sizes"].as_array().unwrap() {
            ratios.push(&size["latency_p50"]);
            for level in size["throughput"].as_array().unwrap() {
                ratios.push(&level[1]);
            }
        }
        for ratio in ratios {
            assert_verdict_follows_from_the_rounds(ratio);
        }
    }

    let markdown = std::fs::read_to_string(&markdown).unwrap();
    assert!(
        markdown.starts_with("## daemoneye-ipc compare"),
        "{markdown}"
    );
    assert!(markdown.contains("| size |"), "{markdown}");
    assert!(
        markdown.contains("**Verdict: interprocess vs tokio: ")
            && markdown.contains("Verdict: interprocess against tokio"),
        "the verdict line and the wide tables: {markdown}"
    );
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("</svg>"),
        "an SVG document"
    );
    assert!(
        svg.contains("round trip") && svg.contains("throughput"),
        "both charts are titled"
    );
}

/// A `Ratio` of the report (docs/compare-json.md): its outcome is the one
/// its per-round ratios and its bar imply.
fn assert_verdict_follows_from_the_rounds(ratio: &serde_json::Value) {
    let number = |name: &str| {
        ratio[name]
            .as_f64()
            .unwrap_or_else(|| panic!("{name} in {ratio}"))
    };
    let (low, median, high, bar) = (
        number("ratio_min"),
        number("ratio"),
        number("ratio_max"),
        number("bar"),
    );
    assert!(low <= median && median <= high, "{ratio}");
    let higher_is_better = ratio["higher_is_better"].as_bool().unwrap();
    let meets = |value: f64| {
        if higher_is_better {
            value >= bar
        } else {
            value <= bar
        }
    };
    let (best, worst) = if higher_is_better {
        (high, low)
    } else {
        (low, high)
    };
    let expected = if meets(worst) {
        "pass"
    } else if !meets(best) {
        "fail"
    } else {
        "within_noise"
    };
    assert_eq!(ratio["outcome"], expected, "{ratio}");
}

#[cfg(target_os = "linux")]
#[test]
fn pinning_is_reported_in_the_placement() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let output = compare(&[
        "--quick",
        "--sizes",
        "64",
        "--backends",
        "raw-tokio",
        "--wide",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        report["placement"]["pin"], "same",
        "same CPU is the Linux default"
    );
    assert!(
        report["placement"]["client_cpu"].is_u64(),
        "a CPU, not null: {}",
        report["placement"]
    );
    assert_eq!(
        report["placement"]["client_cpu"],
        report["placement"]["server_cpu"]
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let words = stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        words.contains("pinned: client and server on CPU"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Round-trip latency") && stdout.contains("Pipelined throughput"),
        "--wide prints every table: {stdout}"
    );
    assert!(
        words.contains("Verdict: no interprocess-against-tokio comparison"),
        "{stdout}"
    );
}

#[test]
fn bad_arguments_exit_2_with_the_reason() {
    for (args, needle) in [
        (&["--rounds", "2"][..], "at least 3 rounds"),
        (&["--sizes", "0"][..], "sizes run from 1 byte"),
        (&["--sizes", "1G"][..], "sizes run from 1 byte to 64 MiB"),
        (
            &["--sizes", "1Q"][..],
            "is not a size: expected a whole number of bytes",
        ),
        (&["--backends", "shared-memory"][..], "this build has"),
    ] {
        let output = compare(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
