//! `dws bench envs`: environment throughput as JSON lines
//! `{"bench": ..., "value": ..., "unit": ...}` (the form every `dws bench` prints).

use anyhow::Result;
use clap::Subcommand;
use dws_envs::{policy::sample_action, Action, EnvConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

#[derive(Subcommand)]
pub enum Command {
    /// Steps per second of each environment family in one thread (random actions,
    /// resets included, frames copied into Rust-owned buffers).
    Envs {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Measure all 16 Procgen games, not only CoinRun.
        #[arg(long)]
        all_procgen: bool,
    },
    /// Milliseconds per world-model training step (fine-tuning with DWS: action module,
    /// text-free table embedder, motion loss) on random clips, at a preset's sizes.
    Train {
        #[arg(long, default_value = "small")]
        preset: String,
        /// flow, or ar: the token transformer of the preset's `[ar]` table over 16×16
        /// tokens of 1,024 codes (the `small` tokenizer's), on random tokens (training
        /// tokenises each frame once, so the tokenizer is not timed).
        #[arg(long, default_value = "flow")]
        backbone: String,
        /// Timed steps (after one warm-up step).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Time only the fused kernels, not burn's operations (for a profiler).
        #[arg(long)]
        fused_only: bool,
        #[arg(long, default_value = "cpu")]
        device: crate::device::DeviceArg,
    },
    /// Clips per second through LPIPS and through FVD's I3D features (random 64×64
    /// clips).
    Metrics {
        #[arg(long, default_value_t = 16)]
        clips: usize,
        #[arg(long, default_value_t = 16)]
        frames: usize,
        #[arg(long, default_value = "cpu")]
        device: crate::device::DeviceArg,
    },
    /// Frames per second of `dws play` as the page sees them: a server on this machine and
    /// `--tabs` WebSocket clients stepping as fast as it answers (model and real env).
    Play {
        /// A fine-tuned run directory or checkpoint.
        #[arg(long)]
        ckpt: std::path::PathBuf,
        /// Numbers of open tabs to measure, one after the other.
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        tabs: Vec<usize>,
        /// Seconds per measurement (after a warm-up step per tab).
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Euler steps per frame (default: the run's config).
        #[arg(long)]
        sample_steps: Option<usize>,
        #[arg(long, default_value = "cpu")]
        device: crate::device::DeviceArg,
    },
    /// burn's operations against dws's fused CPU kernels (GELU, SiLU, sigmoid, exp, erf,
    /// tanh, softmax, layer norm, linear layers, attention) at model shapes, forward and forward+backward; with `--torch FILE`
    /// (the output of `scripts/bench_ops_torch.py`) also the ratios against PyTorch.
    Ops {
        /// Seconds per measurement (the median of the runs that fit, at least 5 runs).
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// JSON lines from the PyTorch peer script, run on this machine.
        #[arg(long)]
        torch: Option<std::path::PathBuf>,
        /// Only the first shape of each operation.
        #[arg(long)]
        quick: bool,
        /// Only the measurements whose name (`<op>/<shape>`, as in the output, e.g.
        /// `gelu/8x256x768` or `attention_causal`) contains this text.
        #[arg(long)]
        only: Option<String>,
        #[arg(long, default_value = "cpu")]
        device: crate::device::DeviceArg,
    },
    /// Milliseconds per transformer training step (forward, backward, AdamW) on random
    /// inputs, with burn's operations and with the fused kernels; with `--torch FILE`
    /// (the output of `scripts/bench_step_torch.py`) also the ratio against PyTorch.
    /// `toy`: 4 pre-norm blocks over 8 × 256 tokens of width 192 (6 heads, GELU MLP);
    /// `dit`: the preset's flow transformer with DWS modules, at its fine-tuning batch.
    Step {
        /// toy or dit.
        #[arg(long, default_value = "toy")]
        model: String,
        /// The preset of the `dit` step.
        #[arg(long, default_value = "small")]
        preset: String,
        /// Timed steps (after two warm-up steps); prints the median.
        #[arg(long, default_value_t = 7)]
        steps: usize,
        /// JSON lines from the PyTorch peer script, run on this machine.
        #[arg(long)]
        torch: Option<std::path::PathBuf>,
        /// Time only the fused kernels, not burn's operations (for a profiler).
        #[arg(long)]
        fused_only: bool,
        #[arg(long, default_value = "cpu")]
        device: crate::device::DeviceArg,
    },
    /// Imagined env steps per second of the imagined VecEnv of `dws mbrl` (world model
    /// and reward model, horizon 16, random start states) with random actions, and with
    /// the small PPO agent choosing them. CoinRun's shape: 64×64 frames, 15 actions.
    ImagineRl {
        /// World-model preset.
        #[arg(long, default_value = "debug")]
        preset: String,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Timed steps per measurement (after one warm-up step).
        #[arg(long, default_value_t = 32)]
        steps: usize,
        #[arg(long, default_value = "cpu")]
        device: crate::device::DeviceArg,
    },
    /// Gradient steps per second of the offline learners (BC, CQL, IQL) on random 64×64
    /// transitions with 15 actions, at the reference network (IMPALA 16/32/32, FC 256).
    Offline {
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Timed steps per learner (after one warm-up step).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, default_value = "cpu")]
        device: crate::device::DeviceArg,
    },
    /// Imagined frames per second: batched autoregressive rollout with the preset's
    /// sampler steps (flow), or token by token with and without the key/value cache
    /// (ar: VQ tokenizer and token transformer of the `small` sizes, random weights).
    Imagine {
        #[arg(long, default_value = "small")]
        preset: String,
        /// flow or ar.
        #[arg(long, default_value = "flow")]
        backbone: String,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Frames imagined per rollout (after 1 context frame).
        #[arg(long, default_value_t = 8)]
        frames: usize,
        #[arg(long, default_value = "cpu")]
        device: crate::device::DeviceArg,
    },
}

/// `bench metrics`: clips of `frames` random 64×64 frames per second through LPIPS
/// (every frame against another clip's) and through FVD's I3D feature extraction
/// (resize to 224 included), and the seconds of a whole FVD of two sets of `clips`.
struct MetricsBench {
    clips: usize,
    frames: usize,
}

impl crate::device::Job for MetricsBench {
    type Out = ();
    fn run<B: burn::tensor::backend::AutodiffBackend>(self, device: B::Device) -> Result<()> {
        use dws_metrics::i3d::{FEATURES, MIN_FRAMES};
        use dws_metrics::video::{i3d_features, split_clips};
        type I<B> = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
        let (n, t) = (self.clips, self.frames);
        anyhow::ensure!(n >= 1, "--clips must be at least 1");
        anyhow::ensure!(t >= MIN_FRAMES, "--frames must be at least {MIN_FRAMES}");
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let a = random_clips(n, t, &mut rng).frames;
        let b = random_clips(n, t, &mut rng).frames;
        let per = t * 64 * 64 * 3;
        let lpips = dws_metrics::lpips::Lpips::<I<B>>::from_asset(&device)?;
        lpips.frame_distances(&a[..per], &b[..per], (64, 64), &device)?; // warm-up
        let started = Instant::now();
        lpips.frame_distances(&a, &b, (64, 64), &device)?;
        emit(
            &format!("metrics/lpips/{t}x64x64/clips_per_s"),
            n as f64 / started.elapsed().as_secs_f64(),
            "clips/s",
        );
        drop(lpips);
        let i3d = dws_metrics::i3d::I3d::<I<B>>::from_asset(&device)?;
        let (ca, cb) = (split_clips(&a, t, 64, 64)?, split_clips(&b, t, 64, 64)?);
        i3d_features(&i3d, "warm-up", &ca[..1], &device, |_| {})?;
        // A whole FVD: features of both sets, then the distance.
        let started = Instant::now();
        let fa = i3d_features(&i3d, "first", &ca, &device, |_| {})?;
        let fb = i3d_features(&i3d, "second", &cb, &device, |_| {})?;
        let features_s = started.elapsed().as_secs_f64();
        if n >= 2 {
            let fvd = dws_metrics::fvd::frechet_distance(&fa, &fb, FEATURES)?;
            tracing::debug!("FVD of two random sets: {fvd}");
        }
        let total_s = started.elapsed().as_secs_f64();
        emit(
            &format!("metrics/fvd_i3d/{t}x64x64/clips_per_s"),
            2.0 * n as f64 / features_s,
            "clips/s",
        );
        emit(
            &format!("metrics/fvd/{n}_clips_per_side/{t}x64x64/seconds"),
            total_s,
            "s",
        );
        Ok(())
    }
}

/// The benches' action embedder: a learned table for 15 discrete actions.
fn bench_embedder(cond_dim: usize) -> dws_models::embedders::EmbedderConfig {
    dws_models::embedders::EmbedderConfig {
        kind: dws_models::embedders::EmbedderKind::Table,
        actions: dws_models::embedders::ActionKind::Discrete {
            n: 15,
            templates: vec![String::new(); 15],
        },
        cond_dim,
    }
}

/// A world model at a preset's sizes with DWS attached (table embedder, 15 actions).
fn bench_world<B: burn::prelude::Backend>(
    preset: &super::world::Preset,
    device: &B::Device,
) -> Result<dws_models::flow::WorldModel<B>> {
    let embedder = bench_embedder(preset.dws.cond_dim);
    Ok(dws_models::flow::WorldModel {
        dit: preset
            .model
            .init::<B>(device)
            .attach_action_modules(preset.dws.cond_dim, device),
        embedder: Some(embedder.init(device)?),
    })
}

/// Random u8 clips with random actions.
fn random_clips(batch: usize, len: usize, rng: &mut ChaCha8Rng) -> dws_data::ClipBatch {
    use rand::Rng;
    dws_data::ClipBatch {
        batch,
        len,
        frame_shape: [64, 64, 3],
        frames: (0..batch * len * 64 * 64 * 3).map(|_| rng.gen()).collect(),
        actions: dws_data::Actions::Discrete(
            (0..batch * (len - 1))
                .map(|_| rng.gen_range(0..15))
                .collect(),
        ),
        rewards: vec![0.0; batch * (len - 1)],
        terminated: vec![0; batch * (len - 1)],
        truncated: vec![0; batch * (len - 1)],
    }
}

/// Runs `measure` with burn's own operations and then with the fused kernels (only the
/// latter with `fused_only`), in the same process; the kernels are on again afterwards,
/// whatever `measure` returned.
pub(super) fn burn_then_fused(
    fused_only: bool,
    mut measure: impl FnMut(bool) -> Result<()>,
) -> Result<()> {
    let passes: &[bool] = if fused_only { &[true] } else { &[false, true] };
    for &fused in passes {
        dws_kernels::set_enabled(fused);
        let done = measure(fused);
        dws_kernels::set_enabled(true);
        done?;
    }
    Ok(())
}

struct TrainBench {
    preset: String,
    steps: usize,
    ar: bool,
    fused_only: bool,
}

impl crate::device::Job for TrainBench {
    type Out = ();
    fn run<B: burn::tensor::backend::AutodiffBackend>(self, device: B::Device) -> Result<()> {
        let mut means = Vec::new();
        burn_then_fused(self.fused_only, |fused| {
            let mean = if self.ar {
                self.time_ar_steps::<B>(&device)?
            } else {
                self.time_steps::<B>(&device)?
            };
            let which = if fused { "fused" } else { "burn_ops" };
            emit(
                &format!("train/{}/{which}/ms_per_step", self.name()),
                mean * 1e3,
                "ms",
            );
            means.push(mean);
            Ok(())
        })?;
        if let [burn, fused] = means[..] {
            emit(
                &format!("train/{}/fused_speedup", self.name()),
                burn / fused,
                "x",
            );
        }
        let preset = super::world::load_preset(&self.preset)?;
        let cfg = &preset.finetune;
        let per_frame = if self.ar {
            AR_TOKENS
        } else {
            preset.model.tokens_per_frame()
        };
        emit(
            &format!("train/{}/tokens_per_step", self.name()),
            (cfg.batch * cfg.clip_len * per_frame) as f64,
            "tokens",
        );
        Ok(())
    }
}

/// Tokens per frame of the `small` tokenizer (16×16) and its codebook size.
const AR_TOKENS: usize = 256;
const AR_VOCAB: usize = 1024;

impl TrainBench {
    fn name(&self) -> String {
        if self.ar {
            format!("{}_ar", self.preset)
        } else {
            self.preset.clone()
        }
    }

    /// Mean seconds per AR fine-tuning step (DWS modules, table embedder, motion-weighted
    /// token loss) after one warm-up step.
    fn time_ar_steps<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        device: &B::Device,
    ) -> Result<f64> {
        use anyhow::Context;
        use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
        use burn::prelude::*;
        use dws_models::ar_world::{ar_loss, ArLossConfig, ArWorld};
        let preset = super::world::load_preset(&self.preset)?;
        let ar = preset
            .ar
            .as_ref()
            .with_context(|| format!("preset `{}` has no [ar] table", self.preset))?;
        let cfg = &preset.finetune;
        let model = dws_models::ar::ArConfig {
            vocab: AR_VOCAB,
            tokens_per_frame: AR_TOKENS,
            max_frames: cfg.clip_len,
            width: ar.width,
            depth: ar.depth,
            heads: ar.heads,
            mlp_hidden: ar.mlp_hidden,
        };
        let embedder = bench_embedder(preset.dws.cond_dim);
        let mut world = ArWorld {
            net: model
                .init::<B>(device)
                .attach_action_modules(preset.dws.cond_dim, device),
            embedder: Some(embedder.init(device)?),
        };
        let mut optim = AdamWConfig::new().init::<B, ArWorld<B>>();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let loss_cfg = ArLossConfig {
            motion: cfg.motion_loss,
            strength: cfg.motion_strength,
            temperature: cfg.motion_temperature,
        };
        let mut times = Vec::new();
        for i in 0..=self.steps {
            use rand::Rng;
            let clips = random_clips(cfg.batch, cfg.clip_len, &mut rng);
            let n = cfg.batch * cfg.clip_len * AR_TOKENS;
            let ids: Vec<i64> = (0..n).map(|_| rng.gen_range(0..AR_VOCAB as i64)).collect();
            let started = Instant::now();
            let tokens = Tensor::<B::InnerBackend, 2, Int>::from_data(
                TensorData::new(ids, [cfg.batch, cfg.clip_len * AR_TOKENS]),
                device,
            );
            let x0 = dws_models::flow::frames_to_tensor::<B::InnerBackend>(
                &clips.frames,
                [clips.batch, clips.len, 64, 64, 3],
                device,
            );
            let actions = dws_models::train::clip_actions::<B>(&clips, device);
            let loss = ar_loss(&world, tokens, x0, actions.as_ref(), &loss_cfg);
            let grads = GradientsParams::from_grads(loss.backward(), &world);
            world = optim.step(1e-4, world, grads);
            if i > 0 {
                times.push(started.elapsed().as_secs_f64());
            }
        }
        Ok(times.iter().sum::<f64>() / times.len().max(1) as f64)
    }

    /// Mean seconds per training step after one warm-up step.
    fn time_steps<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        device: &B::Device,
    ) -> Result<f64> {
        use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
        let device = device.clone();
        let preset = super::world::load_preset(&self.preset)?;
        let cfg = &preset.finetune;
        let mut world = bench_world::<B>(&preset, &device)?;
        let mut optim = AdamWConfig::new().init::<B, dws_models::flow::WorldModel<B>>();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let loss_cfg = cfg.loss_config(&preset.flow);
        let mut times = Vec::new();
        for i in 0..=self.steps {
            let clips = random_clips(cfg.batch, cfg.clip_len, &mut rng);
            let started = Instant::now();
            let batch = dws_models::train::to_flow_batch::<B>(&clips, &device);
            let loss = dws_models::flow::flow_loss(&world, batch, &loss_cfg, &mut rng);
            let grads = GradientsParams::from_grads(loss.backward(), &world);
            world = optim.step(1e-4, world, grads);
            if i > 0 {
                times.push(started.elapsed().as_secs_f64());
            }
        }
        Ok(times.iter().sum::<f64>() / times.len().max(1) as f64)
    }
}

/// `bench imagine --backbone ar`: frames/s of token-by-token generation (one context
/// frame, `frames` new ones) at the `small` sizes, with and without the key/value cache,
/// tokenizer encode and decode included.
struct ArImagineBench {
    batch: usize,
    frames: usize,
}

impl crate::device::Job for ArImagineBench {
    type Out = ();
    fn run<B: burn::tensor::backend::AutodiffBackend>(self, device: B::Device) -> Result<()> {
        use dws_models::ar::{generate, ArConfig, Sampling};
        use dws_models::vq::VqConfig;
        let vq_cfg = VqConfig::small();
        let vq = vq_cfg.init::<B::InnerBackend>(&device);
        let cfg = ArConfig::small(vq_cfg.codebook_size, vq_cfg.tokens_per_frame());
        let model = cfg.init::<B::InnerBackend>(&device);
        let frames = self.frames.clamp(1, cfg.max_frames - 1);
        if frames != self.frames {
            eprintln!(
                "the `small` window holds {} frames: imagining {frames} after the context frame",
                cfg.max_frames
            );
        }
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let clips = random_clips(self.batch, 1, &mut rng);
        let side = vq_cfg.image_size;
        let x = dws_models::flow::frames_to_tensor::<B::InnerBackend>(
            &clips.frames,
            [self.batch, 1, side, side, 3],
            &device,
        )
        .reshape([self.batch, 3, side, side]);
        let sampling = Sampling {
            temperature: 1.0,
            top_k: 100,
        };
        for cached in [true, false] {
            let started = Instant::now();
            let prefix = vq.encode(x.clone());
            let new = generate(&model, prefix, frames, None, sampling, cached, &mut rng);
            let n = vq_cfg.tokens_per_frame();
            for f in 0..frames {
                let _ = vq.decode(new.clone().narrow(1, f * n, n)).into_data();
            }
            let secs = started.elapsed().as_secs_f64();
            emit(
                &format!(
                    "imagine/ar-small/{}/frames_per_s",
                    if cached { "kv_cache" } else { "no_cache" }
                ),
                (self.batch * frames) as f64 / secs,
                "frames/s",
            );
        }
        emit(
            "imagine/ar-small/tokens_per_frame",
            vq_cfg.tokens_per_frame() as f64,
            "tokens",
        );
        Ok(())
    }
}

struct ImagineBench {
    preset: String,
    batch: usize,
    frames: usize,
}

impl crate::device::Job for ImagineBench {
    type Out = ();
    fn run<B: burn::tensor::backend::AutodiffBackend>(self, device: B::Device) -> Result<()> {
        let preset = super::world::load_preset(&self.preset)?;
        let world = bench_world::<B::InnerBackend>(&preset, &device)?;
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let clips = random_clips(self.batch, self.frames + 1, &mut rng);
        let batch = dws_models::train::to_flow_batch::<B::InnerBackend>(&clips, &device);
        let context = batch.x0.narrow(1, 0, 1);
        let window = preset.finetune.clip_len.min(preset.model.max_frames);
        let run = |rng: &mut ChaCha8Rng, frames: usize| {
            let out = dws_models::flow::rollout(
                &world,
                context.clone(),
                batch.actions.as_ref(),
                frames,
                window,
                &preset.flow,
                rng,
            );
            let _ = out.into_data();
        };
        run(&mut rng, 1); // warm-up
        let started = Instant::now();
        run(&mut rng, self.frames);
        let secs = started.elapsed().as_secs_f64();
        emit(
            &format!("imagine/{}/frames_per_s", self.preset),
            (self.batch * self.frames) as f64 / secs,
            "frames/s",
        );
        emit(
            &format!("imagine/{}/sampler_steps", self.preset),
            preset.flow.sample_steps as f64,
            "steps",
        );
        Ok(())
    }
}

struct OfflineBench {
    batch: usize,
    steps: usize,
}

impl crate::device::Job for OfflineBench {
    type Out = ();
    fn run<B: burn::tensor::backend::AutodiffBackend>(self, device: B::Device) -> Result<()> {
        use dws_rl::offline::{bc::Bc, cql::Cql, iql::Iql, Batch, OfflineConfig};
        use rand::Rng;
        anyhow::ensure!(
            self.batch >= 1 && self.steps >= 1,
            "--batch and --steps must be at least 1"
        );
        let (side, n_actions) = (64, 15);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let f = side * side * 3;
        let mut batch = || Batch {
            obs: (0..self.batch * f).map(|_| rng.gen()).collect(),
            next_obs: (0..self.batch * f).map(|_| rng.gen()).collect(),
            actions: (0..self.batch)
                .map(|_| rng.gen_range(0..n_actions as u32))
                .collect(),
            rewards: (0..self.batch).map(|_| rng.gen_range(0.0..1.0)).collect(),
            dones: (0..self.batch)
                .map(|_| (rng.gen::<f32>() < 0.01) as u8 as f32)
                .collect(),
        };
        let batches: Vec<Batch> = (0..=self.steps).map(|_| batch()).collect();
        let config = OfflineConfig::reference();
        let time = |step: &mut dyn FnMut(&Batch)| {
            step(&batches[0]); // warm-up
            let started = Instant::now();
            for b in &batches[1..] {
                step(b);
            }
            self.steps as f64 / started.elapsed().as_secs_f64()
        };
        let mut bc = Bc::<B>::new(config.clone(), side, n_actions, &device);
        let bc_rate = time(&mut |b| {
            bc.step(b);
        });
        drop(bc);
        let mut cql = Cql::<B>::new(config.clone(), side, n_actions, &device);
        let cql_rate = time(&mut |b| {
            cql.step(b);
        });
        drop(cql);
        let mut iql = Iql::<B>::new(config, side, n_actions, &device);
        let iql_rate = time(&mut |b| {
            iql.step(b);
        });
        for (name, rate) in [("bc", bc_rate), ("cql", cql_rate), ("iql", iql_rate)] {
            emit(
                &format!("offline/{name}/batch{}/steps_per_s", self.batch),
                rate,
                "steps/s",
            );
        }
        Ok(())
    }
}

struct ImagineRlBench {
    preset: String,
    batch: usize,
    steps: usize,
}

impl crate::device::Job for ImagineRlBench {
    type Out = ();
    fn run<B: burn::tensor::backend::AutodiffBackend>(self, device: B::Device) -> Result<()> {
        use dws_envs::{ActionSpace, EnvSpec, VecEnv};
        use dws_rl::imagine::{ImaginedVecEnv, StartBuffer, Starts};
        use rand::Rng;
        anyhow::ensure!(
            self.batch >= 1 && self.steps >= 1,
            "--batch and --steps must be at least 1"
        );
        let preset = super::world::load_preset(&self.preset)?;
        let side = preset.model.image_size;
        let n_actions = 15;
        let spec = EnvSpec {
            id: "bench:imagined".into(),
            action_space: ActionSpace::Discrete { n: n_actions },
            frame_shape: [side, side, 3],
            action_templates: Vec::new(),
            final_frame_rendered: true,
        };
        let config = dws_rl::mbrl::MbrlConfig::small();
        let context = config.context;
        let world = bench_world::<B::InnerBackend>(&preset, &device)?;
        let reward = dws_models::reward::RewardConfig::small(side, n_actions)
            .init::<B::InnerBackend>(&device);
        let mut sim = dws_rl::sim::FlowSim::new(
            world,
            reward,
            preset.flow,
            spec.clone(),
            context,
            0,
            &device,
        );
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let f = side * side * 3;
        let mut starts = StartBuffer::new(Starts::Prioritized, 256, context, f, 1, 0.6);
        for _ in 0..256 {
            let frames: Vec<u8> = (0..context * f).map(|_| rng.gen()).collect();
            let actions: Vec<f32> = (0..context - 1)
                .map(|_| rng.gen_range(0..n_actions) as f32)
                .collect();
            starts.push(&frames, &actions);
        }
        let mut env = ImaginedVecEnv::new(&mut sim, &starts, self.batch, config.horizon)?;
        env.reset(0)?;
        let space = spec.action_space.clone();
        let step_random = |env: &mut ImaginedVecEnv<'_>, rng: &mut ChaCha8Rng| -> Result<()> {
            let actions: Vec<_> = (0..self.batch)
                .map(|_| sample_action(&space, rng))
                .collect();
            env.step(&actions)?;
            Ok(())
        };
        step_random(&mut env, &mut rng)?; // warm-up
        let started = Instant::now();
        for _ in 0..self.steps {
            step_random(&mut env, &mut rng)?;
        }
        let random = (self.batch * self.steps) as f64 / started.elapsed().as_secs_f64();
        let tag = format!("imagine-rl/{}/batch{}", self.preset, self.batch);
        emit(
            &format!("{tag}/random_actions/steps_per_s"),
            random,
            "steps/s",
        );
        let mut ppo =
            dws_rl::Ppo::<B>::new(dws_rl::PpoConfig::small(), space.clone(), side, 0, &device)?;
        let mut tracker = dws_rl::EpisodeTracker::new(self.batch);
        let started = Instant::now();
        let ro = ppo.collect_steps(&mut env, &mut tracker, self.steps)?;
        let with_policy = ro.len() as f64 / started.elapsed().as_secs_f64();
        emit(
            &format!("{tag}/small_ppo_policy/steps_per_s"),
            with_policy,
            "steps/s",
        );
        emit(&format!("{tag}/context_frames"), context as f64, "frames");
        Ok(())
    }
}

/// Prints one measurement.
pub fn emit(bench: &str, value: f64, unit: &str) {
    println!(
        "{}",
        serde_json::json!({"bench": bench, "value": significant(value, 4), "unit": unit})
    );
}

/// `v` rounded to `digits` significant digits (whole numbers stay whole).
fn significant(v: f64, digits: i32) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let decimals = (digits - 1 - v.abs().log10().floor() as i32).max(0);
    let p = 10f64.powi(decimals);
    (v * p).round() / p
}

/// Steps one env with pre-drawn random actions for about `seconds`; returns (steps/s,
/// episodes finished).
pub fn steps_per_second(config: &EnvConfig, seconds: f64) -> Result<(f64, u64)> {
    let mut env = dws_envs::make(config)?;
    env.reset(Some(0))?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let actions: Vec<Action> = (0..4096)
        .map(|_| sample_action(&env.spec().action_space, &mut rng))
        .collect();
    let mut checksum = 0u64;
    let (mut steps, mut episodes) = (0u64, 0u64);
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < seconds {
        for _ in 0..256 {
            let step = env.step(&actions[(steps % 4096) as usize])?;
            // Touch the frame, as a consumer of observations would.
            checksum = checksum.wrapping_add(env.obs()[(steps as usize * 7) % 12288] as u64);
            steps += 1;
            if step.done() {
                env.reset(None)?;
                episodes += 1;
            }
        }
    }
    std::hint::black_box(checksum);
    Ok((steps as f64 / started.elapsed().as_secs_f64(), episodes))
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Train {
            preset,
            backbone,
            steps,
            fused_only,
            device,
        } => {
            let ar = match backbone.as_str() {
                "flow" => false,
                "ar" => true,
                other => anyhow::bail!("unknown --backbone `{other}`: flow or ar"),
            };
            crate::device::dispatch(
                device,
                TrainBench {
                    preset,
                    steps,
                    ar,
                    fused_only,
                },
            )?
        }
        Command::Offline {
            batch,
            steps,
            device,
        } => crate::device::dispatch(device, OfflineBench { batch, steps })?,
        Command::ImagineRl {
            preset,
            batch,
            steps,
            device,
        } => crate::device::dispatch(
            device,
            ImagineRlBench {
                preset,
                batch,
                steps,
            },
        )?,
        Command::Imagine {
            backbone,
            batch,
            frames,
            device,
            ..
        } if backbone == "ar" => crate::device::dispatch(device, ArImagineBench { batch, frames })?,
        Command::Imagine { backbone, .. } if backbone != "flow" => {
            anyhow::bail!("unknown --backbone `{backbone}`: flow or ar")
        }
        Command::Imagine {
            preset,
            batch,
            frames,
            device,
            ..
        } => crate::device::dispatch(
            device,
            ImagineBench {
                preset,
                batch,
                frames,
            },
        )?,
        Command::Play {
            ckpt,
            tabs,
            seconds,
            sample_steps,
            device,
        } => play_bench(ckpt, &tabs, seconds, sample_steps, device)?,
        Command::Ops {
            seconds,
            torch,
            quick,
            only,
            device,
        } => crate::device::dispatch(
            device,
            super::bench_ops::OpsBench {
                seconds,
                torch,
                quick,
                only,
            },
        )?,
        Command::Step {
            model,
            preset,
            steps,
            torch,
            fused_only,
            device,
        } => crate::device::dispatch(
            device,
            super::bench_step::StepBench {
                model,
                preset,
                steps,
                torch,
                fused_only,
            },
        )?,
        Command::Metrics {
            clips,
            frames,
            device,
        } => crate::device::dispatch(device, MetricsBench { clips, frames })?,
        Command::Envs {
            seconds,
            all_procgen,
        } => {
            let games: Vec<&str> = if all_procgen {
                dws_envs::procgen::GAMES.to_vec()
            } else {
                vec!["coinrun"]
            };
            let mut ids: Vec<String> = games.iter().map(|g| format!("procgen:{g}")).collect();
            ids.push("push".into());
            if cfg!(feature = "atari") {
                ids.push("atari:breakout".into());
            }
            for id in ids {
                let config = EnvConfig::parse(&id, &[])?;
                let (rate, episodes) = steps_per_second(&config, seconds)?;
                emit(&format!("envs/{id}/steps_per_s"), rate, "steps/s");
                tracing::debug!("{id}: {episodes} episodes finished");
            }
            // Cost of a seeded reset (Procgen makes a fresh library instance).
            let mut env = dws_envs::make_id("procgen:coinrun")?;
            let n = 50;
            let started = Instant::now();
            for s in 0..n {
                env.reset(Some(s))?;
            }
            emit(
                "envs/procgen:coinrun/seeded_reset_ms",
                started.elapsed().as_secs_f64() * 1e3 / n as f64,
                "ms",
            );
        }
    }
    Ok(())
}

/// `bench play`: per measurement, `tabs` clients each reset and then step the server as
/// fast as it answers for `seconds`; prints frames per second per tab and in all.
fn play_bench(
    ckpt: std::path::PathBuf,
    tabs: &[usize],
    seconds: f64,
    sample_steps: Option<usize>,
    device: crate::device::DeviceArg,
) -> Result<()> {
    use super::play::{spawn, PlayArgs};
    use tungstenite::Message;
    let most = tabs.iter().copied().max().unwrap_or(0);
    anyhow::ensure!(
        most >= 1,
        "--tabs must name at least one count of 1 or more"
    );
    let addr = spawn(PlayArgs {
        ckpt: Some(ckpt),
        data: None,
        host: "127.0.0.1".into(),
        port: 0,
        no_real: false,
        real_only: false,
        env: None,
        env_opts: String::new(),
        max_sessions: most,
        sample_steps,
        seed: 0,
        device,
    })?;
    let url = format!("ws://{addr}/ws");
    for &n in tabs {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
        let clients: Vec<_> = (0..n)
            .map(|_| {
                let (url, barrier) = (url.clone(), barrier.clone());
                std::thread::spawn(move || -> Result<(u64, f64, f64)> {
                    let (mut ws, _) = tungstenite::connect(url)?;
                    let hello = match ws.read()? {
                        Message::Text(t) => serde_json::from_str::<serde_json::Value>(t.as_str())?,
                        other => anyhow::bail!("expected the server's hello, got {other:?}"),
                    };
                    anyhow::ensure!(hello["type"] == "hello", "the server said {hello}");
                    // The action repeated: id 0, or the zero vector.
                    let space = &hello["action_space"];
                    let action = match space["dim"].as_u64() {
                        Some(dim) => serde_json::json!(vec![0.0; dim as usize]),
                        None => serde_json::json!(0),
                    };
                    let action = serde_json::json!({"type": "act", "action": action}).to_string();
                    // One frame: a JSON message, then the pixels.
                    let mut exchange = |msg: &str| -> Result<f64> {
                        ws.send(Message::text(msg))?;
                        let mut ms = 0.0;
                        loop {
                            match ws.read()? {
                                Message::Text(t) => {
                                    let v: serde_json::Value = serde_json::from_str(t.as_str())?;
                                    anyhow::ensure!(v["type"] != "error", "server error: {v}");
                                    ms = v["sim_ms"].as_f64().unwrap_or(ms);
                                }
                                Message::Binary(_) => return Ok(ms),
                                _ => {}
                            }
                        }
                    };
                    exchange(r#"{"type":"reset"}"#)?;
                    exchange(&action)?;
                    barrier.wait();
                    let started = Instant::now();
                    let (mut frames, mut ms_sum) = (0u64, 0.0);
                    while started.elapsed().as_secs_f64() < seconds {
                        ms_sum += exchange(&action)?;
                        frames += 1;
                    }
                    Ok((frames, started.elapsed().as_secs_f64(), ms_sum))
                })
            })
            .collect();
        let mut total = 0.0;
        let mut per_tab = Vec::new();
        let mut ms = 0.0;
        let mut frames_all = 0;
        for c in clients {
            let (frames, secs, ms_sum) = c
                .join()
                .map_err(|_| anyhow::anyhow!("a bench client panicked"))??;
            per_tab.push(frames as f64 / secs);
            total += frames as f64 / secs;
            ms += ms_sum;
            frames_all += frames;
        }
        let mean_tab = per_tab.iter().sum::<f64>() / per_tab.len() as f64;
        emit(&format!("play/tabs={n}/fps_per_tab"), mean_tab, "frames/s");
        emit(&format!("play/tabs={n}/fps_total"), total, "frames/s");
        emit(
            &format!("play/tabs={n}/model_call_ms"),
            ms / frames_all.max(1) as f64,
            "ms",
        );
    }
    Ok(())
}
