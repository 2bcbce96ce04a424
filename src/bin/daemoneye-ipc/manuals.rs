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
        let page = match &self.subcommand {
            None => command,
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
        let mut roff = Vec::new();
        clap_mangen::Man::new(page)
            .render(&mut roff)
            .map_err(|e| Failure::runtime(format!("cannot render the man page: {e}")))?;
        write_stdout(&roff)
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
