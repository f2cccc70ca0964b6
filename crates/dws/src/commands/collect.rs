//! `dws collect`: run a policy in an environment and append whole episodes to a dataset.
//!
//! Episode `i` of a dataset (counting what is already there) is reset with a seed derived
//! from `--seed` and `i`, and its policy draws from a generator seeded the same way, so a
//! dataset is the same bytes however many workers made it and however often the
//! collection was interrupted and continued.

use anyhow::{bail, Context, Result};
use dws_data::{DatasetHeader, DatasetWriter, Episode};
use dws_envs::{policy::make_policy, Action, EnvConfig, EnvSpec, PolicyKind};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Environment id: procgen:<game> (16 games), push, atari:<game> (`dws envs` lists them).
    #[arg(long)]
    pub env: String,
    /// Env options as key=value pairs, e.g. num_levels=200,distribution_mode=easy
    /// (`dws envs ID` lists them).
    #[arg(long, default_value = "")]
    pub env_opts: String,
    /// random (uniform actions), scripted (the pushing task's random pushes) or
    /// ppo:RUN (the agent of a `dws ppo` or `dws mbrl` run, its newest checkpoint;
    /// actions sampled from its policy unless --greedy).
    #[arg(long, default_value = "random")]
    pub policy: CollectPolicy,
    /// With --policy ppo:RUN, the agent's most likely action instead of a sample.
    #[arg(long)]
    pub greedy: bool,
    /// Episodes to add.
    #[arg(long, conflicts_with = "steps", required_unless_present = "steps")]
    pub episodes: Option<usize>,
    /// Add whole episodes until at least this many steps were added.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Dataset directory (created, or appended to).
    #[arg(long)]
    pub out: PathBuf,
    /// Parallel environments (threads).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Base seed of the episode seeds.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Which policy collects.
#[derive(Debug, Clone, PartialEq)]
pub enum CollectPolicy {
    Builtin(PolicyKind),
    /// A `dws ppo` run directory.
    Ppo(PathBuf),
}

impl std::str::FromStr for CollectPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("ppo:") {
            Some("") => Err("ppo:RUN needs the directory of a `dws ppo` or `dws mbrl` run".into()),
            Some(run) => Ok(Self::Ppo(PathBuf::from(run))),
            None => s
                .parse()
                .map(Self::Builtin)
                .map_err(|e: String| format!("{e}, or ppo:RUN (a `dws ppo` or `dws mbrl` run)")),
        }
    }
}

impl CollectPolicy {
    /// How the manifest names it.
    fn describe(&self, greedy: bool) -> String {
        match self {
            Self::Builtin(PolicyKind::Random) => "random".into(),
            Self::Builtin(PolicyKind::Scripted) => "scripted".into(),
            Self::Ppo(run) => format!(
                "ppo:{} ({})",
                run.display(),
                if greedy { "greedy" } else { "sampled" }
            ),
        }
    }

    fn make(&self, env: &dyn dws_envs::Env, greedy: bool) -> Result<Box<dyn dws_envs::Policy>> {
        Ok(match self {
            Self::Builtin(kind) => make_policy(*kind, env)?,
            Self::Ppo(run) => crate::device::cpu_ppo_policy(run, env.spec(), greedy)?.0,
        })
    }
}

/// What a collection added.
#[derive(Debug)]
pub struct Summary {
    pub episodes: usize,
    pub steps: u64,
    pub total_episodes: usize,
    pub seconds: f64,
}

/// Seed of episode `index` (SplitMix64 of base and index: neighbouring indices get
/// unrelated seeds).
pub fn episode_seed(base: u64, index: usize) -> u64 {
    let mut z = base
        .wrapping_add((index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    // Procgen takes 31-bit seeds; keep every env on the same seed.
    (z ^ (z >> 31)) & 0x7FFF_FFFF
}

pub fn header_for(config: &EnvConfig, spec: &EnvSpec) -> Result<DatasetHeader> {
    let action_space = serde_json::from_value(serde_json::to_value(&spec.action_space)?)?;
    Ok(DatasetHeader {
        env_id: spec.id.clone(),
        env_config: serde_json::to_value(config)?,
        action_space,
        action_templates: spec.action_templates.clone(),
        frame_shape: spec.frame_shape,
        final_frame_rendered: spec.final_frame_rendered,
        imagined: false,
    })
}

struct Finished {
    index: usize,
    seed: u64,
    episode: Episode,
    info: serde_json::Map<String, serde_json::Value>,
}

/// Plays one whole episode.
fn play_episode(
    env: &mut dyn dws_envs::Env,
    policy: &mut dyn dws_envs::Policy,
    seed: u64,
    stop: &AtomicBool,
    live_steps: &AtomicU64,
) -> Result<Option<Episode>> {
    env.reset(Some(seed))?;
    policy.reset();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xA5A5_5A5A_0F0F_F0F0);
    let spec = env.spec().clone();
    let space = serde_json::from_value(serde_json::to_value(&spec.action_space)?)?;
    let mut ep = Episode::new(env.obs(), spec.frame_shape, &space);
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let action = policy.act(env, &mut rng)?;
        let step = env.step(&action)?;
        match &action {
            Action::Discrete(a) => {
                ep.push_discrete(*a, step.reward, step.terminated, step.truncated, env.obs())
            }
            Action::Continuous(v) => {
                ep.push_continuous(v, step.reward, step.terminated, step.truncated, env.obs())
            }
        }
        live_steps.fetch_add(1, Ordering::Relaxed);
        if step.done() {
            return Ok(Some(ep));
        }
    }
}

pub fn run(args: Args) -> Result<Summary> {
    let opts = dws_envs::config::parse_options(&args.env_opts).map_err(anyhow::Error::msg)?;
    let config = EnvConfig::parse(&args.env, &opts)?;
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    if args.episodes == Some(0) || args.steps == Some(0) {
        bail!("nothing to collect: --episodes/--steps must be at least 1");
    }
    // One env up front: fails early on a bad id, policy or missing asset.
    let probe = dws_envs::make(&config)?;
    if args.greedy && !matches!(args.policy, CollectPolicy::Ppo(_)) {
        bail!("--greedy is for --policy ppo:RUN");
    }
    let behaviour = match &args.policy {
        CollectPolicy::Ppo(run) => {
            let (_, ckpt) = crate::device::cpu_ppo_policy(run, probe.spec(), args.greedy)?;
            serde_json::json!({
                "name": args.policy.describe(args.greedy),
                "checkpoint": ckpt,
            })
        }
        other => {
            other.make(probe.as_ref(), false)?;
            serde_json::json!(other.describe(false))
        }
    };
    let spec = probe.spec().clone();
    drop(probe);
    let mut writer = DatasetWriter::create_or_append(&args.out, header_for(&config, &spec)?)
        .with_context(|| format!("opening dataset {}", args.out.display()))?;
    let start = writer.next_index();
    writer.add_collection(serde_json::json!({
        "policy": behaviour,
        "seed": args.seed,
        "first_episode": start,
        "episodes": args.episodes,
        "steps": args.steps,
        "workers": args.workers,
        "dws_version": env!("CARGO_PKG_VERSION"),
    }))?;
    let end = args.episodes.map(|n| start + n);
    tracing::info!(
        "collecting {} from {} with the {} policy into {} (episode {start} on, {} workers)",
        match (args.episodes, args.steps) {
            (Some(n), _) => format!("{n} episodes"),
            (_, Some(s)) => format!("{s} steps"),
            _ => unreachable!("clap requires one"),
        },
        spec.id,
        args.policy.describe(args.greedy),
        args.out.display(),
        args.workers
    );

    let next = Arc::new(AtomicUsize::new(start));
    let stop = Arc::new(AtomicBool::new(false));
    let live_steps = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::sync_channel::<Result<Finished>>(args.workers * 2);
    let mut handles = Vec::new();
    for _ in 0..args.workers {
        let (config, next, stop, live_steps, tx) = (
            config.clone(),
            next.clone(),
            stop.clone(),
            live_steps.clone(),
            tx.clone(),
        );
        let (policy_kind, greedy, base_seed) = (args.policy.clone(), args.greedy, args.seed);
        handles.push(std::thread::spawn(move || {
            let work = || -> Result<()> {
                let mut env = dws_envs::make(&config)?;
                let mut policy = policy_kind.make(env.as_ref(), greedy)?;
                loop {
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    if end.is_some_and(|e| index >= e) || stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    let seed = episode_seed(base_seed, index);
                    let Some(episode) =
                        play_episode(env.as_mut(), policy.as_mut(), seed, &stop, &live_steps)?
                    else {
                        return Ok(());
                    };
                    let info = env.episode_info();
                    if tx
                        .send(Ok(Finished {
                            index,
                            seed,
                            episode,
                            info,
                        }))
                        .is_err()
                    {
                        return Ok(());
                    }
                }
            };
            if let Err(e) = work() {
                let _ = tx.send(Err(e));
            }
        }));
    }
    drop(tx);

    let started = Instant::now();
    let bar = match (args.episodes, args.steps) {
        (Some(n), _) => crate::progress::bar(n as u64, "episodes"),
        (_, Some(s)) => crate::progress::bar(s, "steps"),
        _ => unreachable!("clap requires one"),
    };
    // Episodes finish out of order; they are written in index order.
    let mut pending: BTreeMap<usize, Finished> = BTreeMap::new();
    let (mut added, mut added_steps) = (0usize, 0u64);
    let mut failure = None;
    let done = |added: usize, steps: u64| match (args.episodes, args.steps) {
        (Some(n), _) => added >= n,
        (_, Some(s)) => steps >= s,
        _ => true,
    };
    while !done(added, added_steps) {
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(Ok(f)) => {
                pending.insert(f.index, f);
            }
            Ok(Err(e)) => {
                failure = Some(e);
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        while let Some(f) = pending.remove(&(start + added)) {
            let mut info = f.info;
            info.insert(
                "policy".into(),
                serde_json::json!(args.policy.describe(args.greedy)),
            );
            writer.append(&f.episode, Some(f.seed), info)?;
            added += 1;
            added_steps += f.episode.steps() as u64;
            if done(added, added_steps) {
                break;
            }
        }
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "{:.0} env steps/s",
            live_steps.load(Ordering::Relaxed) as f64 / secs
        ));
        bar.set_position(if args.episodes.is_some() {
            added as u64
        } else {
            added_steps
        });
    }
    stop.store(true, Ordering::SeqCst);
    drop(rx);
    for h in handles {
        let _ = h.join();
    }
    bar.finish_and_clear();
    if let Some(e) = failure {
        return Err(e.context(format!(
            "collection stopped; the {added} episodes written before the error are kept in {}",
            args.out.display()
        )));
    }
    let summary = Summary {
        episodes: added,
        steps: added_steps,
        total_episodes: writer.next_index(),
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::info!(
        "added {} episodes ({} steps, {:.0} steps/s) to {}; it now holds {} episodes",
        summary.episodes,
        summary.steps,
        summary.steps as f64 / summary.seconds.max(1e-9),
        args.out.display(),
        summary.total_episodes
    );
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn episode_seeds_are_31_bit_and_distinct() {
        let seeds: std::collections::HashSet<u64> = (0..1000).map(|i| episode_seed(0, i)).collect();
        assert_eq!(seeds.len(), 1000);
        assert!(seeds.iter().all(|s| *s < 1 << 31));
        assert_ne!(episode_seed(0, 5), episode_seed(1, 5));
    }
}
