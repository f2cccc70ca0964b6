//! `dws envs`: what can be collected, with action spaces and templates.

use anyhow::Result;
use dws_envs::{known_ids, EnvConfig};

#[derive(clap::Args)]
pub struct Args {
    /// Show one env's options and action templates (e.g. procgen:coinrun).
    id: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    match args.id {
        None => {
            for id in known_ids() {
                println!("{id}");
            }
            println!("\n`dws envs ID` shows an env's options and action templates.");
            #[cfg(not(feature = "atari"))]
            println!("atari:* ids need a build with `--features atari` (GPL-2.0 emulator, built with cmake).");
        }
        Some(id) => {
            let config = EnvConfig::parse(&id, &[])?;
            println!("{id}");
            println!(
                "options (set with --env-opts key=value,...):\n{}",
                serde_json::to_string_pretty(&config)?
            );
            let env = dws_envs::make(&config)?;
            let spec = env.spec();
            println!("action space: {}", spec.action_space);
            for (i, t) in spec.action_templates.iter().enumerate() {
                println!("  {i:>2}: {t}");
            }
        }
    }
    Ok(())
}
