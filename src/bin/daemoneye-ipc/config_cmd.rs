//! `daemoneye-ipc config`: the effective settings, each with its origin.

use clap::Args;

use crate::{ConfigArgs, Failure};

#[derive(Args)]
pub struct ConfigCmd {
    #[command(flatten)]
    settings: ConfigArgs,
}

impl ConfigCmd {
    /// Prints the effective `[ipc]` table as TOML, each value followed by a
    /// comment naming where it came from (default, file, env, flag).
    pub fn run(self) -> Result<(), Failure> {
        let loaded = self.settings.load().map_err(Failure::usage)?;
        print!("{}", loaded.to_annotated_toml());
        Ok(())
    }
}
