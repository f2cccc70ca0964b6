//! `dws play`: drive a world simulator from the browser, beside the real environment.
//!
//! A local web server (axum) serves one self-contained page (`play.html`) and a WebSocket
//! per open tab. The world model steps on one worker thread that batches the requests of
//! all tabs into one model call; a tab's real environment steps in its connection task.
//! Each tab starts from the first frames of a dataset episode (the model's context
//! window), and the real environment is reset with that episode's seed and replays its
//! recorded actions up to the same frame, so both panes start from the same state.
//!
//! Protocol (JSON text from the page, one message at a time):
//! `{"type":"reset"}` (optional `"episode": N`), `{"type":"act","action":3}` or
//! `{"type":"act","action":[0.5,-0.2]}`, `{"type":"steps","value":4}`,
//! `{"type":"record","on":true|false}`. The server answers `hello` once, then per reset or
//! step a JSON `frame` message followed by a binary message with the pixels (tag 1: flags,
//! height, width, then the model's RGB frame and/or the real one), `error` messages for bad
//! input, and a binary GIF (tag 2) when a recording stops. Messages over 4 KiB close the
//! connection; so do 100 bad messages on one connection.

use crate::device::{dispatch, DeviceArg, Job};
use anyhow::{bail, ensure, Context, Result};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use dws_data::{ActionSpace, Actions, Dataset};
use dws_envs::{Action, Env, EnvConfig};
use dws_models::embedders::ActionBatch;
use dws_models::flow::{frames_to_tensor, sample_frames, tensor_to_frames, FlowConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::Instant;
use tokio::sync::{oneshot, Semaphore};

/// The page, self-contained (no external scripts, styles or fonts).
const PAGE: &str = include_str!("play.html");
/// Largest message accepted from a page; larger ones close the connection.
pub const MAX_MESSAGE: usize = 4096;
/// Bad messages tolerated on one connection before it is closed.
pub const MAX_BAD: usize = 100;
/// Frames kept by one recording (older ones are dropped).
const MAX_RECORD: usize = 600;
/// Largest sampler step count a page may ask for.
const MAX_STEPS: usize = 64;

#[derive(clap::Args, Clone, Debug)]
pub struct PlayArgs {
    /// A fine-tuned run directory or checkpoint (the world simulator to drive).
    #[arg(long, required_unless_present = "real_only")]
    pub ckpt: Option<PathBuf>,
    /// Dataset whose episodes give the start frames (default: the dataset the run was
    /// fine-tuned on).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Address to listen on. The default serves this machine only; `0.0.0.0` serves
    /// everyone who can reach it (a warning is printed).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Leave the real environment out (by default it runs beside the model whenever the
    /// dataset's environment can be created here).
    #[arg(long, conflicts_with = "real_only")]
    pub no_real: bool,
    /// Play the real environment alone, no model (needs --env).
    #[arg(long, requires = "env", conflicts_with_all = ["ckpt", "data"])]
    pub real_only: bool,
    /// Environment of --real-only: procgen:<game>, push, atari:<game> (`dws envs`).
    #[arg(long)]
    pub env: Option<String>,
    /// Env options of --real-only, key=value pairs (`dws envs ID` lists them).
    #[arg(long, default_value = "")]
    pub env_opts: String,
    /// Most tabs served at once; more get "server full".
    #[arg(long, default_value_t = 8)]
    pub max_sessions: usize,
    /// Euler steps per frame a tab starts with (default: the run's config; each tab can
    /// change it).
    #[arg(long)]
    pub sample_steps: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceArg,
}

/// One frame asked of the model.
struct StepRequest {
    /// The last `k` frames, `[k, H, W, 3]`.
    frames: Vec<u8>,
    k: usize,
    /// The `k - 1` actions between those frames and the one into the new frame.
    actions: Actions,
    steps: usize,
    reply: oneshot::Sender<Result<StepReply, String>>,
}

struct StepReply {
    frame: Vec<u8>,
    /// Time of the model call this frame came from, and how many tabs shared it.
    ms: f64,
    batch: usize,
}

/// The model side of the server: a queue into the worker thread.
struct Model {
    tx: mpsc::Sender<StepRequest>,
    /// Frames of context per step (the training window minus the new frame).
    context: usize,
    sample_steps: usize,
    ckpt: PathBuf,
}

/// What every connection shares.
struct Shared {
    env_id: String,
    space: ActionSpace,
    templates: Vec<String>,
    frame_shape: [usize; 3],
    model: Option<Model>,
    /// Start episodes (those long enough for the model's context).
    dataset: Option<Dataset>,
    starts: Vec<usize>,
    /// The real environment's config, when it can run here.
    real: Option<EnvConfig>,
    /// Why the real pane is off, shown on the page.
    real_note: Option<String>,
    sessions: Semaphore,
    max_sessions: usize,
    seed: u64,
}

pub fn play(a: PlayArgs) -> Result<()> {
    run_server(a, None)
}

/// Where a background server tells its address (or why it could not start).
type Ready = mpsc::Sender<Result<std::net::SocketAddr, String>>;

/// Starts a server on a background thread (for `dws bench play`); returns its address
/// once it listens.
pub fn spawn(a: PlayArgs) -> Result<std::net::SocketAddr> {
    let (tx, rx) = mpsc::channel();
    let ready = tx.clone();
    std::thread::Builder::new()
        .name("dws-play-server".into())
        .spawn(move || {
            if let Err(e) = run_server(a, Some(ready)) {
                let _ = tx.send(Err(format!("{e:#}")));
            }
        })?;
    rx.recv()
        .context("the play server stopped before listening")?
        .map_err(anyhow::Error::msg)
}

fn run_server(a: PlayArgs, ready: Option<Ready>) -> Result<()> {
    ensure!(a.max_sessions >= 1, "--max-sessions must be at least 1");
    if a.real_only {
        let shared = real_only_shared(&a)?;
        return serve(a, shared, ready);
    }
    dispatch(a.device, PlayJob(a, ready))
}

struct PlayJob(PlayArgs, Option<Ready>);

impl Job for PlayJob {
    type Out = ();
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<()> {
        let shared = model_shared::<B::InnerBackend>(&self.0, device)?;
        serve(self.0, shared, self.1)
    }
}

fn real_only_shared(a: &PlayArgs) -> Result<Shared> {
    let id = a.env.as_deref().context("--real-only needs --env")?;
    let opts = dws_envs::config::parse_options(&a.env_opts).map_err(anyhow::Error::msg)?;
    let config = EnvConfig::parse(id, &opts)?;
    let env = dws_envs::make(&config)?;
    let spec = env.spec().clone();
    Ok(Shared {
        env_id: config.id(),
        space: match spec.action_space {
            dws_envs::ActionSpace::Discrete { n } => ActionSpace::Discrete { n },
            dws_envs::ActionSpace::Continuous { dim, low, high } => {
                ActionSpace::Continuous { dim, low, high }
            }
        },
        templates: spec.action_templates,
        frame_shape: spec.frame_shape,
        model: None,
        dataset: None,
        starts: Vec::new(),
        real: Some(config),
        real_note: None,
        sessions: Semaphore::new(a.max_sessions),
        max_sessions: a.max_sessions,
        seed: a.seed,
    })
}

fn model_shared<B: Backend>(a: &PlayArgs, device: B::Device) -> Result<Shared> {
    let ckpt = a
        .ckpt
        .clone()
        .context("--ckpt is needed (or --real-only)")?;
    let run = super::world::run_of(&ckpt);
    let mut cfg = super::world::RunConfig::read(&run)?;
    super::world::override_sampling(&mut cfg, a.sample_steps, None)?;
    ensure!(
        cfg.flow.sample_steps <= MAX_STEPS,
        "--sample-steps must be at most {MAX_STEPS}"
    );
    if cfg.dws.is_none() {
        bail!(
            "{} is an action-free model (pretrained, not fine-tuned with DWS): keys would \
             do nothing. Play a `dws finetune` run.",
            run.display()
        );
    }
    let data = match &a.data {
        Some(d) => d.clone(),
        None => cfg
            .data
            .last()
            .cloned()
            .with_context(|| format!("{} names no dataset; pass --data", run.display()))?,
    };
    let ds = Dataset::open(&data).with_context(|| format!("opening dataset {}", data.display()))?;
    let header = ds.header().clone();
    let window = cfg.train.clip_len.min(cfg.model.max_frames).max(2);
    let context = window - 1;
    let starts: Vec<usize> = ds
        .manifest()
        .episodes
        .iter()
        .enumerate()
        .filter(|(_, e)| e.steps + 1 >= context)
        .map(|(i, _)| i)
        .collect();
    ensure!(
        !starts.is_empty(),
        "no episode of {} has the {context} frames the model takes as context",
        data.display()
    );
    let [h, w, c] = header.frame_shape;
    ensure!(
        c == 3 && h == cfg.model.image_size && w == cfg.model.image_size,
        "{} holds {h}x{w}x{c} frames; the model takes {s}x{s}x3",
        data.display(),
        s = cfg.model.image_size
    );
    let (real, real_note) = if a.no_real {
        (None, Some("left out (--no-real)".to_string()))
    } else {
        match real_env_config(&header) {
            Ok(c) => (Some(c), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        }
    };
    let flow = cfg.flow;
    let (tx, rx) = mpsc::channel::<StepRequest>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
    let max_batch = a.max_sessions;
    let ckpt_for_worker = ckpt.clone();
    std::thread::Builder::new()
        .name("dws-play-model".into())
        .spawn(move || {
            let world = match super::world::load_world::<B>(&ckpt_for_worker, &device) {
                Ok((_, world, _)) => {
                    let _ = ready_tx.send(Ok(()));
                    world
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            model_worker(world, flow, [h, w, c], rx, max_batch, device)
        })?;
    ready_rx
        .recv()
        .context("the model worker stopped while loading")??;
    Ok(Shared {
        env_id: header.env_id.clone(),
        space: header.action_space.clone(),
        templates: header.action_templates.clone(),
        frame_shape: header.frame_shape,
        model: Some(Model {
            tx,
            context,
            sample_steps: cfg.flow.sample_steps,
            ckpt,
        }),
        dataset: Some(ds),
        starts,
        real,
        real_note,
        sessions: Semaphore::new(a.max_sessions),
        max_sessions: a.max_sessions,
        seed: a.seed,
    })
}

/// The dataset's environment, if it can be created in this build.
fn real_env_config(header: &dws_data::DatasetHeader) -> Result<EnvConfig> {
    let config: EnvConfig = serde_json::from_value(header.env_config.clone())
        .with_context(|| format!("`{}` is not an environment dws can run", header.env_id))?;
    dws_envs::make(&config)?;
    Ok(config)
}

/// Answers step requests until every sender is gone. Requests waiting together are
/// stepped in one model call per (context length, step count).
fn model_worker<B: Backend>(
    world: dws_models::flow::WorldModel<B>,
    flow: FlowConfig,
    [h, w, c]: [usize; 3],
    rx: mpsc::Receiver<StepRequest>,
    max_batch: usize,
    device: B::Device,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(0x9e3779b97f4a7c15);
    while let Ok(first) = rx.recv() {
        let mut queue = vec![first];
        while queue.len() < max_batch {
            match rx.try_recv() {
                Ok(r) => queue.push(r),
                Err(_) => break,
            }
        }
        while !queue.is_empty() {
            let (k, steps) = (queue[0].k, queue[0].steps);
            let (group, rest): (Vec<_>, Vec<_>) = queue
                .into_iter()
                .partition(|r| r.k == k && r.steps == steps);
            queue = rest;
            let started = Instant::now();
            let b = group.len();
            let frames: Vec<u8> = group
                .iter()
                .flat_map(|r| r.frames.iter().copied())
                .collect();
            let ctx = frames_to_tensor::<B>(&frames, [b, k, h, w, c], &device);
            let actions = action_batch::<B>(group.iter().map(|r| &r.actions), b, k, &device);
            let cond = world.cond(Some(&actions));
            let cfg = FlowConfig {
                sample_steps: steps,
                ..flow
            };
            let next = sample_frames(&world.dit, ctx, 1, cond, &cfg, &mut rng);
            let out = tensor_to_frames(next);
            let ms = started.elapsed().as_secs_f64() * 1e3;
            let f = h * w * c;
            for (i, r) in group.into_iter().enumerate() {
                let _ = r.reply.send(Ok(StepReply {
                    frame: out[i * f..(i + 1) * f].to_vec(),
                    ms,
                    batch: b,
                }));
            }
        }
    }
}

fn action_batch<'a, B: Backend>(
    actions: impl Iterator<Item = &'a Actions>,
    b: usize,
    n: usize,
    device: &B::Device,
) -> ActionBatch<B> {
    let mut ids = Vec::new();
    let mut vals = Vec::new();
    let mut dim = 0;
    for a in actions {
        match a {
            Actions::Discrete(v) => ids.extend(v.iter().map(|&x| x as i64)),
            Actions::Continuous { dim: d, data } => {
                dim = *d;
                vals.extend_from_slice(data);
            }
        }
    }
    if dim == 0 {
        ActionBatch::Discrete(Tensor::from_data(TensorData::new(ids, [b, n]), device))
    } else {
        ActionBatch::Continuous(Tensor::from_data(
            TensorData::new(vals, [b, n, dim]),
            device,
        ))
    }
}

fn serve(a: PlayArgs, shared: Shared, ready: Option<Ready>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let local = listener.local_addr()?;
        if !local.ip().is_loopback() {
            eprintln!(
                "warning: serving on {local}, which other machines may reach: anyone who \
                 can open it drives this model and uses this machine's CPU or GPU"
            );
        }
        let what = match (&shared.model, &shared.real) {
            (Some(m), Some(_)) => format!("{} beside the real {}", m.ckpt.display(), shared.env_id),
            (Some(m), None) => format!(
                "{} (no real env: {})",
                m.ckpt.display(),
                shared.real_note.as_deref().unwrap_or("-")
            ),
            (None, _) => format!("the real {} alone", shared.env_id),
        };
        match ready {
            Some(tx) => {
                let _ = tx.send(Ok(local));
            }
            None => {
                println!("dws play: {what}");
                println!("dws play: open http://{local}/ (Ctrl-C stops)");
                use std::io::Write;
                std::io::stdout().flush()?;
            }
        }
        let app = Router::new()
            .route("/", get(page))
            .route("/ws", get(socket))
            .with_state(Arc::new(shared));
        // Every frame is two small writes (its JSON, then its pixels): without
        // TCP_NODELAY the second waits for the page's delayed acknowledgement (~40 ms).
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!("TCP_NODELAY: {e}");
            }
        });
        axum::serve(listener, app).await?;
        Ok(())
    })
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn socket(ws: WebSocketUpgrade, State(shared): State<Arc<Shared>>) -> Response {
    ws.max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            if let Err(e) = session(socket, shared).await {
                tracing::debug!("session ended: {e:#}");
            }
        })
        .into_response()
}

/// What the page sends.
#[derive(Deserialize, Debug)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum ClientMsg {
    Reset {
        #[serde(default)]
        episode: Option<usize>,
    },
    Act {
        action: Value,
    },
    Steps {
        value: usize,
    },
    Record {
        on: bool,
    },
}

/// One tab.
struct Session {
    shared: Arc<Shared>,
    rng: ChaCha8Rng,
    steps: usize,
    /// The model's last `context` frames and the actions between them.
    history: VecDeque<Vec<u8>>,
    between: VecDeque<Action>,
    env: Option<Box<dyn Env>>,
    real_done: bool,
    /// Whether the real pane started from the same state as the model's.
    real_synced: bool,
    episode: Option<usize>,
    t: usize,
    /// Running sum of the per-frame PSNR between the panes, and its count.
    psnr_sum: f64,
    psnr_n: usize,
    recording: Option<VecDeque<Vec<u8>>>,
}

async fn send_json(ws: &mut WebSocket, v: Value) -> Result<()> {
    ws.send(Message::text(v.to_string())).await?;
    Ok(())
}

async fn send_error(ws: &mut WebSocket, message: impl Into<String>) -> Result<()> {
    send_json(ws, json!({"type": "error", "message": message.into()})).await
}

async fn session(mut ws: WebSocket, shared: Arc<Shared>) -> Result<()> {
    let Ok(_permit) = shared.sessions.try_acquire() else {
        send_error(
            &mut ws,
            format!(
                "server full: {} tabs are open (dws play --max-sessions)",
                shared.max_sessions
            ),
        )
        .await?;
        ws.send(Message::Close(Some(CloseFrame {
            code: 1013,
            reason: "server full".into(),
        })))
        .await?;
        return Ok(());
    };
    let seed = shared.seed ^ rand::thread_rng().gen::<u64>();
    let mut s = Session {
        steps: shared.model.as_ref().map_or(0, |m| m.sample_steps),
        shared: shared.clone(),
        rng: ChaCha8Rng::seed_from_u64(seed),
        history: VecDeque::new(),
        between: VecDeque::new(),
        env: None,
        real_done: false,
        real_synced: false,
        episode: None,
        t: 0,
        psnr_sum: 0.0,
        psnr_n: 0,
        recording: None,
    };
    send_json(&mut ws, hello(&shared)).await?;
    let mut bad = 0usize;
    while let Some(msg) = ws.recv().await {
        let text = match msg? {
            Message::Text(t) => t,
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Binary(_) => {
                bad += 1;
                send_error(&mut ws, "binary messages are not accepted; send JSON text").await?;
                if bad >= MAX_BAD {
                    break;
                }
                continue;
            }
        };
        let outcome = match serde_json::from_str::<ClientMsg>(text.as_str()) {
            Ok(m) => s.handle(m, &mut ws).await,
            Err(e) => Err(anyhow::anyhow!("bad message: {e}")),
        };
        if let Err(e) = outcome {
            bad += 1;
            send_error(&mut ws, format!("{e:#}")).await?;
            if bad >= MAX_BAD {
                ws.send(Message::Close(Some(CloseFrame {
                    code: 1008,
                    reason: "too many bad messages".into(),
                })))
                .await?;
                break;
            }
        }
    }
    Ok(())
}

fn hello(shared: &Shared) -> Value {
    let (mode, context, steps, ckpt) = match &shared.model {
        Some(m) => (
            if shared.real.is_some() {
                "sim+real"
            } else {
                "sim"
            },
            m.context,
            m.sample_steps,
            m.ckpt.display().to_string(),
        ),
        None => ("real", 0, 0, String::new()),
    };
    json!({
        "type": "hello",
        "env_id": shared.env_id,
        "mode": mode,
        "action_space": shared.space,
        "templates": shared.templates,
        "keymap": keymap(&shared.env_id, &shared.space, &shared.templates),
        "axes": axes(&shared.env_id),
        "frame_shape": shared.frame_shape,
        "context": context,
        "sample_steps": steps,
        "max_steps": MAX_STEPS,
        "ckpt": ckpt,
        "real_note": shared.real_note,
        "max_record": MAX_RECORD,
        "episodes": shared.starts.len(),
    })
}

/// Discrete actions for the page's keys: one `[dx, dy, fire, action]` per combination of
/// left/right (dx), down/up (dy) and fire, where the env has such an action.
pub fn keymap(env_id: &str, space: &ActionSpace, templates: &[String]) -> Vec<[i64; 4]> {
    let ActionSpace::Discrete { n } = space else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for dx in -1i64..=1 {
        for dy in -1i64..=1 {
            for fire in 0..=1i64 {
                let action = if env_id.starts_with("procgen:") && *n == 15 {
                    // Procgen's combos: index (dx + 1) * 3 + (dy + 1); D (index 9) is the
                    // first special key (fire, throw) and has no moving variant.
                    Some(if fire == 1 {
                        9
                    } else {
                        (dx + 1) * 3 + (dy + 1)
                    })
                } else {
                    phrase_action(dx, dy, fire == 1, templates)
                };
                if let Some(a) = action.filter(|&a| (a as usize) < *n) {
                    out.push([dx, dy, fire, a]);
                }
            }
        }
    }
    out
}

/// The action whose template says what the keys do (Atari's phrasing): "move up and
/// left", "fire while moving down", "fire", "do nothing".
fn phrase_action(dx: i64, dy: i64, fire: bool, templates: &[String]) -> Option<i64> {
    let vertical = match dy {
        1 => Some("up"),
        -1 => Some("down"),
        _ => None,
    };
    let horizontal = match dx {
        1 => Some("right"),
        -1 => Some("left"),
        _ => None,
    };
    let dir = match (vertical, horizontal) {
        (Some(v), Some(h)) => Some(format!("{v} and {h}")),
        (Some(v), None) => Some(v.to_string()),
        (None, Some(h)) => Some(h.to_string()),
        (None, None) => None,
    };
    let find = |p: &str| templates.iter().position(|t| t == p).map(|i| i as i64);
    let mut tries = Vec::new();
    match (&dir, fire) {
        (Some(d), true) => {
            tries.push(format!("fire while moving {d}"));
            tries.push(format!("move {d}"));
        }
        (Some(d), false) => tries.push(format!("move {d}")),
        (None, true) => tries.push("fire".into()),
        (None, false) => {}
    }
    tries.push("do nothing".into());
    tries.iter().find_map(|p| find(p))
}

/// Continuous actions for the arrow keys: `[[dim, sign] for right, [dim, sign] for up]`.
/// In the pushing task image y grows downwards with the action's second component.
fn axes(env_id: &str) -> Value {
    if env_id == "push" {
        json!([[0, 1], [1, -1]])
    } else {
        json!([[0, 1], [1, 1]])
    }
}

/// Reads an action from the page and checks it against the action space.
pub fn parse_action(v: &Value, space: &ActionSpace) -> Result<Action> {
    let action = match space {
        ActionSpace::Discrete { n } => {
            let id = v
                .as_u64()
                .with_context(|| format!("a discrete action is an id in 0..{n}; got {v}"))?;
            ensure!(
                (id as usize) < *n,
                "unknown action {id}: this env has actions 0..{n}"
            );
            Action::Discrete(id as u32)
        }
        ActionSpace::Continuous { dim, low, high } => {
            let arr = v.as_array().with_context(|| {
                format!("a continuous action is an array of {dim} numbers; got {v}")
            })?;
            ensure!(
                arr.len() == *dim,
                "a continuous action has {dim} numbers; got {}",
                arr.len()
            );
            let vals: Option<Vec<f32>> = arr.iter().map(|x| x.as_f64().map(|f| f as f32)).collect();
            let vals = vals.with_context(|| format!("action values must be numbers; got {v}"))?;
            ensure!(
                vals.iter()
                    .all(|x| x.is_finite() && *x >= *low && *x <= *high),
                "action values must lie in [{low}, {high}]; got {v}"
            );
            Action::Continuous(vals)
        }
    };
    Ok(action)
}

fn to_actions(space: &ActionSpace, list: impl Iterator<Item = Action>) -> Actions {
    match space {
        ActionSpace::Discrete { .. } => Actions::Discrete(
            list.map(|a| match a {
                Action::Discrete(i) => i,
                Action::Continuous(_) => unreachable!("checked against the space"),
            })
            .collect(),
        ),
        ActionSpace::Continuous { dim, .. } => Actions::Continuous {
            dim: *dim,
            data: list
                .flat_map(|a| match a {
                    Action::Continuous(v) => v,
                    Action::Discrete(_) => unreachable!("checked against the space"),
                })
                .collect(),
        },
    }
}

fn action_json(a: &Action) -> Value {
    match a {
        Action::Discrete(i) => json!(i),
        Action::Continuous(v) => json!(v),
    }
}

impl Session {
    async fn handle(&mut self, msg: ClientMsg, ws: &mut WebSocket) -> Result<()> {
        match msg {
            ClientMsg::Reset { episode } => {
                self.reset(episode)?;
                self.send_frame(ws, None, StepInfo::default()).await
            }
            ClientMsg::Act { action } => {
                let action = parse_action(&action, &self.shared.space)?;
                ensure!(
                    !self.history.is_empty() || self.env.is_some(),
                    "send a reset first"
                );
                self.step(action, ws).await
            }
            ClientMsg::Steps { value } => {
                ensure!(
                    self.shared.model.is_some(),
                    "no model to set the step count of"
                );
                ensure!(
                    (1..=MAX_STEPS).contains(&value),
                    "the step count must be in 1..={MAX_STEPS}; got {value}"
                );
                self.steps = value;
                send_json(ws, json!({"type": "steps", "value": value})).await
            }
            ClientMsg::Record { on } => {
                if on {
                    self.recording = Some(VecDeque::new());
                    send_json(ws, json!({"type": "recording", "on": true})).await
                } else {
                    let mut frames = self.recording.take().context("no recording is running")?;
                    ensure!(!frames.is_empty(), "the recording holds no frames");
                    let n = frames.len();
                    let [h, w, _] = self.shared.frame_shape;
                    let panes = self.panes();
                    let gif = tokio::task::spawn_blocking(move || {
                        encode_gif(frames.make_contiguous(), h, w * panes)
                    })
                    .await??;
                    send_json(
                        ws,
                        json!({"type": "recording", "on": false, "frames": n, "bytes": gif.len()}),
                    )
                    .await?;
                    let mut msg = vec![2u8];
                    msg.extend_from_slice(&gif);
                    ws.send(Message::binary(msg)).await?;
                    Ok(())
                }
            }
        }
    }

    fn panes(&self) -> usize {
        usize::from(self.shared.model.is_some()) + usize::from(self.shared.real.is_some())
    }

    /// Starts over from a dataset episode's first frames (or a fresh real episode).
    fn reset(&mut self, episode: Option<usize>) -> Result<()> {
        let shared = self.shared.clone();
        self.t = 0;
        self.psnr_sum = 0.0;
        self.psnr_n = 0;
        self.real_done = false;
        self.real_synced = false;
        self.history.clear();
        self.between.clear();
        let Some(model) = &shared.model else {
            // The real environment alone: a new episode from a random seed.
            ensure!(
                episode.is_none(),
                "--real-only plays fresh episodes: there are no dataset episodes to pick"
            );
            let config = shared.real.as_ref().context("nothing to play")?;
            if self.env.is_none() {
                self.env = Some(dws_envs::make(config)?);
            }
            let seed = self.rng.gen();
            self.env.as_mut().expect("made above").reset(Some(seed))?;
            self.episode = None;
            return Ok(());
        };
        let ds = shared.dataset.as_ref().context("no dataset")?;
        let index = match episode {
            Some(e) => {
                ensure!(
                    e < ds.len(),
                    "episode {e} does not exist: the dataset has {}",
                    ds.len()
                );
                ensure!(
                    shared.starts.contains(&e),
                    "episode {e} is shorter than the model's {} context frames",
                    model.context
                );
                e
            }
            None => shared.starts[self.rng.gen_range(0..shared.starts.len())],
        };
        let ep = ds.read_episode(index)?;
        let k = model.context;
        for i in 0..k {
            self.history.push_back(ep.frame(i).to_vec());
        }
        let prefix: Vec<Action> = match &ep.actions {
            Actions::Discrete(ids) => ids[..k - 1].iter().map(|&a| Action::Discrete(a)).collect(),
            Actions::Continuous { dim, data } => data[..(k - 1) * dim]
                .chunks(*dim)
                .map(|c| Action::Continuous(c.to_vec()))
                .collect(),
        };
        self.between = prefix.iter().cloned().collect();
        self.episode = Some(index);
        if let Some(config) = &shared.real {
            let seed = ds.manifest().episodes[index].seed;
            match seed {
                Some(seed) => {
                    if self.env.is_none() {
                        self.env = Some(dws_envs::make(config)?);
                    }
                    let env = self.env.as_mut().expect("made above");
                    env.reset(Some(seed))?;
                    let mut alive = true;
                    for a in &prefix {
                        if env.step(a)?.done() {
                            alive = false;
                            break;
                        }
                    }
                    self.real_done = !alive;
                    self.real_synced = alive && env.obs() == ep.frame(k - 1);
                }
                None => {
                    self.env = None;
                }
            }
        }
        Ok(())
    }

    async fn step(&mut self, action: Action, ws: &mut WebSocket) -> Result<()> {
        let shared = self.shared.clone();
        let mut info = StepInfo::default();
        if let Some(model) = &shared.model {
            ensure!(!self.history.is_empty(), "send a reset first");
            let k = self.history.len();
            let frames: Vec<u8> = self.history.iter().flatten().copied().collect();
            let actions = to_actions(
                &shared.space,
                self.between
                    .iter()
                    .cloned()
                    .chain(std::iter::once(action.clone())),
            );
            let (tx, rx) = oneshot::channel();
            let stopped = || anyhow::anyhow!("the model worker has stopped");
            model
                .tx
                .send(StepRequest {
                    frames,
                    k,
                    actions,
                    steps: self.steps,
                    reply: tx,
                })
                .map_err(|_| stopped())?;
            let reply = rx
                .await
                .map_err(|_| stopped())?
                .map_err(anyhow::Error::msg)?;
            self.history.push_back(reply.frame);
            self.between.push_back(action.clone());
            while self.history.len() > model.context {
                self.history.pop_front();
            }
            while self.between.len() + 1 > self.history.len() {
                self.between.pop_front();
            }
            info.sim_ms = reply.ms;
            info.batch = reply.batch;
        }
        if let Some(env) = self.env.as_mut() {
            if !self.real_done {
                let st = env.step(&action)?;
                self.real_done = st.done();
                info.reward = Some(st.reward);
            }
        }
        self.t += 1;
        self.send_frame(ws, Some(&action), info).await
    }

    /// The JSON state of the current frame, then its pixels.
    async fn send_frame(
        &mut self,
        ws: &mut WebSocket,
        action: Option<&Action>,
        info: StepInfo,
    ) -> Result<()> {
        let sim = self.history.back().cloned();
        let real = self.env.as_ref().map(|e| e.obs().to_vec());
        // The panes are compared on frames where both moved on from the same start.
        let psnr = match (&sim, &real) {
            (Some(s), Some(r)) if info.reward.is_some() && self.real_synced => {
                // One frame: `predict`'s per-frame errors of u8 images.
                let p = super::predict::errors(s, r, s.len()).mean_psnr;
                self.psnr_sum += p.min(100.0);
                self.psnr_n += 1;
                Some(p)
            }
            _ => None,
        };
        let template = match action {
            Some(Action::Discrete(i)) => self.shared.templates.get(*i as usize).cloned(),
            _ => None,
        };
        let round2 = |x: f64| (x * 100.0).round() / 100.0;
        send_json(
            ws,
            json!({
                "type": "frame",
                "t": self.t,
                "episode": self.episode,
                "action": action.map(action_json),
                "template": template,
                "steps": self.steps,
                "sim_ms": round2(info.sim_ms),
                "batch": info.batch,
                "reward": info.reward,
                "real_present": real.is_some(),
                "real_done": self.real_done,
                "real_synced": self.real_synced,
                "psnr": psnr.map(round2),
                "mean_psnr": (self.psnr_n > 0).then(|| round2(self.psnr_sum / self.psnr_n as f64)),
            }),
        )
        .await?;
        let [h, w, _] = self.shared.frame_shape;
        if let Some(rec) = self.recording.as_mut() {
            let panes: Vec<Option<&[u8]>> = [
                self.shared.model.is_some().then_some(sim.as_deref()),
                self.shared.real.is_some().then_some(real.as_deref()),
            ]
            .into_iter()
            .flatten()
            .collect();
            rec.push_back(side_by_side(&panes, h, w));
            while rec.len() > MAX_RECORD {
                rec.pop_front();
            }
        }
        let mut msg = vec![1u8, 0];
        msg.extend_from_slice(&(h as u16).to_le_bytes());
        msg.extend_from_slice(&(w as u16).to_le_bytes());
        if let Some(s) = &sim {
            msg[1] |= 1;
            msg.extend_from_slice(s);
        }
        if let Some(r) = &real {
            msg[1] |= 2;
            msg.extend_from_slice(r);
        }
        ws.send(Message::binary(msg)).await?;
        Ok(())
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct StepInfo {
    /// Time of the model call the frame came from, and the tabs that shared it.
    sim_ms: f64,
    batch: usize,
    /// The real environment's reward, when it stepped.
    reward: Option<f32>,
}

/// The panes of one frame side by side, `[h, w * panes, 3]`; a missing pane is grey.
fn side_by_side(panes: &[Option<&[u8]>], h: usize, w: usize) -> Vec<u8> {
    let width = w * panes.len();
    let mut out = vec![64u8; h * width * 3];
    for (p, pane) in panes.iter().enumerate() {
        let Some(img) = pane else { continue };
        for y in 0..h {
            let src = &img[y * w * 3..(y + 1) * w * 3];
            let d = (y * width + p * w) * 3;
            out[d..d + w * 3].copy_from_slice(src);
        }
    }
    out
}

/// An animated GIF of `[h, w, 3]` frames at twice the size, 10 frames per second.
fn encode_gif(frames: &[Vec<u8>], h: usize, w: usize) -> Result<Vec<u8>> {
    let (h2, w2) = (h * 2, w * 2);
    let mut buf = Vec::new();
    {
        let mut enc = gif::Encoder::new(&mut buf, w2 as u16, h2 as u16, &[])?;
        enc.set_repeat(gif::Repeat::Infinite)?;
        let mut big = vec![0u8; h2 * w2 * 3];
        for f in frames {
            for y in 0..h2 {
                for x in 0..w2 {
                    let s = ((y / 2) * w + x / 2) * 3;
                    let d = (y * w2 + x) * 3;
                    big[d..d + 3].copy_from_slice(&f[s..s + 3]);
                }
            }
            let mut frame = gif::Frame::from_rgb_speed(w2 as u16, h2 as u16, &big, 10);
            frame.delay = 10;
            enc.write_frame(&frame)?;
        }
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn procgen_keys_follow_the_button_order() {
        let space = ActionSpace::Discrete { n: 15 };
        let t = dws_envs::templates::procgen("coinrun");
        let map = keymap("procgen:coinrun", &space, &t);
        let get = |dx, dy, fire| {
            map.iter()
                .find(|m| m[0] == dx && m[1] == dy && m[2] == fire)
                .map(|m| m[3])
        };
        assert_eq!(get(0, 0, 0), Some(4));
        assert_eq!(t[4], "do nothing");
        assert_eq!(get(-1, 0, 0), Some(1));
        assert_eq!(t[1], "move left");
        assert_eq!(get(1, 1, 0), Some(8));
        assert_eq!(t[8], "jump to the right");
        assert_eq!(get(0, 1, 0), Some(5));
        assert_eq!(get(1, 0, 1), Some(9));
    }

    #[test]
    fn atari_keys_are_found_by_phrase() {
        let t: Vec<String> = ["do nothing", "fire", "move right", "move left"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let map = keymap("atari:breakout", &ActionSpace::Discrete { n: 4 }, &t);
        let get = |dx, dy, fire| {
            map.iter()
                .find(|m| m[0] == dx && m[1] == dy && m[2] == fire)
                .map(|m| m[3])
        };
        assert_eq!(get(0, 0, 0), Some(0));
        assert_eq!(get(0, 0, 1), Some(1));
        assert_eq!(get(1, 0, 0), Some(2));
        assert_eq!(get(-1, 0, 1), Some(3), "no moving fire: the move");
        assert_eq!(get(0, 1, 0), Some(0), "no up: nothing");
        let full: Vec<String> = dws_envs::templates::ATARI_ACTIONS
            .iter()
            .map(|s| s.to_string())
            .collect();
        let map = keymap("atari:seaquest", &ActionSpace::Discrete { n: 18 }, &full);
        let a = map
            .iter()
            .find(|m| m[0] == -1 && m[1] == 1 && m[2] == 1)
            .unwrap()[3];
        assert_eq!(full[a as usize], "fire while moving up and left");
    }

    #[test]
    fn actions_are_checked_against_the_space() {
        let d = ActionSpace::Discrete { n: 15 };
        assert_eq!(parse_action(&json!(3), &d).unwrap(), Action::Discrete(3));
        for bad in [
            json!(15),
            json!(-1),
            json!(1.5),
            json!("3"),
            json!([3]),
            json!(null),
        ] {
            assert!(parse_action(&bad, &d).is_err(), "{bad}");
        }
        let c = ActionSpace::Continuous {
            dim: 2,
            low: -1.0,
            high: 1.0,
        };
        assert_eq!(
            parse_action(&json!([0.5, -1]), &c).unwrap(),
            Action::Continuous(vec![0.5, -1.0])
        );
        for bad in [
            json!([0.5]),
            json!([0.5, 2]),
            json!([0.5, "x"]),
            json!(1),
            json!([1, 1, 1]),
        ] {
            assert!(parse_action(&bad, &c).is_err(), "{bad}");
        }
    }

    #[test]
    fn panes_sit_side_by_side() {
        let a = vec![10u8; 2 * 2 * 3];
        let b = vec![200u8; 2 * 2 * 3];
        let out = side_by_side(&[Some(&a), None, Some(&b)], 2, 2);
        assert_eq!(out.len(), 2 * 6 * 3);
        let px = |y: usize, x: usize| out[(y * 6 + x) * 3];
        assert_eq!(
            (px(0, 0), px(1, 1), px(0, 2), px(1, 3), px(0, 4), px(1, 5)),
            (10, 10, 64, 64, 200, 200)
        );
        let gif = encode_gif(&[out.clone(), out], 2, 6).unwrap();
        assert_eq!(&gif[..6], b"GIF89a");
    }
}
