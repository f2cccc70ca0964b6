//! An offline-RL training run in a run directory: the loop behind `dws offline`.
//!
//! Gradient steps on batches drawn from a [`Mixture`] of real and imagined transitions;
//! every `log_every` steps a line of mean losses goes to `metrics.jsonl`, every
//! `eval_every` steps (and at the last) the policy is evaluated by a caller-given
//! function (episodes in the real env) and a checkpoint is written (networks, optimiser
//! states, the batch sampler's random stream). A resumed run continues at its newest
//! checkpoint and draws the same batches an uninterrupted run would.

use super::{Learner, Mixture};
use crate::{Result, RlError};
use burn::tensor::backend::AutodiffBackend;
use dws_models::checkpoint::{self, TrainState};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// Mean return of the policy on training and unseen levels.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Evaluation {
    pub train_return: f32,
    pub train_std: f32,
    /// Absent where the env has no separate test levels.
    pub test_return: Option<f32>,
    pub test_std: Option<f32>,
    /// Episodes per level set.
    pub episodes: usize,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OfflineLog {
    /// Gradient steps done.
    pub step: usize,
    /// Mean of each loss or statistic over the steps since the last line.
    pub stats: BTreeMap<String, f32>,
    pub steps_per_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<Evaluation>,
}

/// How a run is driven.
pub struct OfflineOptions<'a, B: AutodiffBackend> {
    pub total_steps: usize,
    pub seed: u64,
    pub resume: bool,
    /// Steps between metrics lines, and between evaluations (each with a checkpoint;
    /// 0: only at the end).
    pub log_every: usize,
    pub eval_every: usize,
    pub keep_last: usize,
    /// Stop after this many steps in this call (tests of resume).
    pub stop_after: Option<usize>,
    /// Evaluates the policy (called at evaluation steps).
    pub evaluate: &'a mut dyn FnMut(&dyn Learner<B>) -> Result<Evaluation>,
    /// Called with every metrics line.
    pub on_log: &'a mut dyn FnMut(&OfflineLog),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RlError + '_ {
    move |e| RlError::Io(format!("{}: {e}", path.display()))
}

/// Trains `learner` on `data` into `run`; returns the lines logged in this call.
pub fn train<B: AutodiffBackend>(
    run: &Path,
    learner: &mut dyn Learner<B>,
    data: &Mixture,
    batch: usize,
    opts: OfflineOptions<'_, B>,
) -> Result<Vec<OfflineLog>> {
    fs::create_dir_all(run).map_err(io(run))?;
    let metrics = run.join("metrics.jsonl");
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut start = 0;
    match (opts.resume, checkpoint::latest(run)) {
        (true, Some(ckpt)) => {
            learner.load(&ckpt)?;
            let state = checkpoint::read_state(&ckpt).map_err(crate::run::model_err)?;
            rng = ChaCha8Rng::seed_from_u64(state.rng_seed);
            rng.set_word_pos(state.rng_word_pos);
            start = state.step;
            dws_models::train::truncate_log::<OfflineLog>(&metrics, |l| l.step <= start)
                .map_err(io(&metrics))?;
        }
        _ => {
            let _ = fs::remove_dir_all(checkpoint::checkpoints_dir(run));
            if metrics.exists() {
                fs::remove_file(&metrics).map_err(io(&metrics))?;
            }
        }
    }
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics)
        .map_err(io(&metrics))?;
    let end = match opts.stop_after {
        Some(n) => (start + n).min(opts.total_steps),
        None => opts.total_steps,
    };
    let log_every = opts.log_every.max(1);
    let mut sums: BTreeMap<&'static str, (f64, usize)> = BTreeMap::new();
    let mut since = Instant::now();
    let mut since_step = start;
    let mut logs = Vec::new();
    for step in start..end {
        let b = data.sample(batch, &mut rng);
        let stats = learner.train_step(&b);
        for (name, v) in stats {
            if !v.is_finite() {
                return Err(RlError::Config(format!(
                    "{} became {v} at step {}; lower the learning rate",
                    name,
                    step + 1
                )));
            }
            let e = sums.entry(name).or_insert((0.0, 0));
            e.0 += v as f64;
            e.1 += 1;
        }
        let done = step + 1;
        let eval_now = done == opts.total_steps
            || (opts.eval_every > 0 && done.is_multiple_of(opts.eval_every));
        if !(done.is_multiple_of(log_every) || eval_now || done == end) {
            continue;
        }
        let steps_per_s = (done - since_step) as f64 / since.elapsed().as_secs_f64().max(1e-9);
        let eval = if eval_now {
            Some((opts.evaluate)(learner)?)
        } else {
            None
        };
        let line = OfflineLog {
            step: done,
            stats: sums
                .iter()
                .map(|(k, (s, n))| (k.to_string(), (*s / *n as f64) as f32))
                .collect(),
            steps_per_s,
            eval,
        };
        sums.clear();
        writeln!(log, "{}", serde_json::to_string(&line).expect("serialises"))
            .map_err(io(&metrics))?;
        (opts.on_log)(&line);
        logs.push(line);
        if eval_now || done == end {
            let state = TrainState {
                step: done,
                rng_seed: opts.seed,
                rng_word_pos: rng.get_word_pos(),
                last_loss: 0.0,
            };
            learner.save(run, &state, opts.keep_last)?;
        }
        since = Instant::now();
        since_step = done;
    }
    Ok(logs)
}
