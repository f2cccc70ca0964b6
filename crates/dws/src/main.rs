//! `dws`: the command-line program. Each subcommand lives in `commands/`; libraries hold
//! the work (envs, data, assets), this crate parses arguments, reports progress and
//! writes results.

mod commands;
mod device;
mod media;
mod plot;
mod progress;
mod report;

use clap::{Parser, Subcommand};

/// Large blocks (tensors) on 64-byte boundaries, as PyTorch's CPU tensors are, so the
/// kernels' vector loads do not straddle cache lines (`dws_kernels::alloc`).
#[global_allocator]
static ALLOC: dws_kernels::alloc::Aligned = dws_kernels::alloc::Aligned;

/// dws: Dynamic World Simulation — collect data from games and robots, turn video models
/// into action-conditioned world simulators, evaluate them, play them, train agents in them.
///
/// Start with `dws quickstart`. Third-party files (Procgen's library, metric weights) are
/// fetched with pip on first use into $DWS_CACHE_DIR (default ~/.cache/dws).
#[derive(Parser)]
#[command(name = "dws", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the main job end to end on small defaults and say what it made.
    Quickstart(commands::quickstart::Args),
    /// Collect episodes from an environment into a dataset directory.
    Collect(commands::collect::Args),
    /// Train the action-free base video model on one or more datasets.
    Pretrain(commands::world::PretrainArgs),
    /// Turn a base model into a world simulator with DWS (action module, action
    /// embedding, motion-reinforced loss) on a target dataset.
    Finetune(commands::world::FinetuneArgs),
    /// Roll a model out on a dataset episode; GIF of ground truth | prediction.
    Predict(commands::predict::PredictArgs),
    /// Drive a world simulator from the browser, beside the real environment.
    Play(commands::play::PlayArgs),
    /// Train an agent with PPO in a real environment (learning curve beside the random
    /// policy's return).
    Ppo(commands::ppo::PpoArgs),
    /// Model-based RL: PPO on real and imagined rollouts of a DWS world simulator
    /// fine-tuned as it goes, imagination started from prioritized (or uniform) states.
    Mbrl(commands::mbrl::MbrlArgs),
    /// Return of trained agents (`dws ppo` / `dws mbrl` runs) over many real episodes;
    /// writes RUN/score.json, which `dws compare` shows.
    Score(commands::score::ScoreArgs),
    /// Imagine transitions with a world simulator from a dataset's states; writes them as
    /// an episode dataset marked imagined (offline-RL augmentation).
    Imagine(commands::imagine::ImagineArgs),
    /// Offline RL (BC, CQL, IQL) from recorded and imagined transitions, evaluated in the
    /// real env on training and unseen levels.
    Offline(commands::offline::OfflineArgs),
    /// The VQ frame tokenizer of the autoregressive backbone: train it, score it.
    #[command(subcommand)]
    Tokenizer(commands::tokenizer::Command),
    /// Score a model on held-out clips (PSNR, SSIM, LPIPS, FVD) beside the repeat-last-frame
    /// reference; writes metrics.json, plots, GIFs and an HTML report.
    Eval(commands::eval::EvalArgs),
    /// Tabulate several evals (ablations), offline-RL runs (Table 2) or agents (`dws ppo`
    /// and `dws mbrl` runs, grouped over seeds) side by side.
    Compare(commands::eval::CompareArgs),
    /// PSNR, SSIM, LPIPS and FVD of your own images and videos (PNG, JPEG, GIF, frame
    /// folders, npz/safetensors arrays, MP4 with ffmpeg).
    #[command(subcommand)]
    Metrics(commands::metrics::Command),
    /// Inspect, preview and export episode datasets.
    #[command(subcommand)]
    Dataset(commands::dataset::Command),
    /// List the environments and their actions.
    Envs(commands::envs::Args),
    /// Fetch and list third-party files (pinned, verified).
    #[command(subcommand)]
    Assets(commands::assets::Command),
    /// Throughput benchmarks, printed as JSON lines.
    #[command(subcommand)]
    Bench(commands::bench::Command),
}

/// glibc hands allocations above 128 KiB straight to the kernel (mmap) and returns them
/// on free, so every tensor-sized buffer of burn's CPU backend comes back as fresh pages
/// that fault in and are zeroed on first touch. Keeping them in the heap lets freed
/// tensors be reused (a backward pass of an element-wise op on [8, 256, 768]: 5.7 ms →
/// 0.4 ms). `DWS_MALLOPT=0` keeps glibc's defaults.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var("DWS_MALLOPT").as_deref() != Ok("0") {
        // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}

/// Rust ignores SIGPIPE, so `dws compare ... | head` would panic on the closed pipe;
/// the default action ends the program quietly, like other command-line tools. Not for
/// `dws play` and `dws bench` (which runs play's server): a closed connection must not
/// end a server.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: resets one signal's disposition; called before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() {
    tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DWS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Play(_) | Command::Bench(_)) {
        default_sigpipe();
    }
    // Servers and their clients (`play`, `bench play`) and `collect`'s environment
    // workers block threads for long spells, so they keep the main thread; the rest do
    // their tensor work on a pool thread.
    let on_pool = !matches!(
        cli.command,
        Command::Play(_)
            | Command::Collect(_)
            | Command::Bench(commands::bench::Command::Play { .. })
    );
    let result = if on_pool {
        on_kernel_pool(move || run(cli.command))
    } else {
        run(cli.command)
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Stack of each of rayon's threads: a command runs on one (see [`on_kernel_pool`]),
/// so it gets what the main thread has and more.
const POOL_STACK: usize = 32 << 20;

/// Runs `f` on a thread of rayon's global pool (the pool every kernel splits its work
/// over), and waits for it.
///
/// A parallel operation started from a thread outside the pool hands its work to the
/// pool and sleeps until a pool thread wakes it: on a 2-core machine about 10 µs per
/// operation, a third of a softmax over [64, 1024]. Started from a pool thread, it does
/// its own part at once and the other threads take theirs, as PyTorch's calling thread
/// does with its OpenMP team: [64, 1024] softmax forward then took 14 µs instead of 20.
fn on_kernel_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    // Fails only if the pool exists already (it does not: nothing ran before).
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(POOL_STACK)
        .build_global();
    rayon::scope(|_| f())
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Quickstart(a) => commands::quickstart::run(a),
        Command::Collect(a) => commands::collect::run(a).map(|_| ()),
        Command::Pretrain(a) => commands::world::pretrain(a),
        Command::Finetune(a) => commands::world::finetune(a),
        Command::Predict(a) => commands::predict::predict(a).map(|_| ()),
        Command::Play(a) => commands::play::play(a),
        Command::Ppo(a) => commands::ppo::ppo(a).map(|_| ()),
        Command::Mbrl(a) => commands::mbrl::mbrl(a).map(|_| ()),
        Command::Imagine(a) => commands::imagine::imagine(a).map(|_| ()),
        Command::Score(a) => commands::score::score(a).map(|_| ()),
        Command::Offline(a) => commands::offline::offline(a).map(|_| ()),
        Command::Tokenizer(c) => commands::tokenizer::run(c),
        Command::Eval(a) => commands::eval::eval(a).map(|_| ()),
        Command::Compare(a) => commands::eval::compare(a).map(|_| ()),
        Command::Metrics(c) => commands::metrics::run(c),
        Command::Dataset(c) => commands::dataset::run(c),
        Command::Envs(a) => commands::envs::run(a),
        Command::Assets(c) => commands::assets::run(c),
        Command::Bench(c) => commands::bench::run(c),
    }
}
