//! `dws tokenizer train|eval`: the VQ frame tokenizer of the autoregressive backbone
//! (`dws_models::vq`), trained on the frames of one or more datasets and scored on
//! held-out frames (PSNR, codebook usage).
//!
//! A run directory holds `config.json` (tokenizer and training settings, data),
//! `metrics.jsonl` (loss, reconstruction PSNR of the batch, codes restarted) and
//! `checkpoints/`; `eval` writes `eval.json` and `recon.png`.

use crate::device::{dispatch, DeviceArg, Job};
use anyhow::{bail, ensure, Context, Result};
use burn::prelude::Backend;
use burn::tensor::backend::AutodiffBackend;
use dws_data::{ClipSampler, Dataset};
use dws_models::checkpoint;
use dws_models::flow::{frames_to_tensor, tensor_to_frames};
use dws_models::train::{ClipSource, RunOptionsLite};
use dws_models::vq::{train_tokenizer, VqConfig, VqStepLog, VqTokenizer, VqTrainConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Train a tokenizer on the frames of one or more datasets.
    Train(TrainArgs),
    /// Reconstruct held-out frames: PSNR, codebook usage, a picture.
    Eval(EvalArgs),
}

#[derive(clap::Args, Clone, Debug)]
pub struct TrainArgs {
    /// Datasets, comma-separated (frames are drawn from each in turn).
    #[arg(long)]
    pub data: String,
    /// debug (seconds) or small (two CPU cores).
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// Optimiser steps (overrides the preset).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value = "runs/tokenizer")]
    pub out: PathBuf,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    #[arg(long)]
    pub seed: Option<u64>,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
    /// Stop after this many steps in this call (for tests of resume).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

#[derive(clap::Args, Clone, Debug)]
pub struct EvalArgs {
    /// A `dws tokenizer train` run (its newest checkpoint) or one checkpoint.
    #[arg(long)]
    pub ckpt: PathBuf,
    /// Held-out datasets, comma-separated.
    #[arg(long)]
    pub data: String,
    /// Frames drawn (uniformly, seeded) from each dataset.
    #[arg(long, default_value_t = 256)]
    pub frames: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where eval.json and recon.png go (default: the run directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
}

/// `config.json` of a tokenizer run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenizerRunConfig {
    pub command: String,
    pub preset: String,
    pub vq: VqConfig,
    pub train: VqTrainConfig,
    pub data: Vec<PathBuf>,
}

/// Scores of `dws tokenizer eval` on one dataset.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenizerScores {
    pub data: PathBuf,
    pub frames: usize,
    /// Mean per-frame PSNR (data range 1) of the u8 reconstructions.
    pub psnr: f64,
    /// Distinct codes used over these frames, as a share of the codebook.
    pub codebook_usage: f64,
    /// exp(entropy) of the token distribution: the number of equally used codes it
    /// is worth.
    pub perplexity: f64,
}

fn dirs_of(data: &str) -> Vec<PathBuf> {
    data.split(',')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// One-frame clip samplers of datasets whose frames fit the tokenizer.
fn samplers(dirs: &[PathBuf], side: usize) -> Result<Vec<ClipSampler>> {
    ensure!(!dirs.is_empty(), "--data names no dataset");
    dirs.iter()
        .map(|d| {
            let ds =
                Dataset::open(d).with_context(|| format!("opening dataset {}", d.display()))?;
            let [h, w, c] = ds.header().frame_shape;
            ensure!(
                h == side && w == side && c == 3,
                "{}: frames are {h}×{w}×{c}; the tokenizer takes {side}×{side} RGB",
                d.join("manifest.json").display()
            );
            ClipSampler::from_dataset(&ds, 1)
                .with_context(|| format!("sampling frames from {}", d.display()))
        })
        .collect()
}

fn presets(name: &str) -> Result<(VqConfig, VqTrainConfig)> {
    match name {
        "debug" => Ok((VqConfig::debug(), VqTrainConfig::debug())),
        "small" => Ok((VqConfig::small(), VqTrainConfig::small())),
        other => bail!("unknown tokenizer preset `{other}`: debug or small"),
    }
}

struct TrainJob {
    args: TrainArgs,
}

impl Job for TrainJob {
    type Out = ();
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<()> {
        let a = self.args;
        let cfg_path = a.out.join("config.json");
        let config = if a.resume && cfg_path.is_file() {
            let mut stored: TokenizerRunConfig =
                serde_json::from_str(&fs::read_to_string(&cfg_path)?)
                    .with_context(|| format!("{} is not a tokenizer config", cfg_path.display()))?;
            if let Some(s) = a.steps {
                stored.train.steps = s;
            }
            stored
        } else {
            let (vq, mut train) = presets(&a.preset)?;
            if let Some(s) = a.steps {
                train.steps = s;
            }
            if let Some(s) = a.seed {
                train.seed = s;
            }
            TokenizerRunConfig {
                command: "tokenizer train".into(),
                preset: a.preset.clone(),
                vq,
                train,
                data: dirs_of(&a.data),
            }
        };
        config.vq.validate().map_err(anyhow::Error::msg)?;
        config.train.validate().map_err(anyhow::Error::msg)?;
        let source = ClipSource {
            samplers: samplers(&config.data, config.vq.image_size)?,
        };
        fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
        fs::write(&cfg_path, serde_json::to_string_pretty(&config)?)?;
        B::seed(&device, config.train.seed);
        let vq = config.vq.init::<B>(&device);
        println!(
            "tokenizer: {}×{} frames -> {}×{} tokens of {} codes; {} steps of {} frames from {}; into {}",
            config.vq.image_size,
            config.vq.image_size,
            config.vq.grid(),
            config.vq.grid(),
            config.vq.codebook_size,
            config.train.steps,
            config.train.batch,
            config
                .data
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            a.out.display()
        );
        let bar = crate::progress::bar(config.train.steps as u64, "steps");
        let mut on_step = |l: &VqStepLog| {
            bar.set_position(l.step as u64);
            bar.set_message(format!("loss {:.4}, batch PSNR {:.2} dB", l.loss, l.psnr));
        };
        let mut sample = |n: usize, rng: &mut ChaCha8Rng| source.sample(n, rng).frames;
        train_tokenizer(
            &a.out,
            vq,
            &config.train,
            &mut sample,
            RunOptionsLite {
                resume: a.resume,
                stop_after: a.stop_after,
                on_step: &mut on_step,
            },
        )?;
        bar.finish_and_clear();
        let logs: Vec<VqStepLog> = super::ppo::read_jsonl(&a.out.join("metrics.jsonl"))?;
        if let Some(l) = logs.last() {
            println!(
                "tokenizer: step {} of {}, loss {:.4}, batch PSNR {:.2} dB; wrote {}/metrics.jsonl, \
                 checkpoints/ (next: `dws tokenizer eval --ckpt {} --data HELD_OUT`)",
                l.step,
                config.train.steps,
                l.loss,
                l.psnr,
                a.out.display(),
                a.out.display()
            );
        }
        Ok(())
    }
}

/// The run directory of a tokenizer run or one of its checkpoints.
fn run_of(path: &Path) -> PathBuf {
    super::world::run_of(path)
}

/// The newest (or the given) checkpoint of a tokenizer run, with the run's config.
pub fn load_tokenizer<B: Backend>(
    path: &Path,
    device: &B::Device,
) -> Result<(TokenizerRunConfig, VqTokenizer<B>, PathBuf)> {
    let (config, ckpt) = tokenizer_checkpoint(path)?;
    let vq = checkpoint::load_model(config.vq.init::<B>(device), &ckpt, device)?;
    Ok((config, vq, ckpt))
}

/// The config of a tokenizer run and its newest (or the given) checkpoint's path.
pub fn tokenizer_checkpoint(path: &Path) -> Result<(TokenizerRunConfig, PathBuf)> {
    let run = run_of(path);
    let cfg_path = run.join("config.json");
    let config: TokenizerRunConfig = serde_json::from_str(
        &fs::read_to_string(&cfg_path)
            .with_context(|| format!("{} is not a tokenizer run", run.display()))?,
    )
    .with_context(|| format!("{} is not a tokenizer config", cfg_path.display()))?;
    let ckpt = checkpoint::latest(path)
        .with_context(|| format!("{} has no checkpoint yet", path.display()))?;
    Ok((config, ckpt))
}

struct EvalJob {
    args: EvalArgs,
}

impl Job for EvalJob {
    type Out = Vec<TokenizerScores>;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<Vec<TokenizerScores>> {
        let a = self.args;
        ensure!(a.frames > 0, "--frames must be at least 1");
        let run = run_of(&a.ckpt);
        let (config, vq, _) = load_tokenizer::<B::InnerBackend>(&a.ckpt, &device)?;
        let side = config.vq.image_size;
        let out = a.out.clone().unwrap_or_else(|| run.clone());
        fs::create_dir_all(&out)?;
        let dirs = dirs_of(&a.data);
        let mut scores = Vec::new();
        let mut picture: Vec<Vec<u8>> = Vec::new();
        for (dir, sampler) in dirs.iter().zip(samplers(&dirs, side)?) {
            let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
            let frames = sampler.sample(a.frames, &mut rng).frames;
            let f = side * side * 3;
            let mut counts = vec![0u64; config.vq.codebook_size];
            let mut psnr_sum = 0.0;
            let mut recon_all = Vec::with_capacity(frames.len());
            for chunk in frames.chunks(32 * f) {
                let n = chunk.len() / f;
                let x = frames_to_tensor::<B::InnerBackend>(chunk, [n, 1, side, side, 3], &device)
                    .reshape([n, 3, side, side]);
                let tokens = vq.encode(x);
                let ids: Vec<i64> = tokens
                    .clone()
                    .into_data()
                    .convert::<i64>()
                    .into_vec()
                    .expect("ids");
                for t in ids {
                    counts[t as usize] += 1;
                }
                let recon = tensor_to_frames(vq.decode(tokens).reshape([n, 1, 3, side, side]));
                for (p, q) in chunk.chunks_exact(f).zip(recon.chunks_exact(f)) {
                    let (p, q) = (
                        dws_metrics::image::to_unit(p),
                        dws_metrics::image::to_unit(q),
                    );
                    psnr_sum += dws_metrics::image::psnr(
                        &dws_metrics::image::Frame::new(&p, side, side)?,
                        &dws_metrics::image::Frame::new(&q, side, side)?,
                    )?;
                }
                recon_all.extend(recon);
            }
            let total: u64 = counts.iter().sum();
            let entropy: f64 = counts
                .iter()
                .filter(|&&c| c > 0)
                .map(|&c| {
                    let p = c as f64 / total as f64;
                    -p * p.ln()
                })
                .sum();
            let s = TokenizerScores {
                data: dir.clone(),
                frames: a.frames,
                psnr: psnr_sum / a.frames as f64,
                codebook_usage: counts.iter().filter(|&&c| c > 0).count() as f64
                    / counts.len() as f64,
                perplexity: entropy.exp(),
            };
            println!(
                "{}: PSNR {:.2} dB over {} frames; {:.1}% of the {} codes used, perplexity {:.0}",
                dir.display(),
                s.psnr,
                s.frames,
                100.0 * s.codebook_usage,
                config.vq.codebook_size,
                s.perplexity
            );
            let show = a.frames.min(8) * f;
            picture.push(frames[..show].to_vec());
            picture.push(recon_all[..show].to_vec());
            scores.push(s);
        }
        fs::write(
            out.join("eval.json"),
            serde_json::to_string_pretty(&scores)?,
        )?;
        crate::report::write_rows_png(&out.join("recon.png"), &picture, side, side, 3)?;
        println!(
            "wrote {}/eval.json and recon.png (per dataset: frames above, reconstructions below)",
            out.display()
        );
        Ok(scores)
    }
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Train(a) => {
            let device = a.device;
            dispatch(device, TrainJob { args: a })
        }
        Command::Eval(a) => {
            let device = a.device;
            dispatch(device, EvalJob { args: a }).map(|_| ())
        }
    }
}
