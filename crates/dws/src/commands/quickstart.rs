//! `dws quickstart`: the README's run command. Runs the pipeline end to end on small
//! defaults and prints what it made: fetch the Procgen library, collect a small dataset
//! from each environment family, write a preview grid, pretrain a base video model on all
//! of them, fine-tune it with DWS on the pushing task, write a prediction GIF, and score
//! the model on held-out clips with `dws eval` (metrics and an HTML report).
//! Re-running it resumes: datasets that hold enough episodes are kept and training runs
//! continue from their checkpoints.

use super::collect;
use anyhow::Result;
use dws_data::{Dataset, PreviewOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Where everything goes.
    #[arg(long, default_value = "runs/quickstart")]
    out: PathBuf,
    /// debug (seconds) or small (a minute or two).
    #[arg(long, default_value = "debug")]
    preset: Preset,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Preset {
    Debug,
    Small,
}

struct Job {
    env: &'static str,
    env_opts: &'static str,
    policy: dws_envs::PolicyKind,
    episodes: usize,
}

fn jobs(preset: Preset) -> Vec<Job> {
    use dws_envs::PolicyKind::{Random, Scripted};
    let (procgen, push) = match preset {
        Preset::Debug => (6, 12),
        Preset::Small => (64, 256),
    };
    let mut jobs = vec![
        Job {
            env: "procgen:coinrun",
            env_opts: "num_levels=200,max_episode_steps=200",
            policy: Random,
            episodes: procgen,
        },
        Job {
            env: "procgen:ninja",
            env_opts: "num_levels=200,max_episode_steps=200",
            policy: Random,
            episodes: procgen,
        },
        Job {
            env: "push",
            env_opts: "",
            policy: Scripted,
            episodes: push,
        },
    ];
    if cfg!(feature = "atari") {
        jobs.push(Job {
            env: "atari:breakout",
            env_opts: "max_episode_steps=500",
            policy: Random,
            episodes: procgen,
        });
    }
    jobs
}

/// Held-out pushing episodes (another collection seed) the predictions are scored on.
fn heldout_episodes(preset: Preset) -> usize {
    match preset {
        Preset::Debug => 4,
        Preset::Small => 16,
    }
}

/// Held-out clips scored by `dws eval` at the end (FVD's I3D is the slow part).
fn eval_clips(preset: Preset) -> usize {
    match preset {
        Preset::Debug => 8,
        Preset::Small => 32,
    }
}

/// Collects `episodes` episodes into `dir` unless it already holds them.
fn collect_into(dir: &Path, job: &Job, episodes: usize, seed: u64) -> Result<()> {
    let have = existing_episodes(dir);
    if have < episodes {
        collect::run(collect::Args {
            env: job.env.into(),
            env_opts: job.env_opts.into(),
            policy: collect::CollectPolicy::Builtin(job.policy),
            greedy: false,
            episodes: Some(episodes - have),
            steps: None,
            out: dir.to_path_buf(),
            workers: 2,
            seed,
        })?;
    } else {
        println!("      {} already holds {have} episodes", dir.display());
    }
    Ok(())
}

/// Added to `--seed` for the held-out collection.
const HELDOUT_SEED: u64 = 1_000_003;

fn existing_episodes(dir: &Path) -> usize {
    Dataset::open(dir).map(|d| d.len()).unwrap_or(0)
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    println!(
        "dws quickstart ({:?} preset) → {}",
        args.preset,
        args.out.display()
    );
    println!("[1/6] collecting a small dataset from each environment family");
    let mut dirs = Vec::new();
    let mut heldout = PathBuf::new();
    for job in jobs(args.preset) {
        let dir = args.out.join("data").join(job.env.replace(':', "-"));
        collect_into(&dir, &job, job.episodes, args.seed)?;
        if job.env == "push" {
            heldout = args.out.join("data").join("push-heldout");
            let seed = args.seed.wrapping_add(HELDOUT_SEED);
            collect_into(&heldout, &job, heldout_episodes(args.preset), seed)?;
        }
        dirs.push(dir);
    }
    println!("[2/6] writing preview grids");
    let grid = args.out.join("preview.png");
    super::dataset::preview(
        &dirs,
        &grid,
        &PreviewOptions {
            episodes: 3,
            frames: 10,
            scale: 2,
        },
    )?;
    let preset = match args.preset {
        Preset::Debug => "debug",
        Preset::Small => "small",
    };
    let runs = args.out.join("runs");
    let base = runs.join("base");
    let resume = |run: &Path| super::world::RunConfig::read(run).is_ok();
    println!(
        "[3/6] pretraining the action-free base video model on all datasets ({preset} preset)"
    );
    let flags = |out: PathBuf| super::world::TrainFlags {
        preset: preset.to_string(),
        resume: resume(&out),
        out,
        steps: None,
        device: crate::device::DeviceArg::Cpu,
        stop_after: None,
    };
    super::world::pretrain(super::world::PretrainArgs {
        data: dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(","),
        backbone: super::world::Backbone::Flow,
        tokenizer: None,
        flags: flags(base.clone()),
    })?;
    let push = dirs
        .iter()
        .find(|d| d.ends_with("push"))
        .cloned()
        .expect("quickstart collects push");
    let dws_run = runs.join("push-dws");
    println!("[4/6] fine-tuning it into a world simulator of the pushing task with DWS");
    super::world::finetune(super::world::FinetuneArgs {
        base: base.clone(),
        data: push.clone(),
        action_module: super::world::OnOff::On,
        embedder: "auto".into(),
        motion_loss: None,
        motion_strength: None,
        motion_temperature: None,
        train: "all".into(),
        flags: flags(dws_run.clone()),
    })?;
    println!("[5/6] predicting held-out pushing episodes from their first frame and actions");
    let gif = args.out.join("prediction.gif");
    let report = super::predict::predict(super::predict::PredictArgs {
        ckpt: dws_run.clone(),
        data: heldout.clone(),
        episode: 0,
        episodes: heldout_episodes(args.preset),
        actions_from: None,
        sampling: Default::default(),
        context: 1,
        horizon: 15,
        out: gif.clone(),
        seed: args.seed,
        device: crate::device::DeviceArg::Cpu,
    })?;
    println!("[6/6] scoring the world simulator on held-out clips (PSNR, SSIM, LPIPS, FVD)");
    let eval = super::eval::eval(super::eval::EvalArgs {
        ckpt: dws_run.clone(),
        data: heldout.clone(),
        context: 1,
        horizon: 15,
        clips: eval_clips(args.preset),
        seed: args.seed,
        sampling: Default::default(),
        out: Some(args.out.join("eval")),
        name: Some("push-dws".into()),
        no_fvd: false,
        gifs: 8,
        device: crate::device::DeviceArg::Cpu,
    })?;
    println!();
    for dir in &dirs {
        let ds = Dataset::open(dir)?;
        let m = ds.manifest();
        println!(
            "  {:<16} {:>4} episodes, {:>6} steps, mean return {:>7.2}   {}",
            m.header.env_id,
            m.num_episodes,
            m.num_steps,
            m.episodes.iter().map(|e| e.ret).sum::<f32>() / m.num_episodes.max(1) as f32,
            dir.display()
        );
    }
    println!(
        "  preview grid (3 episodes per env, one row each): {}",
        grid.display()
    );
    println!(
        "  base model: {}   world simulator: {}",
        base.display(),
        dws_run.display()
    );
    println!(
        "  prediction of {} held-out episodes (ground truth | prediction | difference): {}\n  mean PSNR {:.2} dB (repeating the first frame instead: {:.2} dB); filmstrip {}",
        report.episodes.len(),
        gif.display(),
        report.mean_psnr,
        report.reference_mean_psnr,
        gif.with_extension("png").display()
    );
    println!(
        "  eval of {} held-out clips: PSNR {:.2} dB, SSIM {:.3}, LPIPS {:.3}, FVD {}, moving-pixel PSNR {} dB (repeat last frame: {:.2} dB, {:.3}, {:.3}, {}, {} dB)\n  report: {}",
        eval.clips,
        eval.model.psnr,
        eval.model.ssim,
        eval.model.lpips,
        eval.model.fvd.map_or("-".into(), |v| format!("{v:.0}")),
        super::eval::fmt_db(eval.model.psnr_moving),
        eval.repeat_last.psnr,
        eval.repeat_last.ssim,
        eval.repeat_last.lpips,
        eval.repeat_last.fvd.map_or("-".into(), |v| format!("{v:.0}")),
        super::eval::fmt_db(eval.repeat_last.psnr_moving),
        args.out.join("eval").join("report.html").display()
    );
    if preset == "debug" {
        println!("The debug preset trains for under a minute: it shows the pipeline, not a useful model. `--preset small` trains the larger small model (about 30 minutes on 2 cores); it scores above the repeat-frame reference in PSNR and clearly above a fine-tune without actions, most of all on the pixels that move, but its frames blur (README, Status).");
    }
    println!(
        "done in {:.1} s. Next: `dws dataset info {}`, `dws eval --help` (more clips, other models, `dws compare`), `dws metrics --help` (your own videos).",
        started.elapsed().as_secs_f64(),
        dirs[0].display()
    );
    println!(
        "Drive the world simulator yourself, beside the real pushing task: `dws play --ckpt {}` and open the address it prints.",
        dws_run.display()
    );
    println!(
        "Train an agent in a real game: `dws ppo --env procgen:coinrun`; inside the world simulator as well: `dws mbrl --env push --preset debug --steps 640` (seconds; README, `dws mbrl`, for CoinRun)."
    );
    println!(
        "Offline RL with world-model data (the paper's Table 2): `dws imagine` and `dws offline` (README, `dws imagine`, `dws offline`)."
    );
    if !cfg!(feature = "atari") {
        println!(
            "Atari is left out of this build; add `--features atari` (needs cmake) to include it."
        );
    }
    Ok(())
}
