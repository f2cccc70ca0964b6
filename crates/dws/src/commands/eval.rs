//! `dws eval`: scores a world model the way the field reports it (DWS paper, Table 1:
//! PSNR, SSIM, LPIPS, FVD) on held-out clips, beside the "repeat the last context frame"
//! reference, and writes `metrics.json`, per-frame plots, side-by-side GIFs and an HTML
//! report that shows them. `dws compare` tabulates several evals.

use super::ar::{SamplingArgs, Simulator};
use crate::device::{dispatch, DeviceArg, Job};
use crate::plot::{write_line_plot, Series};
use crate::report::Pair;
use anyhow::{bail, ensure, Context, Result};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use dws_data::{ClipSampler, Dataset};
use dws_metrics::fvd::frechet_distance;
use dws_metrics::i3d::{I3d, FEATURES, MIN_FRAMES};
use dws_metrics::image::{moving_sse, psnr, psnr_from_mse, ssim, to_unit, Frame};
use dws_metrics::lpips::Lpips;
use dws_metrics::video::{i3d_features, split_clips};
use dws_models::flow::tensor_to_frames;
use dws_models::train::to_flow_batch;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Clips rolled out together.
const BATCH: usize = 16;

#[derive(clap::Args, Clone, Debug)]
pub struct EvalArgs {
    /// A run directory or checkpoint.
    #[arg(long)]
    pub ckpt: PathBuf,
    /// Dataset the clips are drawn from; use episodes the model was not trained on.
    #[arg(long)]
    pub data: PathBuf,
    /// Context frames given to the model.
    #[arg(long, default_value_t = 1)]
    pub context: usize,
    /// Frames to predict.
    #[arg(long, default_value_t = 15)]
    pub horizon: usize,
    /// Distinct clips drawn (uniformly over episodes and start frames). FVD needs at
    /// least 2; the literature reports it on 256 or more.
    #[arg(long, default_value_t = 32)]
    pub clips: usize,
    /// Seed of the clip draw and the sampler noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Output directory (default: `eval` inside the run directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Name shown by `dws compare` (default: the run directory's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Skip FVD (the I3D network is the slow part on a CPU).
    #[arg(long)]
    pub no_fvd: bool,
    /// Clips drawn as GIFs in the report.
    #[arg(long, default_value_t = 12)]
    pub gifs: usize,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
}

/// The metrics of one predictor over the clips.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scores {
    /// Means over clips and predicted frames.
    pub psnr: f64,
    pub ssim: f64,
    pub lpips: f64,
    /// Over whole clips (context + prediction) against the ground-truth clips; `None`
    /// when skipped.
    pub fvd: Option<f64>,
    /// Means over clips, one per predicted frame.
    pub psnr_per_frame: Vec<f64>,
    pub ssim_per_frame: Vec<f64>,
    pub lpips_per_frame: Vec<f64>,
    /// Means over predicted frames, one per clip (in `picks` order), for paired
    /// comparisons of models scored on the same clips. Empty in reports written before
    /// these fields.
    #[serde(default)]
    pub psnr_per_clip: Vec<f64>,
    #[serde(default)]
    pub ssim_per_clip: Vec<f64>,
    #[serde(default)]
    pub lpips_per_clip: Vec<f64>,
    /// PSNR over the pixels that moved: where the true frame differs from the last
    /// context frame by more than [`MOVING_THRESHOLD`] in some channel (the same pixels
    /// for every predictor). Per clip, the error is pooled over its predicted frames; the
    /// mean is over the clips where something moved. Whole-frame PSNR barely sees a part
    /// that covers a few percent of the frame, such as a robot arm; this does. `None` when
    /// nothing moved, and in reports written before this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psnr_moving: Option<f64>,
    /// One per clip (`None` where nothing moved); empty in older reports.
    #[serde(default)]
    pub psnr_moving_per_clip: Vec<Option<f64>>,
}

/// How far (in [0, 1] units, any channel) a pixel of the true future must differ from
/// the last context frame to count as moving for [`Scores::psnr_moving`]: about 25 of
/// 255 levels, above compression noise, below any real change of object.
pub const MOVING_THRESHOLD: f64 = 0.1;

/// `metrics.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub name: String,
    pub ckpt: PathBuf,
    pub data: PathBuf,
    pub context: usize,
    pub horizon: usize,
    pub clips: usize,
    pub seed: u64,
    /// Euler steps per frame of a flow model (none for an AR model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_steps: Option<usize>,
    /// flow or ar.
    #[serde(default)]
    pub backbone: String,
    /// How frames were sampled, in words.
    #[serde(default)]
    pub sampling: String,
    pub with_actions: bool,
    /// (episode, first frame) of each clip.
    pub picks: Vec<(usize, usize)>,
    pub model: Scores,
    /// Repeating the last context frame: what a model that has learned nothing about
    /// motion scores.
    pub repeat_last: Scores,
    /// The model from the same starts but given another clip's actions (clip k gets
    /// clip k+1's), against the recorded future, with the same sampler noise. A model
    /// that follows its actions scores clearly worse here than with the clips' own
    /// actions; about equal scores mean it ignores them. Only for models with actions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_actions: Option<Scores>,
    /// Why FVD is missing, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fvd_note: Option<String>,
    pub seconds: f64,
}

struct EvalJob(EvalArgs);

impl Job for EvalJob {
    type Out = EvalReport;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<EvalReport> {
        run::<B::InnerBackend>(self.0, device)
    }
}

/// Runs `dws eval` and returns what it wrote into `metrics.json`.
pub fn eval(args: EvalArgs) -> Result<EvalReport> {
    let device = args.device;
    dispatch(device, EvalJob(args))
}

/// The directory `dws eval` writes to.
pub fn out_dir(args: &EvalArgs) -> PathBuf {
    args.out
        .clone()
        .unwrap_or_else(|| super::world::run_of(&args.ckpt).join("eval"))
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Per-frame PSNR, SSIM and LPIPS of predicted frames against the truth, each
/// `[clips, horizon, H, W, 3]`, averaged over clips, and the moving-pixel PSNR, measured
/// from `last` (`[clips, H, W, 3]`, each clip's last context frame).
fn frame_scores<B: Backend>(
    lpips: &Lpips<B>,
    pred: &[u8],
    truth: &[u8],
    last: &[u8],
    (clips, horizon, h, w): (usize, usize, usize, usize),
    device: &B::Device,
) -> Result<Scores> {
    let f = h * w * 3;
    // [clip * horizon + frame]
    let mut ps = vec![0.0; clips * horizon];
    let mut ss = vec![0.0; clips * horizon];
    // Per clip: squared error and count of the moving pixels.
    let mut moving = vec![(0.0, 0usize); clips];
    let lasts = to_unit(last);
    for i in 0..clips * horizon {
        let (a, b) = (
            to_unit(&pred[i * f..(i + 1) * f]),
            to_unit(&truth[i * f..(i + 1) * f]),
        );
        let (fa, fb) = (Frame::new(&a, h, w)?, Frame::new(&b, h, w)?);
        ps[i] = psnr(&fa, &fb)?;
        ss[i] = ssim(&fa, &fb)?;
        let k = i / horizon;
        let before = Frame::new(&lasts[k * f..(k + 1) * f], h, w)?;
        let (sse, n) = moving_sse(&fa, &fb, &before, MOVING_THRESHOLD)?;
        moving[k].0 += sse;
        moving[k].1 += n;
    }
    let moving_per_clip: Vec<Option<f64>> = moving
        .iter()
        .map(|&(sse, n)| (n > 0).then(|| psnr_from_mse(sse / (3 * n) as f64)))
        .collect();
    let moved: Vec<f64> = moving_per_clip.iter().flatten().copied().collect();
    let ls = lpips.frame_distances(pred, truth, (h, w), device)?;
    let per_frame = |v: &[f64]| -> Vec<f64> {
        (0..horizon)
            .map(|k| (0..clips).map(|c| v[c * horizon + k]).sum::<f64>() / clips as f64)
            .collect()
    };
    let per_clip = |v: &[f64]| -> Vec<f64> { v.chunks(horizon).map(mean).collect() };
    Ok(Scores {
        psnr: mean(&ps),
        ssim: mean(&ss),
        lpips: mean(&ls),
        fvd: None,
        psnr_per_frame: per_frame(&ps),
        ssim_per_frame: per_frame(&ss),
        lpips_per_frame: per_frame(&ls),
        psnr_per_clip: per_clip(&ps),
        ssim_per_clip: per_clip(&ss),
        lpips_per_clip: per_clip(&ls),
        psnr_moving: (!moved.is_empty()).then(|| mean(&moved)),
        psnr_moving_per_clip: moving_per_clip,
    })
}

fn run<B: Backend>(a: EvalArgs, device: B::Device) -> Result<EvalReport> {
    let started = Instant::now();
    ensure!(
        a.context >= 1 && a.horizon >= 1,
        "--context and --horizon must be at least 1"
    );
    ensure!(a.clips >= 1, "--clips must be at least 1");
    let want_fvd = !a.no_fvd;
    if want_fvd && a.clips < 2 {
        bail!("FVD compares sets of clips and needs --clips 2 or more (or pass --no-fvd)");
    }
    let (sim, ckpt) = Simulator::<B>::load(&a.ckpt, &device, &a.sampling)?;
    let ds = Dataset::open(&a.data).with_context(|| format!("opening {}", a.data.display()))?;
    let [h, w, c] = ds.header().frame_shape;
    ensure!(
        c == 3,
        "{} has {c}-channel frames; the metrics need RGB",
        ds.dir().display()
    );
    let need = a.context + a.horizon;
    let sampler = ClipSampler::from_dataset(&ds, need)
        .with_context(|| format!("drawing {need}-frame clips from {}", ds.dir().display()))?;
    let available = sampler.num_clips();
    if (a.clips as u64) > available {
        bail!(
            "{} holds {available} distinct {need}-frame clips; --clips {} asks for more",
            ds.dir().display(),
            a.clips
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let mut picks: Vec<(usize, usize)> =
        rand::seq::index::sample(&mut rng, available as usize, a.clips)
            .into_iter()
            .map(|k| sampler.locate(k as u64))
            .collect();
    picks.sort();
    let name = a.name.clone().unwrap_or_else(|| {
        super::world::run_of(&a.ckpt)
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let out = out_dir(&a);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    // Roll out.
    let f = h * w * 3;
    let mut truth = Vec::with_capacity(a.clips * need * f);
    let mut pred = Vec::with_capacity(a.clips * a.horizon * f);
    let with_actions = sim.with_actions();
    let probe_actions = with_actions && a.clips >= 2;
    // Clip k's start with clip k+1's actions (a rotation of the picks).
    let rotated: Vec<(usize, usize)> = (0..a.clips).map(|k| picks[(k + 1) % a.clips]).collect();
    let mut pred_other = Vec::new();
    let bar = crate::progress::bar(
        a.clips as u64 * if probe_actions { 2 } else { 1 },
        "clips predicted",
    );
    for (i, chunk) in picks.chunks(BATCH).enumerate() {
        let clips = sampler.gather(chunk);
        let batch = to_flow_batch::<B>(&clips, &device);
        let ctx = batch.x0.narrow(1, 0, a.context);
        // Both rollouts of a chunk draw the same sampler noise.
        let noise_seed = rng.next_u64();
        let roll = |actions: Option<&dws_models::embedders::ActionBatch<B>>| {
            let mut noise = ChaCha8Rng::seed_from_u64(noise_seed);
            let p = sim.rollout(ctx.clone(), actions, a.horizon, &mut noise);
            tensor_to_frames(p)
        };
        pred.extend(roll(batch.actions.as_ref()));
        truth.extend_from_slice(&clips.frames);
        bar.inc(chunk.len() as u64);
        if probe_actions {
            let other = sampler.gather(&rotated[i * BATCH..i * BATCH + chunk.len()]);
            let other = to_flow_batch::<B>(&other, &device);
            pred_other.extend(roll(other.actions.as_ref()));
            bar.inc(chunk.len() as u64);
        }
    }
    bar.finish_and_clear();
    // Per clip: the truth's predicted part, the reference (last context frame repeated)
    // and the model's whole clip (context + prediction).
    let mut truth_future = Vec::with_capacity(pred.len());
    let mut repeat = Vec::with_capacity(pred.len());
    let mut model_clips = Vec::with_capacity(truth.len());
    let mut repeat_clips = Vec::with_capacity(truth.len());
    let mut lasts = Vec::with_capacity(a.clips * f);
    for k in 0..a.clips {
        let clip = &truth[k * need * f..(k + 1) * need * f];
        let ctx = &clip[..a.context * f];
        let last = &clip[(a.context - 1) * f..a.context * f];
        truth_future.extend_from_slice(&clip[a.context * f..]);
        lasts.extend_from_slice(last);
        model_clips.extend_from_slice(ctx);
        model_clips.extend_from_slice(&pred[k * a.horizon * f..(k + 1) * a.horizon * f]);
        repeat_clips.extend_from_slice(ctx);
        for _ in 0..a.horizon {
            repeat.extend_from_slice(last);
            repeat_clips.extend_from_slice(last);
        }
    }

    println!("scoring {} clips: PSNR, SSIM, LPIPS", a.clips);
    let lpips = Lpips::<B>::from_asset(&device)?;
    let dims = (a.clips, a.horizon, h, w);
    let mut model = frame_scores(&lpips, &pred, &truth_future, &lasts, dims, &device)?;
    let mut reference = frame_scores(&lpips, &repeat, &truth_future, &lasts, dims, &device)?;
    let other_actions = if probe_actions {
        Some(frame_scores(
            &lpips,
            &pred_other,
            &truth_future,
            &lasts,
            dims,
            &device,
        )?)
    } else {
        None
    };
    drop(lpips);

    let mut fvd_note = None;
    if !want_fvd {
        fvd_note = Some("skipped (--no-fvd)".to_string());
    } else if need < MIN_FRAMES {
        fvd_note = Some(format!(
            "clips of {need} frames are shorter than the {MIN_FRAMES} the I3D network needs"
        ));
    } else {
        println!(
            "FVD: I3D features of {} clips × 3 sets (truth, model, reference)",
            a.clips
        );
        let net = I3d::<B>::from_asset(&device)?;
        let bar = crate::progress::bar(3 * a.clips as u64, "clips through I3D");
        let mut feats = Vec::new();
        for (set, data) in [
            ("truth", &truth),
            ("model", &model_clips),
            ("reference", &repeat_clips),
        ] {
            let clips = split_clips(data, need, h, w)?;
            feats.push(i3d_features(&net, set, &clips, &device, |n| {
                bar.inc(n as u64)
            })?);
        }
        bar.finish_and_clear();
        let (ft, fm, fr) = (&feats[0], &feats[1], &feats[2]);
        model.fvd = Some(frechet_distance(fm, ft, FEATURES)?);
        reference.fvd = Some(frechet_distance(fr, ft, FEATURES)?);
    }

    let report = EvalReport {
        name,
        ckpt,
        data: a.data.clone(),
        context: a.context,
        horizon: a.horizon,
        clips: a.clips,
        seed: a.seed,
        sample_steps: sim.sample_steps(),
        backbone: sim.backbone().into(),
        sampling: sim.describe_sampling(),
        with_actions,
        picks,
        model,
        repeat_last: reference,
        other_actions,
        fvd_note,
        seconds: started.elapsed().as_secs_f64(),
    };
    super::predict::write_json(&out.join("metrics.json"), &report)?;
    let per_frame = |s: &Scores, metric: &str| -> Vec<f64> {
        match metric {
            "psnr" => s.psnr_per_frame.clone(),
            "ssim" => s.ssim_per_frame.clone(),
            _ => s.lpips_per_frame.clone(),
        }
    };
    for metric in ["psnr", "ssim", "lpips"] {
        let lines: Vec<(Vec<f64>, [u8; 3])> = [
            Some((per_frame(&report.repeat_last, metric), [150, 150, 150])),
            report
                .other_actions
                .as_ref()
                .map(|o| (per_frame(o, metric), [255, 127, 14])),
            Some((per_frame(&report.model, metric), [31, 119, 180])),
        ]
        .into_iter()
        .flatten()
        .collect();
        let series: Vec<Series<'_>> = lines
            .iter()
            .map(|(values, rgb)| Series { values, rgb: *rgb })
            .collect();
        write_line_plot(&out.join(format!("{metric}.png")), &series, a.context)?;
    }
    let gif_dir = out.join("gifs");
    std::fs::create_dir_all(&gif_dir)?;
    let shown = a.gifs.min(a.clips);
    for k in 0..shown {
        let pair = Pair {
            truth: &truth_future[k * a.horizon * f..(k + 1) * a.horizon * f],
            pred: &pred[k * a.horizon * f..(k + 1) * a.horizon * f],
        };
        crate::report::write_side_by_side_gif(
            &gif_dir.join(format!("clip{k:03}.gif")),
            &[pair],
            h,
            w,
            3,
        )?;
    }
    let html = out.join("report.html");
    std::fs::write(&html, crate::report::eval_html(&report, shown))
        .with_context(|| format!("writing {}", html.display()))?;

    let fmt_fvd = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    println!(
        "{:<22} {:>8} {:>7} {:>7} {:>9} {:>11}",
        "", "PSNR dB", "SSIM", "LPIPS", "FVD", "moving PSNR"
    );
    let mut rows = vec![(report.name.as_str(), &report.model)];
    if let Some(o) = &report.other_actions {
        rows.push(("  other clips' actions", o));
    }
    rows.push(("repeat last frame", &report.repeat_last));
    for (label, s) in rows {
        println!(
            "{:<22} {:>8.2} {:>7.4} {:>7.4} {:>9} {:>11}",
            label,
            s.psnr,
            s.ssim,
            s.lpips,
            fmt_fvd(s.fvd),
            fmt_db(s.psnr_moving)
        );
    }
    if let Some(n) = &report.fvd_note {
        println!("FVD: {n}");
    }
    println!(
        "evaluated {} clips ({} context → {} predicted frames) in {:.0} s; report {}",
        report.clips,
        report.context,
        report.horizon,
        report.seconds,
        html.display()
    );
    Ok(report)
}

/// Reads `metrics.json` from an eval directory, a run (its `eval/`), or the file itself.
pub fn read_report(path: &Path) -> Result<EvalReport> {
    let candidates = [
        path.to_path_buf(),
        path.join("metrics.json"),
        path.join("eval").join("metrics.json"),
    ];
    let file = candidates.iter().find(|p| p.is_file()).with_context(|| {
        format!(
            "{} holds no eval (metrics.json); run `dws eval` first",
            path.display()
        )
    })?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a dws eval report", file.display()))
}

#[derive(clap::Args, Clone, Debug)]
pub struct CompareArgs {
    /// Eval directories, runs (their `eval/`), or metrics.json files; or `dws offline`
    /// runs (the paper's Table 2: returns with and without world-model data); or
    /// `dws ppo` / `dws mbrl` runs (returns grouped over seeds, `dws score` results and
    /// learning curves, plotted next to --out as PNG).
    #[arg(required = true)]
    pub evals: Vec<PathBuf>,
    /// Where the table is written (Markdown).
    #[arg(long, default_value = "compare.md")]
    pub out: PathBuf,
}

/// All of `found` when every path was of the kind (`Some`), none when no path was; an
/// error naming a path of the other kind when they mix.
fn all_of_a_kind<T>(paths: &[PathBuf], found: Vec<Option<T>>, not: &str) -> Result<Option<Vec<T>>> {
    let Some(first) = found.iter().position(Option::is_some) else {
        return Ok(None);
    };
    if let Some(i) = found.iter().position(Option::is_none) {
        anyhow::bail!(
            "{} is not {not}, unlike {}: compare like with like (evals, offline runs or agent runs)",
            paths[i].display(),
            paths[first].display()
        );
    }
    Ok(Some(found.into_iter().flatten().collect()))
}

/// `dws compare`: one row per eval, printed and written as a Markdown table.
pub fn compare(a: CompareArgs) -> Result<String> {
    let offline = a
        .evals
        .iter()
        .map(|p| super::offline::read_summary(p))
        .collect();
    let offline_kind = "a finished dws offline run (no summary.json)";
    if let Some(runs) = all_of_a_kind(&a.evals, offline, offline_kind)? {
        return write_table(&a.out, super::offline::table(&runs));
    }
    let agents = a
        .evals
        .iter()
        .map(|p| super::score::read_agent(p))
        .collect::<Result<Vec<_>>>()?;
    if let Some(runs) = all_of_a_kind(&a.evals, agents, "a dws ppo or dws mbrl run")? {
        let t = super::score::agents_table(&runs, &a.out.with_extension("png"))?;
        return write_table(&a.out, t);
    }
    let reports = a
        .evals
        .iter()
        .map(|p| read_report(p))
        .collect::<Result<Vec<_>>>()?;
    let first = &reports[0];
    let mut warn = Vec::new();
    for r in &reports[1..] {
        if (r.data.as_path(), r.context, r.horizon, r.clips, r.seed)
            != (
                first.data.as_path(),
                first.context,
                first.horizon,
                first.clips,
                first.seed,
            )
        {
            warn.push(format!(
                "`{}` was scored on other clips ({} {}+{} ×{} seed {}) than `{}`: compare with care",
                r.name,
                r.data.display(),
                r.context,
                r.horizon,
                r.clips,
                r.seed,
                first.name
            ));
        }
    }
    let fmt_fvd = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let mut t = String::from("| model | actions | PSNR ↑ | SSIM ↑ | LPIPS ↓ | FVD ↓ | moving PSNR ↑ | PSNR drop with other actions | clips |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in &reports {
        t += &format!(
            "| {} | {} | {:.2} | {:.4} | {:.4} | {} | {} | {} | {} |\n",
            r.name,
            if r.with_actions { "yes" } else { "no" },
            r.model.psnr,
            r.model.ssim,
            r.model.lpips,
            fmt_fvd(r.model.fvd),
            fmt_db(r.model.psnr_moving),
            r.other_actions.as_ref().map_or("-".to_string(), |o| {
                let moving = match (r.model.psnr_moving, o.psnr_moving) {
                    (Some(m), Some(o)) => format!(" (moving pixels {:.2} dB)", m - o),
                    _ => String::new(),
                };
                format!("{:.2} dB{moving}", r.model.psnr - o.psnr)
            }),
            r.clips
        );
    }
    t += &format!(
        "| repeat last frame | - | {:.2} | {:.4} | {:.4} | {} | {} | - | {} |\n",
        first.repeat_last.psnr,
        first.repeat_last.ssim,
        first.repeat_last.lpips,
        fmt_fvd(first.repeat_last.fvd),
        fmt_db(first.repeat_last.psnr_moving),
        first.clips
    );
    t += &paired(&reports);
    for w in &warn {
        t += &format!("\n{w}\n");
    }
    write_table(&a.out, t)
}

/// A PSNR in dB with two decimals, or `-`.
pub fn fmt_db(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.2}"))
}

/// Mean and half-width of the 95% confidence interval of the mean of `d` (Student's t).
fn mean_ci95(d: &[f64]) -> (f64, f64) {
    let n = d.len() as f64;
    let m = mean(d);
    if d.len() < 2 {
        return (m, f64::NAN);
    }
    let var = d.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0);
    (m, t975(d.len() - 1) * (var / n).sqrt())
}

/// The 97.5% quantile of Student's t with `df` degrees of freedom: exact values up to
/// 10, then the Cornish-Fisher expansion around the normal quantile (error under 0.002).
fn t975(df: usize) -> f64 {
    const SMALL: [f64; 10] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    ];
    if (1..=10).contains(&df) {
        return SMALL[df - 1];
    }
    let (z, v) = (1.959_964f64, df as f64);
    z + (z.powi(3) + z) / (4.0 * v)
        + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * v * v)
        + (3.0 * z.powi(7) + 19.0 * z.powi(5) + 17.0 * z.powi(3) - 15.0 * z) / (384.0 * v.powi(3))
}

/// Per-clip differences of every model after the first against the first, for reports
/// scored on the same clips (same data, picks, context and horizon): mean difference with
/// its 95% confidence interval, and on how many clips the model did better. Empty when
/// no pair qualifies.
fn paired(reports: &[EvalReport]) -> String {
    let first = &reports[0];
    let same = |r: &EvalReport| {
        (r.data.as_path(), r.context, r.horizon, &r.picks)
            == (
                first.data.as_path(),
                first.context,
                first.horizon,
                &first.picks,
            )
            && r.model.psnr_per_clip.len() == r.picks.len()
            && first.model.psnr_per_clip.len() == first.picks.len()
    };
    let rows: Vec<&EvalReport> = reports[1..].iter().filter(|r| same(r)).collect();
    if rows.is_empty() {
        return String::new();
    }
    let cell = |a: &[f64], b: &[f64], higher_better: bool, digits: usize| {
        let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
        let (m, h) = mean_ci95(&d);
        let wins = d
            .iter()
            .filter(|&&x| if higher_better { x > 0.0 } else { x < 0.0 })
            .count();
        format!(
            "{m:+.digits$} ± {h:.digits$} (better on {wins}/{})",
            d.len()
        )
    };
    let mut t = format!(
        "\nPer-clip differences against `{}` (mean ± 95% confidence interval over the same clips):\n\n\
         | model | Δ PSNR dB | Δ SSIM | Δ LPIPS | Δ moving PSNR dB |\n|---|---|---|---|---|\n",
        first.name
    );
    for r in rows {
        let (a, b) = (&r.model, &first.model);
        // Clips where something moved (the same for both: the mask is the truth's).
        let (ma, mb): (Vec<f64>, Vec<f64>) = a
            .psnr_moving_per_clip
            .iter()
            .zip(&b.psnr_moving_per_clip)
            .filter_map(|(x, y)| Some(((*x)?, (*y)?)))
            .unzip();
        t += &format!(
            "| {} | {} | {} | {} | {} |\n",
            r.name,
            cell(&a.psnr_per_clip, &b.psnr_per_clip, true, 2),
            cell(&a.ssim_per_clip, &b.ssim_per_clip, true, 4),
            cell(&a.lpips_per_clip, &b.lpips_per_clip, false, 4),
            if ma.is_empty() {
                "-".to_string()
            } else {
                cell(&ma, &mb, true, 2)
            },
        );
    }
    t
}

/// Prints a Markdown table and writes it to `out`.
fn write_table(out: &Path, t: String) -> Result<String> {
    print!("{t}");
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, &t).with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_quantiles_and_confidence_intervals() {
        // Student's t 97.5% quantiles (tables): df 11, 31, 100, 1000.
        for (df, want) in [(11, 2.201), (31, 2.0395), (100, 1.984), (1000, 1.9623)] {
            assert!((t975(df) - want).abs() < 2e-3, "df {df}: {}", t975(df));
        }
        assert_eq!(t975(3), 3.182);
        // Mean 2, sample variance 2/3, n 4: half-width t(3) · sd / 2.
        let (m, h) = mean_ci95(&[1.0, 2.0, 3.0, 2.0]);
        assert!((m - 2.0).abs() < 1e-12);
        let sd = (2.0f64 / 3.0).sqrt();
        assert!((h - 3.182 * sd / 2.0).abs() < 1e-9, "{h}");
        assert!(mean_ci95(&[1.0]).1.is_nan());
    }
}
