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
}

/// Prints one measurement.
pub fn emit(bench: &str, value: f64, unit: &str) {
    println!(
        "{}",
        serde_json::json!({"bench": bench, "value": (value * 10.0).round() / 10.0, "unit": unit})
    );
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
