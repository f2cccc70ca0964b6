//! `dws predict`: rolls a checkpoint out on dataset episodes from their first frames and
//! actions, and compares the prediction with what happened.
//!
//! With `--actions-from J` the model is given episode J's actions from episode I's start.
//! What those actions really do is found by replaying them in the environment from I's
//! recorded reset seed (after checking that replaying I's own actions reproduces I's
//! frames), so the counterfactual prediction is scored against a real ground truth.
//!
//! Writes a GIF (a row per episode: ground truth | prediction | difference), a PNG
//! filmstrip of the same, and a JSON report with per-frame errors of the model and of
//! the repeat-the-last-context-frame reference.

use super::ar::{SamplingArgs, Simulator};
use super::eval::{fmt_db, MOVING_THRESHOLD};
use crate::device::{dispatch, DeviceArg, Job};
use crate::report::Pair;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use dws_data::{Actions, Dataset};
use dws_envs::{Action, EnvConfig};
use dws_metrics::image::{masked_sse, moved, psnr_from_mse, to_unit, Frame};
use dws_models::embedders::ActionBatch;
use dws_models::flow::{frames_to_tensor, tensor_to_frames};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Episodes rolled out together.
const BATCH: usize = 16;
/// Episodes drawn in the GIF and filmstrip.
const SHOWN: usize = 6;

#[derive(clap::Args, Clone, Debug)]
pub struct PredictArgs {
    /// A run directory or checkpoint.
    #[arg(long)]
    pub ckpt: PathBuf,
    /// Dataset to take the episodes (start frames and actions) from; use episodes the
    /// model was not trained on.
    #[arg(long)]
    pub data: PathBuf,
    /// First episode.
    #[arg(long, default_value_t = 0)]
    pub episode: usize,
    /// Number of episodes, from `--episode` on (errors are averaged over them).
    #[arg(long, default_value_t = 1)]
    pub episodes: usize,
    /// Give the model this episode's actions instead (same start, other actions); the
    /// ground truth is found by replaying them in the environment.
    #[arg(long)]
    pub actions_from: Option<usize>,
    /// Context frames given to the model.
    #[arg(long, default_value_t = 1)]
    pub context: usize,
    /// Frames to predict.
    #[arg(long, default_value_t = 15)]
    pub horizon: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Output GIF (ground truth | prediction | difference); a PNG filmstrip and a JSON
    /// report are written beside it.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
}

/// Errors of one rollout against its ground truth.
#[derive(Debug, Clone, Serialize)]
pub struct Errors {
    pub mse_per_frame: Vec<f64>,
    pub psnr_per_frame: Vec<f64>,
    pub mean_mse: f64,
    pub mean_psnr: f64,
    /// PSNR over the pixels that moved (see `dws eval`'s moving PSNR), pooled over the
    /// frames: those where the truth differs from the last context frame (with other
    /// actions, where either the replayed or the recorded truth does, so the model's two
    /// scores are on the same pixels). `None` where nothing moved, or for non-RGB frames.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moving_psnr: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EpisodeReport {
    pub episode: usize,
    pub actions_from: usize,
    /// "recorded" or "replayed" (the actions' effect found in the environment).
    pub truth: &'static str,
    pub model: Errors,
    /// Repeating the last context frame.
    pub repeat_last: Errors,
    /// With other actions: the prediction against the episode as recorded (its own
    /// actions). A model that follows the actions it is given is closer to the replayed
    /// truth than to this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_vs_recorded: Option<Errors>,
}

/// What `dws predict` measured (also written as JSON beside the GIF).
#[derive(Debug, Clone, Serialize)]
pub struct PredictReport {
    pub ckpt: PathBuf,
    pub data: PathBuf,
    pub context: usize,
    pub horizon: usize,
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
    pub episodes: Vec<EpisodeReport>,
    /// Means over episodes of the per-episode means.
    pub mean_mse: f64,
    pub mean_psnr: f64,
    pub reference_mean_mse: f64,
    pub reference_mean_psnr: f64,
}

/// Per-frame MSE (values in [0, 1]) and PSNR of `pred` against `truth`, both `[T, ...]`.
pub fn errors(pred: &[u8], truth: &[u8], frame_len: usize) -> Errors {
    let mse: Vec<f64> = pred
        .chunks(frame_len)
        .zip(truth.chunks(frame_len))
        .map(|(p, t)| {
            p.iter()
                .zip(t)
                .map(|(a, b)| {
                    let d = (*a as f64 - *b as f64) / 255.0;
                    d * d
                })
                .sum::<f64>()
                / frame_len as f64
        })
        .collect();
    let psnr: Vec<f64> = mse
        .iter()
        .map(|&m| dws_metrics::image::psnr_from_mse(m))
        .collect();
    Errors {
        mean_mse: mean(&mse),
        mean_psnr: mean(&psnr),
        mse_per_frame: mse,
        psnr_per_frame: psnr,
        moving_psnr: None,
    }
}

/// The pixels of each future frame (`[T, H, W]`) where any of `truths` (each
/// `[T, H, W, 3]`) moved from `last` by more than the eval's threshold.
fn moved_pixels(truths: &[&[u8]], last: &[u8], (h, w): (usize, usize)) -> Result<Vec<bool>> {
    let f = h * w * 3;
    let before = to_unit(last);
    let before = Frame::new(&before, h, w)?;
    let frames = truths[0].len() / f;
    let mut mask = vec![false; frames * h * w];
    for truth in truths {
        for (k, frame) in truth.chunks_exact(f).enumerate() {
            let frame = to_unit(frame);
            let m = moved(&Frame::new(&frame, h, w)?, &before, MOVING_THRESHOLD)?;
            for (out, m) in mask[k * h * w..(k + 1) * h * w].iter_mut().zip(m) {
                *out |= m;
            }
        }
    }
    Ok(mask)
}

/// `errors` with the PSNR over the pixels `mask` marks (from [`moved_pixels`]).
fn errors_moving(
    pred: &[u8],
    truth: &[u8],
    mask: &[bool],
    (h, w): (usize, usize),
) -> Result<Errors> {
    let f = h * w * 3;
    let mut e = errors(pred, truth, f);
    let (mut sse, mut n) = (0.0, 0);
    for (k, (p, t)) in pred.chunks_exact(f).zip(truth.chunks_exact(f)).enumerate() {
        let (p, t) = (to_unit(p), to_unit(t));
        let (s, c) = masked_sse(
            &Frame::new(&p, h, w)?,
            &Frame::new(&t, h, w)?,
            &mask[k * h * w..(k + 1) * h * w],
        )?;
        sse += s;
        n += c;
    }
    e.moving_psnr = (n > 0).then(|| psnr_from_mse(sse / (3 * n) as f64));
    Ok(e)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn to_env_actions(actions: &Actions, n: usize) -> Vec<Action> {
    match actions {
        Actions::Discrete(ids) => ids[..n].iter().map(|&a| Action::Discrete(a)).collect(),
        Actions::Continuous { dim, data } => data[..n * dim]
            .chunks(*dim)
            .map(|c| Action::Continuous(c.to_vec()))
            .collect(),
    }
}

/// Frames `[n + 1, H, W, 3]` from resetting the dataset's env with `seed` and taking
/// `actions`; `None` when the episode ends before the last action.
fn simulate(config: &EnvConfig, seed: u64, actions: &[Action]) -> Result<Option<Vec<u8>>> {
    let mut env = dws_envs::make(config)?;
    env.reset(Some(seed))?;
    let mut frames = env.obs().to_vec();
    for (i, a) in actions.iter().enumerate() {
        let step = env.step(a)?;
        frames.extend_from_slice(env.obs());
        if step.done() && i + 1 < actions.len() {
            return Ok(None);
        }
    }
    Ok(Some(frames))
}

/// What `actions` do from the start of `episode`, found by replaying them in the
/// environment: frames `[n + 1, H, W, 3]`.
fn replay(
    ds: &Dataset,
    episode: usize,
    recorded: &[u8],
    own: &Actions,
    actions: &[Action],
) -> Result<Vec<u8>> {
    let header = ds.header();
    let entry = &ds.manifest().episodes[episode];
    let Some(seed) = entry.seed else {
        bail!(
            "episode {episode} of {} has no recorded reset seed, so what other actions would \
             have done from its start cannot be replayed",
            ds.dir().display()
        );
    };
    let config: EnvConfig = serde_json::from_value(header.env_config.clone())
        .with_context(|| format!("reading the env config of {}", ds.dir().display()))?;
    // The env must be deterministic for the replay to mean anything: its own actions
    // must give back the recorded frames.
    let own_actions = to_env_actions(own, actions.len());
    let same = simulate(&config, seed, &own_actions)?;
    if same.as_deref() != Some(recorded) {
        bail!(
            "replaying episode {episode}'s own actions in {} does not reproduce its frames \
             (the env is not deterministic from its seed, or was collected by another \
             version), so other actions cannot be replayed from its start",
            header.env_id
        );
    }
    simulate(&config, seed, actions)?.with_context(|| {
        format!(
            "episode {episode} ends before its {} replayed actions do",
            actions.len()
        )
    })
}

struct Rollout {
    episode: usize,
    actions_from: usize,
    /// Frames `0..context + horizon` (ground truth).
    truth: Vec<u8>,
    /// The episode's own frames when `truth` was replayed with other actions.
    recorded: Option<Vec<u8>>,
    actions: Actions,
}

fn action_batch<B: Backend>(eps: &[Rollout], n: usize, device: &B::Device) -> ActionBatch<B> {
    let b = eps.len();
    match &eps[0].actions {
        Actions::Discrete(_) => {
            let ids: Vec<i64> = eps
                .iter()
                .flat_map(|r| match &r.actions {
                    Actions::Discrete(v) => v[..n].iter().map(|&a| a as i64).collect::<Vec<_>>(),
                    Actions::Continuous { .. } => unreachable!("one dataset, one action space"),
                })
                .collect();
            ActionBatch::Discrete(Tensor::from_data(TensorData::new(ids, [b, n]), device))
        }
        Actions::Continuous { dim, .. } => {
            let dim = *dim;
            let data: Vec<f32> = eps
                .iter()
                .flat_map(|r| match &r.actions {
                    Actions::Continuous { data, .. } => data[..n * dim].to_vec(),
                    Actions::Discrete(_) => unreachable!("one dataset, one action space"),
                })
                .collect();
            ActionBatch::Continuous(Tensor::from_data(
                TensorData::new(data, [b, n, dim]),
                device,
            ))
        }
    }
}

struct PredictJob(PredictArgs);

impl Job for PredictJob {
    type Out = PredictReport;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<PredictReport> {
        run::<B::InnerBackend>(self.0, device)
    }
}

fn run<B: Backend>(a: PredictArgs, device: B::Device) -> Result<PredictReport> {
    let (sim, ckpt) = Simulator::<B>::load(&a.ckpt, &device, &a.sampling)?;
    if a.context == 0 || a.horizon == 0 || a.episodes == 0 {
        bail!("--context, --horizon and --episodes must be at least 1");
    }
    if a.actions_from.is_some() && a.episodes != 1 {
        bail!("--actions-from compares one start under other actions: use it with --episodes 1");
    }
    let ds = Dataset::open(&a.data)?;
    if a.episode + a.episodes > ds.len() {
        bail!(
            "{} has {} episodes; --episode {} --episodes {} asks for more",
            ds.dir().display(),
            ds.len(),
            a.episode,
            a.episodes
        );
    }
    let [h, w, c] = ds.header().frame_shape;
    let f = h * w * c;
    let need = a.context + a.horizon;
    let n_actions = need - 1;
    let mut eps = Vec::new();
    for i in a.episode..a.episode + a.episodes {
        let ep = ds.read_episode(i)?;
        if ep.num_frames() < need {
            bail!(
                "episode {i} of {} has {} frames; --context {} --horizon {} needs {need}",
                ds.dir().display(),
                ep.num_frames(),
                a.context,
                a.horizon
            );
        }
        let recorded = ep.frames[..need * f].to_vec();
        let (actions_from, actions, truth, replayed) = match a.actions_from {
            Some(j) if j != i => {
                if j >= ds.len() {
                    bail!(
                        "--actions-from {j}: {} has {} episodes",
                        ds.dir().display(),
                        ds.len()
                    );
                }
                let other = ds.read_episode(j)?;
                if other.steps() < n_actions {
                    bail!(
                        "episode {j} has {} actions; {n_actions} are needed",
                        other.steps()
                    );
                }
                let truth = replay(
                    &ds,
                    i,
                    &recorded,
                    &ep.actions,
                    &to_env_actions(&other.actions, n_actions),
                )?;
                (j, other.actions, truth, Some(recorded))
            }
            _ => (i, ep.actions.clone(), recorded, None),
        };
        eps.push(Rollout {
            episode: i,
            actions_from,
            truth,
            recorded: replayed,
            actions,
        });
    }

    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let bar = crate::progress::bar(eps.len() as u64, "episodes");
    let mut preds: Vec<Vec<u8>> = Vec::with_capacity(eps.len());
    for chunk in eps.chunks(BATCH) {
        let b = chunk.len();
        let ctx: Vec<u8> = chunk
            .iter()
            .flat_map(|r| r.truth[..a.context * f].iter().copied())
            .collect();
        let ctx = frames_to_tensor::<B>(&ctx, [b, a.context, h, w, c], &device);
        let actions = action_batch::<B>(chunk, n_actions, &device);
        let pred = sim.rollout(ctx, Some(&actions), a.horizon, &mut rng);
        let pred = tensor_to_frames(pred);
        preds.extend(pred.chunks(a.horizon * f).map(|p| p.to_vec()));
        bar.inc(b as u64);
    }
    bar.finish_and_clear();

    let mut reports = Vec::with_capacity(eps.len());
    for (r, pred) in eps.iter().zip(&preds) {
        let truth = &r.truth[a.context * f..];
        let last = &r.truth[(a.context - 1) * f..a.context * f];
        let copy: Vec<u8> = (0..a.horizon).flat_map(|_| last.iter().copied()).collect();
        let recorded = r.recorded.as_ref().map(|rec| &rec[a.context * f..]);
        // The moving-pixel PSNR needs RGB frames.
        let mask = if c == 3 {
            let truths: Vec<&[u8]> = std::iter::once(truth).chain(recorded).collect();
            Some(moved_pixels(&truths, last, (h, w))?)
        } else {
            None
        };
        let score = |p: &[u8], t: &[u8]| match &mask {
            Some(m) => errors_moving(p, t, m, (h, w)),
            None => Ok(errors(p, t, f)),
        };
        reports.push(EpisodeReport {
            episode: r.episode,
            actions_from: r.actions_from,
            truth: if recorded.is_some() {
                "replayed"
            } else {
                "recorded"
            },
            model: score(pred, truth)?,
            repeat_last: score(&copy, truth)?,
            model_vs_recorded: recorded.map(|rec| score(pred, rec)).transpose()?,
        });
    }
    let shown: Vec<Pair<'_>> = eps
        .iter()
        .zip(&preds)
        .take(SHOWN)
        .map(|(r, p)| Pair {
            truth: &r.truth[a.context * f..],
            pred: p,
        })
        .collect();
    crate::report::write_side_by_side_gif(&a.out, &shown, h, w, c)?;
    let strip = a.out.with_extension("png");
    crate::report::write_filmstrip_png(&strip, &shown, h, w, c)?;

    let avg = |g: &dyn Fn(&EpisodeReport) -> f64| mean(&reports.iter().map(g).collect::<Vec<_>>());
    let report = PredictReport {
        ckpt: ckpt.clone(),
        data: a.data.clone(),
        context: a.context,
        horizon: a.horizon,
        sample_steps: sim.sample_steps(),
        backbone: sim.backbone().into(),
        sampling: sim.describe_sampling(),
        with_actions: sim.with_actions(),
        mean_mse: avg(&|r| r.model.mean_mse),
        mean_psnr: avg(&|r| r.model.mean_psnr),
        reference_mean_mse: avg(&|r| r.repeat_last.mean_mse),
        reference_mean_psnr: avg(&|r| r.repeat_last.mean_psnr),
        episodes: reports,
    };
    let json = a.out.with_extension("json");
    write_json(&json, &report)?;

    for r in &report.episodes {
        println!(
            "episode {:>4}{}: MSE {:.5}  PSNR {:6.2} dB, moving pixels {} dB   (repeat last frame: MSE {:.5}, PSNR {:6.2} dB, moving pixels {} dB)",
            r.episode,
            if r.actions_from != r.episode {
                format!(" with the actions of episode {} (truth replayed)", r.actions_from)
            } else {
                String::new()
            },
            r.model.mean_mse,
            r.model.mean_psnr,
            fmt_db(r.model.moving_psnr),
            r.repeat_last.mean_mse,
            r.repeat_last.mean_psnr,
            fmt_db(r.repeat_last.moving_psnr)
        );
        if let Some(e) = &r.model_vs_recorded {
            println!(
                "      the same prediction against episode {} as recorded (its own actions): MSE {:.5}  PSNR {:6.2} dB, moving pixels {} dB (the same pixels)",
                r.episode,
                e.mean_mse,
                e.mean_psnr,
                fmt_db(e.moving_psnr)
            );
        }
    }
    println!(
        "predicted {} frames from {} context frame(s) of {} episode(s) with {} ({}, {}): mean MSE {:.5}, mean PSNR {:.2} dB",
        a.horizon,
        a.context,
        report.episodes.len(),
        ckpt.display(),
        if report.with_actions { "with actions" } else { "no actions" },
        report.sampling,
        report.mean_mse,
        report.mean_psnr
    );
    println!(
        "reference (repeat the last context frame): mean MSE {:.5}, mean PSNR {:.2} dB",
        report.reference_mean_mse, report.reference_mean_psnr
    );
    println!(
        "wrote {} (ground truth | prediction | difference, first {} episodes), {} and {}",
        a.out.display(),
        shown.len(),
        strip.display(),
        json.display()
    );
    Ok(report)
}

pub(crate) fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

pub fn predict(args: PredictArgs) -> Result<PredictReport> {
    let device = args.device;
    dispatch(device, PredictJob(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_pixels_are_the_union_over_truths_and_score_only_there() {
        // Two 1×2 frames per truth; pixel 0 moves in truth `a` at frame 0, pixel 1 in
        // truth `b` at frame 1.
        let last = [0u8; 6];
        let a = [200, 0, 0, 0, 0, 0, /* frame 1 */ 0, 0, 0, 0, 0, 0];
        let b = [0, 0, 0, 0, 0, 0, /* frame 1 */ 0, 0, 0, 0, 90, 0];
        let mask = moved_pixels(&[&a, &b], &last, (1, 2)).unwrap();
        assert_eq!(mask, vec![true, false, false, true]);
        // A prediction that is right where `a` moved and wrong by 0.2 on one channel of
        // a still pixel: the moving error pools the 2 marked pixels (6 values).
        let mut pred = a;
        pred[3] = 51;
        let e = errors_moving(&pred, &a, &mask, (1, 2)).unwrap();
        assert_eq!(e.moving_psnr, Some(psnr_from_mse(0.0)));
        let e = errors_moving(&last.repeat(2), &a, &mask, (1, 2)).unwrap();
        let want = psnr_from_mse((200.0f64 / 255.0).powi(2) / 6.0);
        assert!((e.moving_psnr.unwrap() - want).abs() < 1e-5);
        // Nothing moved: no moving score.
        let still = moved_pixels(&[&[0u8; 12]], &last, (1, 2)).unwrap();
        assert_eq!(
            errors_moving(&pred, &a, &still, (1, 2))
                .unwrap()
                .moving_psnr,
            None
        );
    }
}
