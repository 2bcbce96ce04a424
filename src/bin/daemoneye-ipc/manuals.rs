//! What the binary says about itself: shell completions and man pages,
//! generated from the same clap definitions that parse the command line
//! (so they cannot drift from it), and the answer of a command this build
//! left out.

use std::io::Write;

use clap::Args;

use crate::Failure;

#[derive(Args)]
pub struct CompletionsCmd {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

impl CompletionsCmd {
    pub fn run(self, command: clap::Command) -> Result<(), Failure> {
        let name = command.get_name().to_owned();
        let mut command = without_hidden_subcommands(command);
        let mut script = Vec::new();
        clap_complete::generate(self.shell, &mut command, name, &mut script);
        write_stdout(&script)
    }
}

/// The command as an operator sees it: clap_complete would offer the
/// hidden helpers that `compare` starts (the man pages leave them out on
/// their own). The root takes no arguments of its own, so rebuilding it
/// around the visible subcommands loses nothing.
fn without_hidden_subcommands(command: clap::Command) -> clap::Command {
    let visible: Vec<clap::Command> = visible_subcommands(&command).cloned().collect();
    let mut root = clap::Command::new(command.get_name().to_owned())
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(true)
        .subcommands(visible);
    if let Some(about) = command.get_about() {
        root = root.about(about.clone());
    }
    root
}

#[derive(Args)]
pub struct ManCmd {
    /// The page of this subcommand (`daemoneye-ipc-SUBCOMMAND(1)`) instead
    /// of the main page, which lists them all.
    #[arg(value_name = "SUBCOMMAND")]
    subcommand: Option<String>,
}

impl ManCmd {
    pub fn run(self, command: clap::Command) -> Result<(), Failure> {
        let subcommand = self.subcommand.clone();
        let page = match &self.subcommand {
            // clap's implicit `help` subcommand has no page of its own.
            None => without_hidden_subcommands(command).disable_help_subcommand(true),
            Some(name) => {
                let names: Vec<String> = visible_subcommands(&command)
                    .map(|sub| sub.get_name().to_owned())
                    .collect();
                let parent = command.get_name().to_owned();
                let Some(sub) = command
                    .find_subcommand(name)
                    .filter(|sub| !sub.is_hide_set())
                else {
                    return Err(Failure::usage(format!(
                        "no subcommand {name:?}; the pages are: {}",
                        names.join(", ")
                    )));
                };
                // Named and versioned as a page of its own.
                sub.clone()
                    .name(format!("{parent}-{}", sub.get_name()))
                    .version(env!("CARGO_PKG_VERSION"))
            }
        };
        let has_subcommands = page.get_subcommands().next().is_some();
        let man = clap_mangen::Man::new(page);
        let mut roff = Vec::new();
        let rendered = (|| {
            man.render_title(&mut roff)?;
            man.render_name_section(&mut roff)?;
            man.render_synopsis_section(&mut roff)?;
            man.render_description_section(&mut roff)?;
            man.render_options_section(&mut roff)?;
            if has_subcommands {
                man.render_subcommands_section(&mut roff)?;
            }
            roff.extend_from_slice(extra_sections(subcommand.as_deref()).as_bytes());
            man.render_version_section(&mut roff)
        })();
        rendered.map_err(|e| Failure::runtime(format!("cannot render the man page: {e}")))?;
        write_stdout(&roff)
    }
}

/// The sections clap's definitions do not carry: ENVIRONMENT, EXIT STATUS
/// and EXAMPLES, for the main page (`None`) or a subcommand's, in roff.
fn extra_sections(page: Option<&str>) -> String {
    let mut roff = String::new();
    let takes_settings = matches!(page, None | Some("serve" | "send" | "ping" | "config"));
    roff.push_str(".SH ENVIRONMENT\n");
    if takes_settings {
        for field in daemoneye_ipc::config::ConfigField::ALL {
            roff.push_str(&format!(
                ".TP\n\\fB{}\\fR\nSets ipc.{}; {} wins over it, and it wins over the file \
                 given with \\-\\-config.\n",
                escape(&field.env_var()),
                escape(field.key()),
                escape(&flag_of(field)),
            ));
        }
        roff.push_str(".PP\nAny other DAEMONEYE_IPC_* variable is refused by name.\n");
    }
    roff.push_str(
        ".TP\n\\fBRUST_LOG\\fR\nWhich log lines go to stderr (default info for serve, warn \
         otherwise), e.g. RUST_LOG=debug.\n",
    );

    roff.push_str(".SH \"EXIT STATUS\"\n");
    let statuses: &[(u8, &str)] = match page {
        Some("serve") => &[
            (
                0,
                "Stopped by SIGINT or SIGTERM after answering the tasks in flight.",
            ),
            (
                1,
                "Could not serve: the endpoint is in use or unsafe, or another I/O failure.",
            ),
            (2, "Bad usage or an invalid configuration."),
        ],
        Some("send") => &[
            (0, "A result came back (look at its success field)."),
            (
                1,
                "No result: no server, a deadline, a lost or refused connection.",
            ),
            (2, "Bad usage or an invalid configuration."),
            (
                3,
                "With \\-\\-expected\\-hash: the hash differs, or could not be computed.",
            ),
        ],
        Some("ping") => &[
            (0, "Every round trip was answered."),
            (
                1,
                "No answer: no server, a deadline, a lost or refused connection.",
            ),
            (2, "Bad usage or an invalid configuration."),
        ],
        Some("compare") => &[
            (0, "The comparison ran; its verdict is in the report."),
            (1, "A measurement failed."),
            (2, "Bad usage, or a build without the bench feature."),
        ],
        Some(_) => &[
            (0, "Success."),
            (2, "Bad usage or an invalid configuration."),
        ],
        None => &[
            (0, "Success."),
            (1, "The operation failed (I/O, the peer, the handler)."),
            (2, "Bad usage or an invalid configuration."),
            (
                3,
                "send \\-\\-expected\\-hash: the hash is not the one expected.",
            ),
        ],
    };
    for (status, meaning) in statuses {
        roff.push_str(&format!(".TP\n\\fB{status}\\fR\n{meaning}\n"));
    }

    roff.push_str(".SH EXAMPLES\n");
    let examples: &[(&str, &str)] = match page {
        Some("serve") => &[
            (
                "Serve on the default endpoint, logging JSON:",
                "daemoneye-ipc serve --log-format json",
            ),
            (
                "Roll back to the legacy backend, same socket:",
                "DAEMONEYE_IPC_TRANSPORT=legacy daemoneye-ipc serve",
            ),
        ],
        Some("send") => &[
            (
                "List the processes named sshd:",
                "daemoneye-ipc send --task-id t1 --name sshd",
            ),
            (
                "Check a file's hash in a script (exit 3 if it differs):",
                "daemoneye-ipc send --task-id t2 --hash-path /usr/bin/ssh --expected-hash 3f1c...",
            ),
        ],
        Some("ping") => &[(
            "Ten round trips to a collector on another endpoint:",
            "daemoneye-ipc ping --count 10 --endpoint /run/daemoneye/procmond.sock",
        )],
        Some("config") => &[(
            "What a collector started with this file and environment would use:",
            "daemoneye-ipc config --config /etc/daemoneye/ipc.toml",
        )],
        Some("compare") => &[(
            "Every backend side by side, about 30 seconds:",
            "daemoneye-ipc compare --quick",
        )],
        Some("completions") => &[(
            "Bash completions for this user:",
            "daemoneye-ipc completions bash > ~/.local/share/bash-completion/completions/daemoneye-ipc",
        )],
        Some(_) => &[("The page of serve:", "daemoneye-ipc man serve | man -l -")],
        None => &[
            ("Run a collector:", "daemoneye-ipc serve"),
            (
                "Ask it for its processes:",
                "daemoneye-ipc send --task-id t1",
            ),
            (
                "Check it answers, and how fast:",
                "daemoneye-ipc ping --count 5",
            ),
        ],
    };
    for (what, command) in examples {
        roff.push_str(&format!(
            ".PP\n{}\n.PP\n.RS\n.nf\n{}\n.fi\n.RE\n",
            escape(what),
            escape(command)
        ));
    }
    roff
}

/// The command-line flag that sets `field`.
fn flag_of(field: daemoneye_ipc::config::ConfigField) -> String {
    use daemoneye_ipc::config::ConfigField;
    match field {
        ConfigField::EndpointPath => "--endpoint".to_owned(),
        ConfigField::Crc32Variant => "--crc32".to_owned(),
        other => format!("--{}", other.key().replace('_', "-")),
    }
}

/// `text` for roff: hyphens as `\-`, backslashes doubled, and a leading
/// period or quote kept from being read as a request.
fn escape(text: &str) -> String {
    let escaped = text.replace('\\', "\\\\").replace('-', "\\-");
    if escaped.starts_with(['.', '\'']) {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

fn visible_subcommands(command: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    command.get_subcommands().filter(|sub| !sub.is_hide_set())
}

fn write_stdout(bytes: &[u8]) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::runtime(format!("cannot write to stdout: {e}")))
}

/// A subcommand this build was compiled without: whatever it is given, it
/// says which Cargo feature brings it back, and exits 2.
#[cfg_attr(feature = "bench", allow(dead_code))]
#[derive(Args)]
pub struct NotInThisBuild {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<String>,
}

#[cfg_attr(feature = "bench", allow(dead_code))]
impl NotInThisBuild {
    pub fn run(self, command: &str, feature: &str) -> Result<(), Failure> {
        Err(Failure::usage(format!(
            "`{command}` is not in this build: it needs the Cargo feature `{feature}`; \
             build with `cargo build --release --features {feature}`, or run \
             `cargo run --release --all-features -- {command}` from the source tree"
        )))
    }
}
