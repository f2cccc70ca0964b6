//! `dws dataset info|preview|export-npz`.

use anyhow::{Context, Result};
use clap::Subcommand;
use dws_data::{export_npz, preview_grid, write_png, Dataset, PreviewOptions};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum Command {
    /// Summarise a dataset (env, action space, episodes, steps, returns); --check reads
    /// every episode and verifies it.
    Info {
        dir: PathBuf,
        #[arg(long)]
        check: bool,
    },
    /// Write a PNG grid: one row per episode, frames evenly spaced over its length.
    Preview {
        /// One or more datasets (rows of each, in order).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// Rows per dataset.
        #[arg(long, default_value_t = 4)]
        episodes: usize,
        /// Frames per row.
        #[arg(long, default_value_t = 8)]
        frames: usize,
        /// Upscaling factor.
        #[arg(long, default_value_t = 2)]
        scale: usize,
    },
    /// Import episodes from .npz archives, frame folders, videos or the BAIR robot-pushing
    /// TFRecords (see --help for the layouts and the frame/action alignment rule).
    Import(crate::commands::import::ImportArgs),
    /// Export every episode as a numpy .npz (frames, actions, rewards, terminated, truncated).
    ExportNpz {
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Info { dir, check } => info(&dir, check),
        Command::Preview {
            dirs,
            out,
            episodes,
            frames,
            scale,
        } => {
            let opts = PreviewOptions {
                episodes,
                frames,
                scale,
            };
            preview(&dirs, &out, &opts)?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Command::Import(a) => crate::commands::import::import(a),
        Command::ExportNpz { dir, out } => {
            let ds = Dataset::open(&dir)?;
            let files = export_npz(&ds, &out)?;
            println!(
                "wrote {} .npz files to {} (load with numpy.load)",
                files.len(),
                out.display()
            );
            Ok(())
        }
    }
}

pub fn preview(dirs: &[PathBuf], out: &Path, opts: &PreviewOptions) -> Result<()> {
    let datasets = dirs
        .iter()
        .map(|d| Dataset::open(d).with_context(|| format!("opening {}", d.display())))
        .collect::<Result<Vec<_>>>()?;
    let (w, h, rgb) = preview_grid(&datasets, opts)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    write_png(out, w, h, &rgb)?;
    Ok(())
}

pub fn info(dir: &Path, check: bool) -> Result<()> {
    let ds = Dataset::open(dir)?;
    let m = ds.manifest();
    let h = &m.header;
    let returns: Vec<f32> = m.episodes.iter().map(|e| e.ret).collect();
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
    let bytes: u64 = m.episodes.iter().map(|e| e.bytes).sum();
    println!("dataset   {}", dir.display());
    println!("env       {}  {}", h.env_id, h.env_config);
    println!("actions   {}", serde_json::to_string(&h.action_space)?);
    println!("frames    {:?}", h.frame_shape);
    println!(
        "episodes  {} ({} steps, mean length {:.1}, {} terminated)",
        m.num_episodes,
        m.num_steps,
        m.num_steps as f64 / m.num_episodes.max(1) as f64,
        m.episodes.iter().filter(|e| e.terminated).count()
    );
    if !returns.is_empty() {
        let (lo, hi) = returns
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), r| (a.min(*r), b.max(*r)));
        println!(
            "return    mean {:.3}, min {lo:.3}, max {hi:.3}",
            mean(&returns)
        );
    }
    println!("size      {:.1} MB", bytes as f64 / 1e6);
    if h.imagined {
        println!("origin    imagined by a world model");
    }
    if check {
        for i in 0..ds.len() {
            ds.read_episode(i)?;
        }
        println!("check     all {} episodes read and verified", ds.len());
    }
    Ok(())
}
