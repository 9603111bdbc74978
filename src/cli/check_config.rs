//! `snaprelay check-config`: validate the config and print the effective values, secrets
//! masked.

use crate::config::Config;

pub fn run(config: &Config) -> anyhow::Result<()> {
    print!("{}", config.to_display_toml());
    Ok(())
}
