//! `dws imagine`: transitions made up by a DWS world simulator, written as an ordinary
//! episode dataset marked imagined (the world-model data of the paper's Table 2).
//!
//! The simulator is a fine-tuned world model with a reward/termination model: a `dws
//! mbrl` run brings both; for a `dws finetune` run the reward model is trained here on
//! the start dataset's transitions (kept in `OUT/models/reward/`). Trajectories start
//! from states of the start dataset and act with a policy: behaviour cloning of that
//! dataset by default (trained here, kept in `OUT/models/policy/`, a `dws offline` run),
//! the uniform random policy, a `dws ppo` agent or a `dws offline` run. Work comes in
//! rounds of `--batch` trajectories (`dws_rl::augment`); each round is written whole, so
//! a killed run loses at most the round in progress and `dws imagine` run again
//! continues with the same episodes an uninterrupted run would have made.

use super::offline::OfflineRunConfig;
use super::world::{load_world, RunConfig};
use crate::device::{dispatch, DeviceArg, Job};
use anyhow::{bail, ensure, Context, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use dws_data::{ActionSpace, Dataset, DatasetHeader, DatasetWriter, Episode};
use dws_envs::policy::sample_action;
use dws_envs::{Action, EnvSpec};
use dws_models::checkpoint::{self, TrainState};
use dws_models::embedders::ActionKind;
use dws_models::reward::{RewardConfig, RewardModel};
use dws_rl::augment::{imagine_round, round_seed, starts_from_episodes};
use dws_rl::imagine::action_width;
use dws_rl::mbrl::RewardTrainer;
use dws_rl::offline::{bc::Bc, Algo, Learner, OfflineConfig, TransitionSet};
use dws_rl::replay::{Chunk, Replay};
use dws_rl::sim::{reward_action_dim, FlowSim};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Clone, Debug)]
pub struct ImagineArgs {
    /// The world simulator: a `dws finetune` run (with actions) or a `dws mbrl` run
    /// (its world/ and reward/ models).
    #[arg(long)]
    pub ckpt: PathBuf,
    /// Dataset whose states imagination starts from (and on which the reward model and
    /// the default behaviour-cloning policy are trained when they are needed).
    #[arg(long)]
    pub starts: PathBuf,
    /// bc (behaviour cloning of --starts, trained here), random, ppo:RUN or
    /// offline:RUN (a `dws offline` run).
    #[arg(long, default_value = "bc")]
    pub policy: String,
    /// Act with the policy's most likely action instead of sampling.
    #[arg(long)]
    pub greedy: bool,
    /// Imagined transitions to make (the run stops after the round that reaches it).
    #[arg(long, default_value_t = 10_000)]
    pub transitions: u64,
    /// Longest imagined trajectory.
    #[arg(long, default_value_t = 16)]
    pub horizon: usize,
    /// Trajectories imagined together (one round).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Start states drawn from --starts (uniformly) and kept in memory.
    #[arg(long, default_value_t = 4096)]
    pub start_states: usize,
    /// debug or small: the sizes of the reward model and BC policy trained here.
    #[arg(long, default_value = "small")]
    pub preset: String,
    /// Reward-model training steps (when the simulator has none).
    #[arg(long)]
    pub reward_steps: Option<usize>,
    /// Behaviour-cloning steps (with --policy bc).
    #[arg(long)]
    pub bc_steps: Option<usize>,
    /// Dataset directory to write (created, or continued when it exists).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
}

/// How one collection of imagined episodes was made (a manifest `collections` entry);
/// a dataset continues only with the same settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct ImagineInfo {
    command: String,
    world_model: PathBuf,
    /// The env the world model was trained on.
    world_model_env: String,
    world_model_checkpoint: PathBuf,
    reward_model: PathBuf,
    policy: String,
    greedy: bool,
    starts: PathBuf,
    horizon: usize,
    batch: usize,
    start_states: usize,
    seed: u64,
}

/// Where the parts of the simulator come from.
struct Simulator {
    world_run: PathBuf,
    world_env: String,
    /// A reward model to load (mbrl run), with its config.
    reward: Option<(PathBuf, RewardConfig)>,
}

fn env_of_dataset(dir: &Path) -> Result<String> {
    Ok(Dataset::open(dir)
        .with_context(|| {
            format!(
                "opening {}, which the world model was trained on",
                dir.display()
            )
        })?
        .header()
        .env_id
        .clone())
}

/// Reads what `--ckpt` is: an mbrl run or a world-model run, and the env it learned.
fn simulator_parts(ckpt: &Path) -> Result<Simulator> {
    let mbrl_cfg = ckpt.join("config.json");
    if ckpt.join("world").join("config.json").is_file() && mbrl_cfg.is_file() {
        let cfg: super::mbrl::MbrlRunConfig = serde_json::from_str(&fs::read_to_string(&mbrl_cfg)?)
            .with_context(|| format!("{} is not a dws mbrl config", mbrl_cfg.display()))?;
        return Ok(Simulator {
            world_run: ckpt.join("world"),
            world_env: cfg.env.id(),
            reward: Some((ckpt.join("reward"), cfg.reward)),
        });
    }
    let run = super::world::run_of(ckpt);
    let cfg = RunConfig::read(&run)?;
    let env = match cfg.data.first() {
        Some(d) => env_of_dataset(d)?,
        None => bail!(
            "{}: its config names no training data, so the env it simulates is unknown",
            run.display()
        ),
    };
    for d in &cfg.data[1..] {
        let other = env_of_dataset(d)?;
        ensure!(
            other == env,
            "{} was fine-tuned on several envs ({env}, {other}); imagine with a model of one env",
            run.display()
        );
    }
    Ok(Simulator {
        world_run: ckpt.to_path_buf(),
        world_env: env,
        reward: None,
    })
}

/// Checks that the world model takes the dataset's actions.
fn check_actions(cfg: &RunConfig, header: &DatasetHeader, run: &Path) -> Result<()> {
    let Some(dws) = &cfg.dws else {
        bail!(
            "{} is an action-free model; imagine with a DWS fine-tuned one (`dws finetune`)",
            run.display()
        );
    };
    let ok = match (&dws.embedder.actions, &header.action_space) {
        (ActionKind::Discrete { n, .. }, ActionSpace::Discrete { n: m }) => n == m,
        (ActionKind::Continuous { dim }, ActionSpace::Continuous { dim: d, .. }) => dim == d,
        _ => false,
    };
    ensure!(
        ok,
        "{} takes actions {:?}; the start dataset's are {}",
        run.display(),
        dws.embedder.actions,
        header.action_space
    );
    Ok(())
}

fn to_env_space(space: &ActionSpace) -> Result<dws_envs::ActionSpace> {
    Ok(serde_json::from_value(serde_json::to_value(space)?)?)
}

/// The reward model: the mbrl run's, the one trained here before, or a new one trained
/// on the start dataset's transitions now.
#[allow(clippy::too_many_arguments)]
fn reward_model<B: AutodiffBackend>(
    sim: &Simulator,
    out: &Path,
    episodes: &[Episode],
    spec: &EnvSpec,
    steps: usize,
    batch: usize,
    seed: u64,
    device: &B::Device,
) -> Result<(RewardModel<B::InnerBackend>, PathBuf)> {
    if let Some((dir, cfg)) = &sim.reward {
        let ckpt = checkpoint::latest(dir)
            .with_context(|| format!("{} has no reward-model checkpoint", dir.display()))?;
        let model = checkpoint::load_model(cfg.init::<B::InnerBackend>(device), &ckpt, device)?;
        return Ok((model, ckpt));
    }
    let dir = out.join("models").join("reward");
    let [side, ..] = spec.frame_shape;
    let cfg = RewardConfig::small(side, reward_action_dim(&spec.action_space));
    if let Some(ckpt) = checkpoint::latest(&dir) {
        let stored: RewardConfig =
            serde_json::from_str(&fs::read_to_string(dir.join("config.json"))?)
                .with_context(|| format!("reading {}", dir.join("config.json").display()))?;
        let model = checkpoint::load_model(stored.init::<B::InnerBackend>(device), &ckpt, device)?;
        println!("reward model: {} (trained before)", ckpt.display());
        return Ok((model, ckpt));
    }
    let mut replay = Replay::new(episodes.len().max(1));
    for (i, e) in episodes.iter().enumerate() {
        if let Some(c) = Chunk::from_episode(e, i + 1) {
            replay.push(c);
        }
    }
    println!(
        "training the reward model: {steps} steps on {} transitions",
        replay.steps()
    );
    let mut trainer = RewardTrainer::new(cfg.init::<B>(device));
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7e3a_d001);
    let bar = crate::progress::bar(steps as u64, "steps");
    bar.set_message("training the reward model");
    let chunk = 25;
    let mut last = None;
    let mut done = 0;
    while done < steps {
        let n = chunk.min(steps - done);
        last = trainer.train(&replay, &spec.action_space, n, batch, 5e-4, true, &mut rng)?;
        done += n;
        bar.set_position(done as u64);
    }
    bar.finish_and_clear();
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    let state = TrainState {
        step: steps,
        rng_seed: seed,
        rng_word_pos: 0,
        last_loss: last.map_or(0.0, |l| l.0),
    };
    let ckpt = trainer.save(&dir, &state, 1)?;
    if let Some((mse, bce)) = last {
        println!(
            "reward model: {steps} steps on {} transitions (reward MSE {mse:.4}, end cross-entropy \
             {bce:.4}) -> {}",
            replay.steps(),
            dir.display()
        );
    }
    Ok((trainer.model.valid(), ckpt))
}

/// A policy acting on a batch of frames.
type BatchPolicy<'a> = Box<dyn FnMut(&[u8], usize, &mut ChaCha8Rng) -> Vec<Action> + 'a>;

/// A learner of a `dws offline` run (its newest checkpoint).
fn offline_learner<B: AutodiffBackend>(
    run: &Path,
    n_actions: usize,
    side: usize,
    device: &B::Device,
) -> Result<Box<dyn Learner<B>>> {
    let cfg_path = run.join("config.json");
    let cfg: OfflineRunConfig = serde_json::from_str(
        &fs::read_to_string(&cfg_path)
            .with_context(|| format!("{} is not a dws offline run", run.display()))?,
    )
    .with_context(|| format!("{} is not a dws offline config", cfg_path.display()))?;
    let ckpt = checkpoint::latest(run)
        .with_context(|| format!("{} has no checkpoint yet", run.display()))?;
    let mut learner = cfg.algo.learner::<B>(cfg.offline, side, n_actions, device);
    learner.load(&ckpt)?;
    Ok(learner)
}

/// Behaviour cloning of the start dataset, trained here once (a `dws offline`-style run
/// in `OUT/models/policy`).
#[allow(clippy::too_many_arguments)]
fn bc_policy<B: AutodiffBackend>(
    out: &Path,
    episodes: &[Episode],
    starts: &Path,
    env: &dws_envs::EnvConfig,
    config: OfflineConfig,
    steps: usize,
    seed: u64,
    n: usize,
    device: &B::Device,
) -> Result<Box<dyn Learner<B>>> {
    let dir = out.join("models").join("policy");
    let [side, ..] = episodes[0].frame_shape;
    if checkpoint::latest(&dir).is_some() {
        println!(
            "policy: behaviour cloning from {} (trained before)",
            dir.display()
        );
        return offline_learner::<B>(&dir, n, side, device);
    }
    let set = TransitionSet::new(episodes.to_vec())?;
    println!(
        "training the behaviour-cloning policy: {steps} steps on {} transitions",
        set.len()
    );
    let mut bc = Bc::<B>::new(config.clone(), side, n, device);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xbc);
    let bar = crate::progress::bar(steps as u64, "steps");
    bar.set_message("behaviour cloning");
    let mut loss = 0.0;
    for s in 0..steps {
        loss = bc.step(&set.sample(config.batch, &mut rng));
        bar.set_position(s as u64 + 1);
    }
    bar.finish_and_clear();
    fs::create_dir_all(&dir)?;
    let run_cfg = OfflineRunConfig {
        algo: Algo::Bc,
        env: env.clone(),
        test_env: None,
        offline: config,
        real_data: vec![starts.to_path_buf()],
        imagined_data: Vec::new(),
        real_transitions: set.len(),
        imagined_transitions: 0,
        real_share: 1.0,
        steps,
        seed,
        eval_episodes: 0,
        greedy: false,
    };
    fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&run_cfg)?,
    )?;
    let state = TrainState {
        step: steps,
        rng_seed: seed,
        rng_word_pos: rng.get_word_pos(),
        last_loss: loss,
    };
    bc.save(&dir, &state, 1)?;
    println!(
        "policy: behaviour cloning, {steps} steps on {} transitions (loss {loss:.3}) -> {}",
        set.len(),
        dir.display()
    );
    Ok(Box::new(bc))
}

struct ImagineJob {
    args: ImagineArgs,
}

impl Job for ImagineJob {
    type Out = u64;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<u64> {
        let a = self.args;
        // Fresh networks (reward model, BC policy) start from seeded weights.
        B::seed(&device, a.seed);
        ensure!(a.transitions > 0, "--transitions must be at least 1");
        ensure!(
            a.horizon > 0 && a.batch > 0,
            "--horizon and --batch must be at least 1"
        );
        ensure!(a.start_states > 0, "--start-states must be at least 1");
        let (reward_steps, bc_steps, bc_config) = match a.preset.as_str() {
            "debug" => (20, 20, OfflineConfig::debug()),
            "small" => (1000, 1500, OfflineConfig::small()),
            other => bail!("unknown --preset `{other}`: debug or small"),
        };
        let reward_steps = a.reward_steps.unwrap_or(reward_steps);
        let bc_steps = a.bc_steps.unwrap_or(bc_steps);
        // The start dataset and the simulator must describe the same env.
        let starts_ds = Dataset::open(&a.starts)
            .with_context(|| format!("opening the start dataset {}", a.starts.display()))?;
        let header = starts_ds.header().clone();
        ensure!(
            !header.imagined,
            "{} is itself imagined; start imagination from recorded states",
            a.starts.display()
        );
        let sim_parts = simulator_parts(&a.ckpt)?;
        ensure!(
            sim_parts.world_env == header.env_id,
            "the world model {} was trained on {}, the start dataset {} holds {}",
            a.ckpt.display(),
            sim_parts.world_env,
            a.starts.display(),
            header.env_id
        );
        let (wcfg, world, wckpt) = load_world::<B::InnerBackend>(&sim_parts.world_run, &device)
            .with_context(|| {
                format!("loading the world model {}", sim_parts.world_run.display())
            })?;
        check_actions(&wcfg, &header, &sim_parts.world_run)?;
        let [h, w, _] = header.frame_shape;
        ensure!(
            wcfg.model.image_size == h && h == w,
            "the world model makes {s}×{s} frames; {} has {h}×{w}",
            a.starts.display(),
            s = wcfg.model.image_size
        );
        let context = wcfg.train.clip_len.saturating_sub(1).max(1);
        let env: dws_envs::EnvConfig = serde_json::from_value(header.env_config.clone())
            .with_context(|| format!("{}: unknown env config", a.starts.display()))?;
        let spec = EnvSpec {
            id: header.env_id.clone(),
            action_space: to_env_space(&header.action_space)?,
            action_templates: header.action_templates.clone(),
            frame_shape: header.frame_shape,
            final_frame_rendered: header.final_frame_rendered,
        };
        println!(
            "reading {} ({} episodes, {} steps)",
            a.starts.display(),
            starts_ds.len(),
            starts_ds.manifest().num_steps
        );
        let episodes = starts_ds
            .read_all()
            .with_context(|| format!("reading {}", a.starts.display()))?;
        let (reward, reward_ckpt) = reward_model::<B>(
            &sim_parts,
            &a.out,
            &episodes,
            &spec,
            reward_steps,
            64,
            a.seed,
            &device,
        )?;
        // The policy.
        let n_actions = match &header.action_space {
            ActionSpace::Discrete { n } => Some(*n),
            ActionSpace::Continuous { .. } => None,
        };
        let policy_name = a.policy.clone();
        let greedy = a.greedy;
        let mut policy: BatchPolicy = if policy_name == "random" {
            let space = spec.action_space.clone();
            Box::new(move |_, n, rng| (0..n).map(|_| sample_action(&space, rng)).collect())
        } else if let Some(run) = policy_name.strip_prefix("ppo:") {
            let p = dws_rl::policy::PpoPolicy::<B::InnerBackend>::load(
                Path::new(run),
                &spec,
                greedy,
                &device,
            )?;
            Box::new(move |frames, n, rng| p.act_frames(frames, n, rng))
        } else {
            let Some(n_act) = n_actions else {
                bail!(
                    "--policy {policy_name} takes discrete actions; {} has continuous ones (use \
                     random or ppo:RUN)",
                    a.starts.display()
                );
            };
            let learner = if policy_name == "bc" {
                bc_policy::<B>(
                    &a.out,
                    &episodes,
                    &a.starts,
                    &env,
                    bc_config.clone(),
                    bc_steps,
                    a.seed,
                    n_act,
                    &device,
                )?
            } else if let Some(run) = policy_name.strip_prefix("offline:") {
                offline_learner::<B>(Path::new(run), n_act, h, &device)?
            } else {
                bail!("unknown --policy `{policy_name}`: bc, random, ppo:RUN or offline:RUN");
            };
            Box::new(move |frames, n, rng| {
                let r: Option<&mut dyn rand::RngCore> = if greedy { None } else { Some(rng) };
                learner
                    .act(frames, n, r)
                    .into_iter()
                    .map(Action::Discrete)
                    .collect()
            })
        };
        // Start states.
        let mut rng = ChaCha8Rng::seed_from_u64(a.seed ^ 0x57a7);
        let mut source = episodes.iter().cloned().map(Ok);
        let starts = starts_from_episodes(
            &mut source,
            context,
            a.start_states,
            action_width(&spec.action_space),
            &mut rng,
        )
        .with_context(|| format!("start states from {}", a.starts.display()))?;
        let real_reward = episodes.iter().map(|e| e.total_reward()).sum::<f32>()
            / episodes.iter().map(|e| e.steps()).sum::<usize>().max(1) as f32;
        let real_ends = episodes
            .iter()
            .map(|e| e.terminated.iter().map(|&t| t as usize).sum::<usize>())
            .sum::<usize>() as f32
            / episodes.iter().map(|e| e.steps()).sum::<usize>().max(1) as f32;
        drop(episodes);
        // The dataset and what it records of this collection.
        let info = ImagineInfo {
            command: "imagine".into(),
            world_model: a.ckpt.clone(),
            world_model_env: sim_parts.world_env.clone(),
            world_model_checkpoint: wckpt,
            reward_model: reward_ckpt,
            policy: format!("{policy_name}{}", if greedy { " (greedy)" } else { "" }),
            greedy,
            starts: a.starts.clone(),
            horizon: a.horizon,
            batch: a.batch,
            start_states: a.start_states,
            seed: a.seed,
        };
        let mut out_header = header.clone();
        out_header.imagined = true;
        let mut writer = DatasetWriter::create_or_append(&a.out, out_header)
            .with_context(|| format!("opening {} for writing", a.out.display()))?;
        let last: Option<ImagineInfo> = writer
            .manifest()
            .collections
            .last()
            .and_then(|c| serde_json::from_value(c.clone()).ok());
        match last {
            Some(prev) if prev == info => {}
            Some(_) => bail!(
                "{} was imagined with other settings (model, policy, starts, horizon, batch or \
                 seed); continue with the same ones or write to another --out",
                a.out.display()
            ),
            None if writer.manifest().num_episodes > 0 => bail!(
                "{} holds episodes that dws imagine did not make; write to another --out",
                a.out.display()
            ),
            None => writer.add_collection(serde_json::to_value(&info)?)?,
        }
        let mut sim = FlowSim::new(
            world,
            reward,
            wcfg.flow,
            spec.clone(),
            context,
            a.seed,
            &device,
        );
        let have = writer.manifest().num_steps;
        println!(
            "imagining {} transitions of {} from {} start states of {} (context {context}, horizon \
             {}, {} at a time, policy {}){}",
            a.transitions,
            spec.id,
            starts.len(),
            a.starts.display(),
            a.horizon,
            a.batch,
            info.policy,
            if have > 0 {
                format!("; {have} there already")
            } else {
                String::new()
            }
        );
        let bar = crate::progress::bar(a.transitions, "transitions");
        bar.set_position(have.min(a.transitions));
        let started = std::time::Instant::now();
        let mut made = 0u64;
        while writer.manifest().num_steps < a.transitions {
            let round = writer.manifest().num_episodes / a.batch;
            let seed = round_seed(a.seed, round);
            sim.reseed(seed);
            let mut prng = ChaCha8Rng::seed_from_u64(seed ^ 0x9011);
            let mut act = |frames: &[u8], n: usize| policy(frames, n, &mut prng);
            let eps = imagine_round(&mut sim, &starts, a.batch, a.horizon, seed, &mut act)?;
            for e in &eps {
                let mut meta = serde_json::Map::new();
                meta.insert("round".into(), round.into());
                writer.append_unlisted(e, Some(seed), meta)?;
                made += e.steps() as u64;
            }
            writer.flush()?;
            bar.set_position(writer.manifest().num_steps.min(a.transitions));
        }
        bar.finish_and_clear();
        let m = writer.manifest();
        let steps = m.num_steps.max(1) as f32;
        let reward_per_step = m.episodes.iter().map(|e| e.ret).sum::<f32>() / steps;
        let ends = m.episodes.iter().filter(|e| e.terminated).count() as f32 / steps;
        let preview = a.out.join("preview.png");
        super::dataset::preview(
            std::slice::from_ref(&a.out),
            &preview,
            &dws_data::PreviewOptions::default(),
        )?;
        let rate = if made > 0 {
            format!(
                "{made} made now, {:.1} transitions/s",
                made as f64 / started.elapsed().as_secs_f64().max(1e-9)
            )
        } else {
            "all there before".to_string()
        };
        println!(
            "{} imagined transitions in {} episodes ({rate}); reward per step \
             {reward_per_step:.4} (real data {real_reward:.4}), episode ends per step {ends:.4} \
             (real {real_ends:.4})",
            m.num_steps, m.num_episodes,
        );
        println!(
            "wrote {} (an episode dataset marked imagined: `dws dataset info {}`), {}",
            a.out.display(),
            a.out.display(),
            preview.display()
        );
        Ok(m.num_steps)
    }
}

pub fn imagine(args: ImagineArgs) -> Result<u64> {
    let device = args.device;
    dispatch(device, ImagineJob { args })
}
