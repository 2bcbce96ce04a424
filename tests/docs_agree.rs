//! The README against the binary, so that the two cannot drift apart: every
//! flag the README names exists, every flag the binary takes is in the
//! README, and each configuration default, environment variable and counter
//! is what `config` and `serve` themselves report.

mod support;

use std::collections::BTreeSet;

use support::*;

const README: &str = include_str!("../README.md");

/// The subcommands whose flags an operator reads about in the README.
const SUBCOMMANDS: &[&str] = &[
    "serve",
    "send",
    "ping",
    "config",
    #[cfg(feature = "bench")]
    "compare",
    "completions",
    "man",
];

/// The text of the README section `## {name}`, up to the next one.
fn section(name: &str) -> &'static str {
    let start = README
        .find(&format!("\n## {name}\n"))
        .unwrap_or_else(|| panic!("the README has a section {name:?}"));
    let rest = &README[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |end| end + 3);
    &rest[..end]
}

/// Every `--flag` in `text`.
fn flags_in(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut flags = BTreeSet::new();
    for (at, _) in text.match_indices("--") {
        let preceded_by_word =
            at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'-');
        let name: String = text[at + 2..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
            .collect();
        if !preceded_by_word && name.starts_with(|c: char| c.is_ascii_lowercase()) {
            flags.insert(format!("--{}", name.trim_end_matches('-')));
        }
    }
    flags
}

/// `text` without the bullets that describe a subcommand this build lacks
/// (`compare` is only in builds with the `bench` feature), so that the
/// feature matrix checks the README against the binary it built.
fn without_absent_subcommands(text: &str) -> String {
    let absent: &[&str] = if cfg!(feature = "bench") {
        &[]
    } else {
        &["* `daemoneye-ipc compare"]
    };
    let mut kept = String::new();
    let mut skipping = false;
    for line in text.lines() {
        if line.starts_with("* ") || line.starts_with('#') || line.is_empty() {
            skipping = absent.iter().any(|bullet| line.starts_with(bullet));
        }
        if !skipping {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    kept
}

/// The flags `daemoneye-ipc {subcommand} --help` lists.
fn help_flags(subcommand: &str) -> BTreeSet<String> {
    let output = daemoneye_ipc()
        .args([subcommand, "--help"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{subcommand} --help");
    flags_in(&String::from_utf8_lossy(&output.stdout))
}

#[test]
fn every_flag_the_readme_names_exists_and_every_flag_is_in_the_readme() {
    let mut taken = BTreeSet::new();
    for subcommand in SUBCOMMANDS {
        let flags = help_flags(subcommand);
        for flag in &flags {
            if flag == "--help" || flag == "--version" {
                continue;
            }
            assert!(
                README.contains(flag.as_str()),
                "`{subcommand} {flag}` is not in the README"
            );
        }
        taken.extend(flags);
    }
    // Cargo's own, where these sections say how to build.
    const CARGO: [&str; 3] = ["--all-features", "--features", "--release"];
    for name in ["Command line", "Configuration"] {
        for flag in flags_in(&without_absent_subcommands(section(name))) {
            if CARGO.contains(&flag.as_str()) {
                continue;
            }
            assert!(
                taken.contains(&flag),
                "the README's {name} section names {flag}, which no subcommand takes"
            );
        }
    }
}

/// The cells of the README's table rows in `text` whose first cell is a
/// key in backquotes.
fn table_rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            line.trim_matches('|')
                .split(" | ")
                .map(|cell| cell.trim().to_owned())
                .collect()
        })
        .collect()
}

/// The first value in backquotes in `cell`.
fn quoted(cell: &str) -> Option<&str> {
    let start = cell.find('`')? + 1;
    let end = cell[start..].find('`')? + start;
    Some(&cell[start..end])
}

#[test]
fn each_setting_the_readme_lists_has_its_default_variable_and_flag() {
    let output = daemoneye_ipc().arg("config").output().unwrap();
    assert!(output.status.success());
    let printed = String::from_utf8_lossy(&output.stdout);
    let config_flags = help_flags("config");
    let rows = table_rows(section("Configuration"));
    assert_eq!(
        rows.len(),
        daemoneye_ipc::config::ConfigField::ALL.len(),
        "a row per setting"
    );
    for row in rows {
        let key = quoted(&row[0]).expect("a key");
        let line = printed
            .lines()
            .find(|line| line.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("`config` prints {key}: {printed}"));
        let value = line[key.len() + 3..]
            .split('#')
            .next()
            .unwrap()
            .trim()
            .trim_matches('"');
        if let Some(default) = quoted(&row[1]) {
            // The README gives the full build's transport "(or the first
            // backend built in)": the feature matrix builds one backend.
            let default = match key {
                "transport" if !cfg!(feature = "ipc-interprocess") => {
                    if cfg!(feature = "ipc-tokio") {
                        "tokio"
                    } else {
                        "legacy"
                    }
                }
                _ => default,
            };
            assert_eq!(
                value,
                default.trim_matches('"'),
                "{key}: the README's default against `config`"
            );
        }
        assert_eq!(
            quoted(&row[2]),
            Some(format!("DAEMONEYE_IPC_{}", key.to_uppercase()).as_str()),
            "{key}'s variable"
        );
        let flag = quoted(&row[3]).expect("a flag");
        assert!(
            config_flags.contains(flag),
            "{key}: {flag} is a flag of `config`"
        );
    }
}

#[test]
fn the_counters_the_readme_lists_are_the_ones_serve_logs() {
    let documented: BTreeSet<String> = table_rows(section("Library"))
        .into_iter()
        .flat_map(|row| {
            row[0]
                .split(", ")
                .filter_map(|cell| quoted(cell).map(str::to_owned))
                .collect::<Vec<_>>()
        })
        .collect();
    let endpoint = Endpoint::fresh();
    let transport = daemoneye_ipc::TransportKind::compiled().next().unwrap();
    let mut server = ServerProcess::start(&endpoint.name, transport, &[]);
    let mut logged: BTreeSet<String> = server.counters().into_keys().collect();
    logged.insert("transport".to_owned());
    assert_eq!(
        documented, logged,
        "the README's Counters table against the log line"
    );
}
