//! Config layering (defaults < file < environment < flags) and every
//! validation error's message.

use std::io::Write;
use std::path::PathBuf;

use daemoneye_ipc::config::{
    ConfigField, ConfigLoader, ConfigOrigin, ConfigOverrides, LoadedConfig,
};
use daemoneye_ipc::{Crc32Variant, IpcConfig, IpcError, TransportKind};

fn config_file(contents: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(contents.as_bytes()).unwrap();
    file
}

fn load(
    file: Option<&tempfile::NamedTempFile>,
    env: &[(&str, &str)],
    flags: ConfigOverrides,
) -> Result<LoadedConfig, IpcError> {
    let mut loader = ConfigLoader::new().env(env.iter().copied()).flags(flags);
    if let Some(file) = file {
        loader = loader.file(file.path());
    }
    loader.load()
}

fn load_err(
    file: Option<&tempfile::NamedTempFile>,
    env: &[(&str, &str)],
    flags: ConfigOverrides,
) -> String {
    match load(file, env, flags) {
        Ok(loaded) => panic!("expected an error, loaded {:?}", loaded.config),
        Err(err) => err.to_string(),
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "{message:?} should mention {part:?}"
        );
    }
}

#[test]
fn defaults_are_the_decision_records() {
    let loaded = load(None, &[], ConfigOverrides::default()).unwrap();
    let config = &loaded.config;
    assert_eq!(config.transport, TransportKind::default_for_build());
    assert_eq!(config.max_frame_bytes, 1024 * 1024);
    assert_eq!(config.accept_timeout_ms, 5_000);
    assert_eq!(config.read_timeout_ms, 30_000);
    assert_eq!(config.write_timeout_ms, 10_000);
    assert_eq!(config.max_connections, 16);
    assert_eq!(config.crc32_variant, Crc32Variant::Ieee);
    for field in ConfigField::ALL {
        assert_eq!(loaded.origin(field), &ConfigOrigin::Default, "{field:?}");
    }
    assert_eq!(IpcConfig::default().max_frame_bytes, config.max_frame_bytes);
}

#[cfg(feature = "ipc-interprocess")]
#[test]
fn the_default_transport_is_interprocess_when_built_in() {
    assert_eq!(IpcConfig::default().transport, TransportKind::Interprocess);
}

#[cfg(unix)]
#[test]
fn the_default_endpoint_follows_the_user_and_runtime_dir() {
    let loaded = load(
        None,
        &[("XDG_RUNTIME_DIR", "/run/user/4242")],
        ConfigOverrides::default(),
    )
    .unwrap();
    if rustix_euid_is_root() {
        assert_eq!(loaded.config.endpoint_path, "/run/daemoneye/procmond.sock");
    } else {
        assert_eq!(
            loaded.config.endpoint_path,
            "/run/user/4242/daemoneye/procmond.sock"
        );
    }
}

#[cfg(unix)]
fn rustix_euid_is_root() -> bool {
    // The crate computes the default from the effective uid; so does this test,
    // through the owner of a file it just created.
    use std::os::unix::fs::MetadataExt;
    let probe = tempfile::NamedTempFile::new().unwrap();
    probe.as_file().metadata().unwrap().uid() == 0
}

#[cfg(windows)]
#[test]
fn the_default_endpoint_is_the_procmond_pipe() {
    assert_eq!(
        IpcConfig::default().endpoint_path,
        r"\\.\pipe\daemoneye\procmond"
    );
}

#[test]
fn flags_override_env_which_overrides_the_file_which_overrides_defaults() {
    let file = config_file(
        "[ipc]\nmax_connections = 3\nread_timeout_ms = 1111\nwrite_timeout_ms = 2222\ncrc32_variant = \"castagnoli\"\n",
    );
    let env = [
        ("DAEMONEYE_IPC_MAX_CONNECTIONS", "4"),
        ("DAEMONEYE_IPC_READ_TIMEOUT_MS", "3333"),
        ("UNRELATED_VARIABLE", "ignored"),
    ];
    let flags = ConfigOverrides {
        max_connections: Some(5),
        endpoint_path: Some("/tmp/flag.sock".into()),
        ..Default::default()
    };
    let loaded = load(Some(&file), &env, flags).unwrap();
    let config = &loaded.config;

    assert_eq!(config.max_connections, 5, "flag beats env and file");
    assert_eq!(
        loaded.origin(ConfigField::MaxConnections),
        &ConfigOrigin::Flag
    );
    assert_eq!(config.endpoint_path, "/tmp/flag.sock");
    assert_eq!(
        loaded.origin(ConfigField::EndpointPath),
        &ConfigOrigin::Flag
    );

    assert_eq!(config.read_timeout_ms, 3333, "env beats file");
    assert_eq!(
        loaded.origin(ConfigField::ReadTimeoutMs),
        &ConfigOrigin::Env("DAEMONEYE_IPC_READ_TIMEOUT_MS".into())
    );

    assert_eq!(config.write_timeout_ms, 2222, "file beats default");
    assert_eq!(config.crc32_variant, Crc32Variant::Castagnoli);
    let from_file = ConfigOrigin::File(PathBuf::from(file.path()));
    assert_eq!(loaded.origin(ConfigField::WriteTimeoutMs), &from_file);
    assert_eq!(loaded.origin(ConfigField::Crc32Variant), &from_file);

    assert_eq!(config.accept_timeout_ms, 5_000);
    assert_eq!(
        loaded.origin(ConfigField::AcceptTimeoutMs),
        &ConfigOrigin::Default
    );

    let annotated = loaded.to_annotated_toml();
    assert_mentions(
        &annotated,
        &[
            "[ipc]",
            "max_connections = 5",
            "# command-line flag",
            "# env DAEMONEYE_IPC_READ_TIMEOUT_MS",
        ],
    );
    let has_line = |start: &str, end: &str| {
        annotated
            .lines()
            .any(|l| l.starts_with(start) && l.ends_with(end))
    };
    assert!(
        has_line(
            "write_timeout_ms = 2222 ",
            &format!("# file {}", file.path().display())
        ),
        "{annotated}"
    );
    assert!(
        has_line("accept_timeout_ms = 5000 ", "# default"),
        "{annotated}"
    );
}

#[test]
fn the_annotated_output_is_itself_a_valid_config_file() {
    let loaded = load(
        None,
        &[("DAEMONEYE_IPC_MAX_CONNECTIONS", "7")],
        ConfigOverrides::default(),
    )
    .unwrap();
    let file = config_file(&loaded.to_annotated_toml());
    let reloaded = load(Some(&file), &[], ConfigOverrides::default()).unwrap();
    assert_eq!(reloaded.config, loaded.config);
}

#[test]
fn every_setting_can_come_from_the_environment() {
    let transport = TransportKind::default_for_build().name();
    let env = [
        ("DAEMONEYE_IPC_TRANSPORT", transport),
        ("DAEMONEYE_IPC_ENDPOINT_PATH", "/tmp/env.sock"),
        ("DAEMONEYE_IPC_MAX_FRAME_BYTES", "65536"),
        ("DAEMONEYE_IPC_ACCEPT_TIMEOUT_MS", "11"),
        ("DAEMONEYE_IPC_READ_TIMEOUT_MS", "22"),
        ("DAEMONEYE_IPC_WRITE_TIMEOUT_MS", "33"),
        ("DAEMONEYE_IPC_TASK_TIMEOUT_MS", "55"),
        ("DAEMONEYE_IPC_MAX_CONNECTIONS", "44"),
        ("DAEMONEYE_IPC_MAX_CONNECTIONS_PER_PEER", "4"),
        ("DAEMONEYE_IPC_CRC32_VARIANT", "Castagnoli"),
        // A group every Unix has (gid 0); Windows has no socket groups.
        #[cfg(unix)]
        ("DAEMONEYE_IPC_SOCKET_GROUP", "0"),
    ];
    let loaded = load(None, &env, ConfigOverrides::default()).unwrap();
    let expected = IpcConfig {
        transport: TransportKind::default_for_build(),
        endpoint_path: "/tmp/env.sock".into(),
        max_frame_bytes: 65536,
        accept_timeout_ms: 11,
        read_timeout_ms: 22,
        write_timeout_ms: 33,
        task_timeout_ms: 55,
        max_connections: 44,
        max_connections_per_peer: 4,
        crc32_variant: Crc32Variant::Castagnoli,
        socket_group: cfg!(unix).then(|| "0".to_owned()),
    };
    assert_eq!(loaded.config, expected);
    for field in ConfigField::ALL {
        if cfg!(windows) && field == ConfigField::SocketGroup {
            continue;
        }
        assert_eq!(loaded.origin(field), &ConfigOrigin::Env(field.env_var()));
    }
}

#[test]
fn other_components_tables_may_share_the_file_and_ipc_may_be_absent() {
    let file = config_file("[collector]\nscan_interval_ms = 500\n[collector.nested]\nx = 1\n");
    let loaded = load(Some(&file), &[], ConfigOverrides::default()).unwrap();
    assert_eq!(loaded.config.max_connections, 16);
}

// ---- every error message ------------------------------------------------

#[test]
fn an_unknown_key_in_the_file_is_named() {
    let file = config_file("[ipc]\nmax_conections = 4\n");
    let message = load_err(Some(&file), &[], ConfigOverrides::default());
    assert_mentions(
        &message,
        &[
            "invalid config file",
            &file.path().display().to_string(),
            "max_conections",
            "max_connections",
        ],
    );
}

#[test]
fn a_bare_top_level_key_is_refused() {
    let file = config_file("transport = \"tokio\"\n");
    let message = load_err(Some(&file), &[], ConfigOverrides::default());
    assert_mentions(&message, &["top-level key `transport`", "under [ipc]"]);
}

#[test]
fn a_value_of_the_wrong_type_is_named() {
    let file = config_file("[ipc]\nmax_connections = \"lots\"\n");
    let message = load_err(Some(&file), &[], ConfigOverrides::default());
    assert_mentions(&message, &["max_connections", "lots"]);
}

#[test]
fn broken_toml_is_reported_with_the_file() {
    let file = config_file("[ipc\n");
    let message = load_err(Some(&file), &[], ConfigOverrides::default());
    assert_mentions(
        &message,
        &["invalid config file", &file.path().display().to_string()],
    );
}

#[test]
fn a_missing_file_is_named() {
    let message = ConfigLoader::new()
        .file("/nonexistent/daemoneye.toml")
        .load()
        .unwrap_err()
        .to_string();
    assert_mentions(
        &message,
        &[
            "cannot read config file /nonexistent/daemoneye.toml",
            "--config",
        ],
    );
}

#[test]
fn an_unknown_transport_lists_the_known_ones() {
    let file = config_file("[ipc]\ntransport = \"carrier-pigeon\"\n");
    let message = load_err(Some(&file), &[], ConfigOverrides::default());
    assert_mentions(
        &message,
        &[
            "unknown transport \"carrier-pigeon\"",
            "interprocess, tokio, legacy",
        ],
    );

    let message = load_err(
        None,
        &[("DAEMONEYE_IPC_TRANSPORT", "shared-memory")],
        ConfigOverrides::default(),
    );
    assert_mentions(
        &message,
        &[
            "DAEMONEYE_IPC_TRANSPORT=\"shared-memory\"",
            "interprocess or tokio or legacy",
        ],
    );
}

/// Every transport this build lacks is refused, naming where the request
/// came from, what the build has, and the feature that would add it.
#[test]
fn a_transport_not_built_in_is_refused_with_the_available_list() {
    let available: Vec<&str> = TransportKind::compiled().map(TransportKind::name).collect();
    let missing = TransportKind::ALL
        .into_iter()
        .filter(|kind| !kind.is_compiled());
    for kind in missing {
        let from_env = load_err(
            None,
            &[("DAEMONEYE_IPC_TRANSPORT", kind.name())],
            ConfigOverrides::default(),
        );
        let from_flag = load_err(
            None,
            &[],
            ConfigOverrides {
                transport: Some(kind),
                ..Default::default()
            },
        );
        for (message, origin) in [
            (from_env, "env DAEMONEYE_IPC_TRANSPORT"),
            (from_flag, "command-line flag"),
        ] {
            assert_mentions(
                &message,
                &[
                    &format!(
                        "transport \"{kind}\" (from {origin}) is not compiled into this build"
                    ),
                    &format!("available: {}", available.join(", ")),
                    &format!("ipc-{kind}"),
                ],
            );
        }
    }
}

#[test]
fn an_unknown_crc_variant_names_the_valid_ones() {
    let file = config_file("[ipc]\ncrc32_variant = \"adler\"\n");
    let message = load_err(Some(&file), &[], ConfigOverrides::default());
    assert_mentions(
        &message,
        &["unknown crc32 variant \"adler\"", "ieee", "castagnoli"],
    );

    let message = load_err(
        None,
        &[("DAEMONEYE_IPC_CRC32_VARIANT", "crc64")],
        ConfigOverrides::default(),
    );
    assert_mentions(
        &message,
        &[
            "DAEMONEYE_IPC_CRC32_VARIANT=\"crc64\"",
            "ieee or castagnoli",
        ],
    );
}

#[test]
fn an_unknown_environment_variable_is_named() {
    let message = load_err(
        None,
        &[("DAEMONEYE_IPC_MAX_CONECTIONS", "4")],
        ConfigOverrides::default(),
    );
    assert_mentions(
        &message,
        &[
            "unknown environment variable DAEMONEYE_IPC_MAX_CONECTIONS",
            "DAEMONEYE_IPC_MAX_CONNECTIONS",
        ],
    );
}

#[test]
fn a_non_numeric_environment_value_is_named() {
    let message = load_err(
        None,
        &[("DAEMONEYE_IPC_READ_TIMEOUT_MS", "30s")],
        ConfigOverrides::default(),
    );
    assert_mentions(
        &message,
        &[
            "DAEMONEYE_IPC_READ_TIMEOUT_MS=\"30s\"",
            "whole number of milliseconds",
        ],
    );
}

#[test]
fn a_word_where_a_number_goes_is_named_in_words_not_rust_types() {
    let file = config_file("[ipc]\nmax_connections = \"ten\"\n");
    let message = load_err(Some(&file), &[], ConfigOverrides::default());
    assert_mentions(
        &message,
        &[
            "line 2",
            "`max_connections = \"ten\"`",
            "expected a whole number of connections, not \"ten\"",
        ],
    );
    assert!(!message.contains("usize"), "{message}");
    for (text, expected) in [
        (
            "read_timeout_ms = -5",
            "expected a whole number of milliseconds, not -5",
        ),
        ("max_frame_bytes = 1.5", "expected a whole number of bytes"),
        (
            "max_connections = true",
            "expected a whole number of connections, not true",
        ),
    ] {
        let file = config_file(&format!("[ipc]\n{text}\n"));
        let message = load_err(Some(&file), &[], ConfigOverrides::default());
        assert_mentions(&message, &[expected]);
    }
}

#[test]
fn sizes_take_the_same_units_in_the_file_and_the_environment() {
    let file = config_file("[ipc]\nmax_frame_bytes = \"64K\"\n");
    let loaded = load(Some(&file), &[], ConfigOverrides::default()).unwrap();
    assert_eq!(loaded.config.max_frame_bytes, 64 * 1024);
    let file = config_file("[ipc]\nmax_frame_bytes = 2048\n");
    let loaded = load(Some(&file), &[], ConfigOverrides::default()).unwrap();
    assert_eq!(loaded.config.max_frame_bytes, 2048, "a plain number too");
    let loaded = load(
        None,
        &[("DAEMONEYE_IPC_MAX_FRAME_BYTES", "1M")],
        ConfigOverrides::default(),
    )
    .unwrap();
    assert_eq!(loaded.config.max_frame_bytes, 1 << 20);
    let message = load_err(
        None,
        &[("DAEMONEYE_IPC_MAX_FRAME_BYTES", "1 lot")],
        ConfigOverrides::default(),
    );
    assert_mentions(
        &message,
        &["DAEMONEYE_IPC_MAX_FRAME_BYTES=\"1 lot\"", "1K = 1024"],
    );
}

#[test]
fn a_layer_from_another_format_may_leave_a_setting_null() {
    let layer: ConfigOverrides = serde_json::from_str(
        r#"{"max_connections": null, "read_timeout_ms": 2000, "max_frame_bytes": "+64K"}"#,
    )
    .unwrap();
    assert_eq!(
        layer.max_connections, None,
        "null leaves it to the layer below"
    );
    assert_eq!(layer.read_timeout_ms, Some(2000));
    assert_eq!(layer.max_frame_bytes, Some(64 * 1024));
}

fn flag_err(flags: ConfigOverrides) -> String {
    load_err(None, &[], flags)
}

#[test]
fn max_frame_bytes_runs_from_room_for_an_error_answer_to_64_mib() {
    let message = flag_err(ConfigOverrides {
        max_frame_bytes: Some(0),
        ..Default::default()
    });
    assert_mentions(
        &message,
        &[
            "invalid ipc.max_frame_bytes = 0 (from command-line flag)",
            "between 1024 and 67108864",
        ],
    );

    let message = load_err(
        None,
        &[("DAEMONEYE_IPC_MAX_FRAME_BYTES", "67108865")],
        ConfigOverrides::default(),
    );
    assert_mentions(
        &message,
        &[
            "max_frame_bytes = 67108865 (from env DAEMONEYE_IPC_MAX_FRAME_BYTES)",
            "64 MiB",
        ],
    );

    let ceiling = load(
        None,
        &[("DAEMONEYE_IPC_MAX_FRAME_BYTES", "67108864")],
        ConfigOverrides::default(),
    )
    .unwrap();
    assert_eq!(
        ceiling.config.max_frame_bytes,
        64 << 20,
        "the ceiling itself is allowed"
    );
}

#[test]
fn max_connections_must_be_at_least_one_and_sane() {
    let file = config_file("[ipc]\nmax_connections = 0\n");
    let message = load_err(Some(&file), &[], ConfigOverrides::default());
    assert_mentions(
        &message,
        &[
            "invalid ipc.max_connections = 0",
            &format!("(from file {})", file.path().display()),
            "between 1 and 65536",
        ],
    );

    let message = flag_err(ConfigOverrides {
        max_connections: Some(1_000_000),
        ..Default::default()
    });
    assert_mentions(
        &message,
        &["max_connections = 1000000", "between 1 and 65536"],
    );
}

#[test]
fn every_timeout_must_be_positive_and_under_a_day() {
    for (flags, key) in [
        (
            ConfigOverrides {
                accept_timeout_ms: Some(0),
                ..Default::default()
            },
            "accept_timeout_ms = 0",
        ),
        (
            ConfigOverrides {
                read_timeout_ms: Some(0),
                ..Default::default()
            },
            "read_timeout_ms = 0",
        ),
        (
            ConfigOverrides {
                write_timeout_ms: Some(0),
                ..Default::default()
            },
            "write_timeout_ms = 0",
        ),
        (
            ConfigOverrides {
                read_timeout_ms: Some(86_400_001),
                ..Default::default()
            },
            "read_timeout_ms = 86400001",
        ),
    ] {
        let message = flag_err(flags);
        assert_mentions(&message, &[key, "between 1 and 86400000 milliseconds"]);
    }
}

#[test]
fn the_endpoint_must_not_be_empty() {
    let message = flag_err(ConfigOverrides {
        endpoint_path: Some("  ".into()),
        ..Default::default()
    });
    assert_mentions(&message, &["invalid ipc.endpoint_path", "non-empty"]);
}

#[test]
fn validate_checks_a_config_built_in_code() {
    let config = IpcConfig {
        max_connections: 0,
        ..IpcConfig::default()
    };
    let message = config.validate().unwrap_err().to_string();
    assert_eq!(
        message,
        "invalid ipc.max_connections = 0: must be between 1 and 65536"
    );
    assert!(IpcConfig::default().validate().is_ok());
}

#[test]
fn the_default_task_deadline_keeps_within_a_lower_read_timeout() {
    // #17: with both at 30 s the collector's answer to a task that ran out
    // of time raced the agent's own deadline, which started first.
    let defaults = load(None, &[], ConfigOverrides::default()).unwrap().config;
    assert_eq!(defaults.task_timeout_ms, 25_000);
    assert!(defaults.task_timeout_answerable());

    let lowered = load(
        None,
        &[],
        ConfigOverrides {
            read_timeout_ms: Some(1500),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(lowered.config.task_timeout_ms, 1250, "five sixths of 1500");
    assert_eq!(
        lowered.origin(ConfigField::TaskTimeoutMs),
        &ConfigOrigin::Default
    );
    assert!(lowered.config.task_timeout_answerable());

    // One set explicitly is kept, answerable or not (`serve` warns).
    let explicit = load(
        None,
        &[],
        ConfigOverrides {
            read_timeout_ms: Some(1500),
            task_timeout_ms: Some(1500),
            ..Default::default()
        },
    )
    .unwrap()
    .config;
    assert_eq!(explicit.task_timeout_ms, 1500);
    assert!(!explicit.task_timeout_answerable());
}

#[test]
fn the_per_peer_cap_is_off_by_default_and_at_most_max_connections() {
    let defaults = load(None, &[], ConfigOverrides::default()).unwrap().config;
    assert_eq!(defaults.max_connections_per_peer, 0);
    let message = load_err(
        None,
        &[("DAEMONEYE_IPC_MAX_CONNECTIONS_PER_PEER", "17")],
        ConfigOverrides::default(),
    );
    assert_mentions(
        &message,
        &[
            "invalid ipc.max_connections_per_peer = 17",
            "(from env DAEMONEYE_IPC_MAX_CONNECTIONS_PER_PEER)",
            "between 0 (no cap) and max_connections = 16",
        ],
    );
}

#[test]
fn a_legacy_server_refuses_more_connections_than_it_runs_threads_for() {
    if !TransportKind::Legacy.is_compiled() {
        return; // A build without legacy refuses the transport itself.
    }
    let config = IpcConfig {
        transport: TransportKind::Legacy,
        max_connections: 1025,
        ..IpcConfig::default()
    };
    config.validate().unwrap();
    let message = config.validate_server().unwrap_err().to_string();
    assert_mentions(
        &message,
        &[
            "max_connections = 1025",
            "at most 1024 with transport = \"legacy\"",
            "use interprocess or tokio",
        ],
    );
    IpcConfig {
        transport: TransportKind::Legacy,
        max_connections: 1024,
        ..IpcConfig::default()
    }
    .validate_server()
    .unwrap();
}
