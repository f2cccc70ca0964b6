//! `dws dataset import`: episodes from numpy archives, frame folders, videos or the BAIR
//! robot-pushing TFRecords, written as a dws dataset (docs/dataset-format.md).
//!
//! Every source becomes the same raw episode (frames, per-step action rows, optional
//! rewards and flags), which one function checks, aligns and resizes. Episodes are
//! written one at a time (memory bounded by one episode) and listed in the manifest every
//! few seconds; each carries the id of what it came from (`import` in its manifest info),
//! so an interrupted import run again skips what is already there.

use crate::media;
use anyhow::{bail, ensure, Context, Result};
use dws_data::tfrecord::{self, TfRecordReader};
use dws_data::{ActionSpace, Actions, Dataset, DatasetHeader, DatasetWriter, Episode, Manifest};
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    Npz,
    Frames,
    Video,
    Bair,
}

impl SourceKind {
    fn name(self) -> &'static str {
        match self {
            SourceKind::Npz => "npz",
            SourceKind::Frames => "frames",
            SourceKind::Video => "video",
            SourceKind::Bair => "bair",
        }
    }
}

pub const IMPORT_HELP: &str = "\
Sources (--from):
  npz     a folder of .npz files, one per episode (frames u8 [T,H,W,3], actions, optional
          rewards, terminated, truncated: what `dws dataset export-npz` writes; with its
          manifest.json beside them the original header and episode seeds are kept), or
          one .npz holding every episode back to back plus `episode_lengths` (frames per
          episode).
  frames  a folder with one sub-folder per episode of PNG/JPEG frames in file-name order
          (zero-pad numbers: frame_002 sorts before frame_010) and an actions file,
          `actions.csv`/`actions.jsonl` inside it or `<episode>.csv`/`.jsonl` beside it.
  video   a folder of videos (MP4, WebM, AVI, MOV, MKV through ffmpeg; GIF), one per
          episode, each with `<video name>.csv` or `.jsonl` beside it.
  bair    the BAIR robot-pushing TFRecords (softmotion30_44k/{train,test}/*.tfrecords):
          OUT/train and OUT/test are written, 4-d continuous actions.

Actions files: CSV with one row per step (the action's values; a header row may name
columns `reward`, `terminated`, `truncated`, the rest are the action), or JSON lines with
a number, an array, or {\"action\": .., \"reward\": .., \"terminated\": .., \"truncated\": ..}.

Alignment: an episode of T frames has T-1 actions (action i is taken at frame i and
leads to frame i+1) or T actions (the last one leads to no recorded frame and is
dropped). Without flags the last step is marked truncated (the recording stops).

Frames of another size are centre-cropped to a square and resized (bilinear) to
--size x --size. An interrupted import, run again with the same arguments, continues
where it stopped.";

#[derive(clap::Args, Debug)]
#[command(after_long_help = IMPORT_HELP)]
pub struct ImportArgs {
    /// What the source holds: npz, frames, video or bair (see --help).
    #[arg(long)]
    pub from: SourceKind,
    /// The source folder (or one .npz or video file).
    pub src: PathBuf,
    /// The dataset directory to write (created; appended to if it exists).
    #[arg(long)]
    pub out: PathBuf,
    /// discrete:N, continuous:D (bounds -1..1) or continuous:D:LOW:HIGH. Needed for
    /// frames, video and npz without a manifest.
    #[arg(long)]
    pub action_space: Option<String>,
    /// Language templates for discrete actions: a text file, line i the phrase for action i.
    #[arg(long)]
    pub templates: Option<PathBuf>,
    /// Frame size of the dataset (square).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Name recorded as the dataset's environment (default: import:<source name>).
    #[arg(long)]
    pub env_id: Option<String>,
}

pub fn parse_space(s: &str) -> Result<ActionSpace> {
    let bad = || {
        anyhow::anyhow!(
            "--action-space `{s}`: use discrete:N, continuous:D (bounds -1..1) or \
             continuous:D:LOW:HIGH"
        )
    };
    let parts: Vec<&str> = s.split(':').collect();
    let num = |p: &str| p.trim().parse::<f32>().map_err(|_| bad());
    let count = |p: &str| {
        p.trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(bad)
    };
    match parts.as_slice() {
        ["discrete", n] => Ok(ActionSpace::Discrete { n: count(n)? }),
        ["continuous", d] => Ok(ActionSpace::Continuous {
            dim: count(d)?,
            low: -1.0,
            high: 1.0,
        }),
        ["continuous", d, lo, hi] => {
            let (low, high) = (num(lo)?, num(hi)?);
            ensure!(low < high, "--action-space `{s}`: LOW must be below HIGH");
            Ok(ActionSpace::Continuous {
                dim: count(d)?,
                low,
                high,
            })
        }
        _ => Err(bad()),
    }
}

fn read_templates(path: &Path, space: &ActionSpace) -> Result<Vec<String>> {
    let ActionSpace::Discrete { n } = space else {
        bail!("--templates is for discrete actions; this dataset's are continuous");
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines: Vec<&str> = text.lines().map(str::trim).collect();
    while lines.last() == Some(&"") {
        lines.pop();
    }
    if let Some(i) = lines.iter().position(|l| l.is_empty()) {
        bail!(
            "{} line {}: empty template (one phrase per line, line i for action i)",
            path.display(),
            i + 1
        );
    }
    ensure!(
        lines.len() == *n,
        "{}: {} templates for {n} discrete actions (one phrase per line, line i for action i)",
        path.display(),
        lines.len()
    );
    Ok(lines.into_iter().map(String::from).collect())
}

/// An episode as a source gives it, before checks.
#[derive(Debug)]
struct Raw {
    /// `[t, h, w, 3]`.
    frames: Vec<u8>,
    t: usize,
    h: usize,
    w: usize,
    /// Row-major action rows of `width` values.
    actions: Vec<f64>,
    width: usize,
    rewards: Option<Vec<f32>>,
    terminated: Option<Vec<u8>>,
    truncated: Option<Vec<u8>>,
}

/// Centre-crops each frame to a square and resizes it to `size`.
fn fit(frames: Vec<u8>, t: usize, h: usize, w: usize, size: usize) -> Vec<u8> {
    if h == size && w == size {
        return frames;
    }
    let side = h.min(w);
    let (y0, x0) = ((h - side) / 2, (w - side) / 2);
    let per = h * w * 3;
    let mut out = Vec::with_capacity(t * size * size * 3);
    for f in frames.chunks_exact(per) {
        let img = image::RgbImage::from_raw(w as u32, h as u32, f.to_vec()).expect("frame size");
        let crop = image::imageops::crop_imm(&img, x0 as u32, y0 as u32, side as u32, side as u32)
            .to_image();
        let small = image::imageops::resize(
            &crop,
            size as u32,
            size as u32,
            image::imageops::FilterType::Triangle,
        );
        out.extend_from_slice(small.as_raw());
    }
    out
}

/// Checks a raw episode against the dataset's action space and the alignment rule, and
/// makes the episode. `what` names the source in errors.
fn to_episode(raw: Raw, space: &ActionSpace, size: usize, what: &str) -> Result<Episode> {
    let t = raw.t;
    ensure!(t >= 2, "{what}: {t} frame(s); an episode needs at least 2");
    ensure!(
        raw.width > 0 && raw.actions.len().is_multiple_of(raw.width),
        "{what}: the actions are not whole rows of {} values",
        raw.width
    );
    let rows = raw.actions.len() / raw.width;
    ensure!(
        rows == t || rows + 1 == t,
        "{what}: {t} frames and {rows} actions; an episode of T frames needs T-1 actions \
         (action i leads from frame i to frame i+1) or T (the last is dropped)"
    );
    let steps = t - 1;
    for (name, len) in [
        ("rewards", raw.rewards.as_ref().map(Vec::len)),
        ("terminated", raw.terminated.as_ref().map(Vec::len)),
        ("truncated", raw.truncated.as_ref().map(Vec::len)),
    ] {
        if let Some(len) = len {
            ensure!(
                len == rows,
                "{what}: {len} {name} for {rows} actions (one per action)"
            );
        }
    }
    let actions = match space {
        ActionSpace::Discrete { n } => {
            ensure!(
                raw.width == 1,
                "{what}: actions have {} values per step; discrete actions have one",
                raw.width
            );
            let ids = raw.actions[..steps]
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    if v.fract() == 0.0 && v >= 0.0 && v < *n as f64 {
                        Ok(v as u32)
                    } else {
                        bail!("{what}: action {i} is {v}; discrete:{n} actions are integers 0..{n}")
                    }
                })
                .collect::<Result<Vec<u32>>>()?;
            Actions::Discrete(ids)
        }
        ActionSpace::Continuous { dim, low, high } => {
            ensure!(
                raw.width == *dim,
                "{what}: actions have {} values per step; the action space has {dim}",
                raw.width
            );
            let data = &raw.actions[..steps * dim];
            if let Some(i) = data
                .iter()
                .position(|&v| !v.is_finite() || v < *low as f64 || v > *high as f64)
            {
                bail!(
                    "{what}: action {} value {} is {}, outside [{low}, {high}]; give the bounds \
                     with --action-space continuous:{dim}:LOW:HIGH (and a new --out: a \
                     dataset keeps the action space it was made with)",
                    i / dim,
                    i % dim,
                    data[i]
                );
            }
            Actions::Continuous {
                dim: *dim,
                data: data.iter().map(|&v| v as f32).collect(),
            }
        }
    };
    let flags = |v: Option<Vec<u8>>, default_last: u8| -> Vec<u8> {
        match v {
            Some(mut v) => {
                v.truncate(steps);
                v.iter().map(|&b| (b != 0) as u8).collect()
            }
            None => {
                let mut v = vec![0u8; steps];
                v[steps - 1] = default_last;
                v
            }
        }
    };
    let terminated = flags(raw.terminated, 0);
    let no_flags = terminated.iter().all(|&b| b == 0);
    let truncated = flags(raw.truncated, no_flags as u8);
    let mut rewards = raw.rewards.unwrap_or_else(|| vec![0.0; steps]);
    rewards.truncate(steps);
    let ep = Episode {
        frames: fit(raw.frames, t, raw.h, raw.w, size),
        frame_shape: [size, size, 3],
        actions,
        rewards,
        terminated,
        truncated,
    };
    ep.validate().with_context(|| what.to_string())?;
    Ok(ep)
}

// ---------------------------------------------------------------------------------------
// Actions files (frames and video sources).

/// Parses one actions file: CSV or JSON lines, by extension.
fn read_actions_file(path: &Path) -> Result<Raw> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut raw = Raw {
        frames: Vec::new(),
        t: 0,
        h: 0,
        w: 0,
        actions: Vec::new(),
        width: 0,
        rewards: None,
        terminated: None,
        truncated: None,
    };
    let mut rewards = Vec::new();
    let mut terminated = Vec::new();
    let mut truncated = Vec::new();
    let (mut has_r, mut has_te, mut has_tr) = (false, false, false);
    let set_width = |raw: &mut Raw, n: usize, line: usize| -> Result<()> {
        if raw.width == 0 {
            raw.width = n;
        }
        ensure!(
            n == raw.width && n > 0,
            "{} line {line}: {n} action values, earlier lines have {}",
            path.display(),
            raw.width
        );
        Ok(())
    };
    let is_jsonl = media::ext(path) == "jsonl";
    let mut header: Option<Vec<String>> = None;
    for (i, line) in text.lines().enumerate() {
        let ln = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |what: String| anyhow::anyhow!("{} line {ln}: {what}", path.display());
        if is_jsonl {
            let v: Value =
                serde_json::from_str(line).map_err(|e| bad(format!("not JSON ({e})")))?;
            let num = |v: &Value, name: &str| -> Result<f64> {
                v.as_f64()
                    .or_else(|| v.as_bool().map(|b| b as u8 as f64))
                    .ok_or_else(|| bad(format!("`{name}` is {v}, not a number")))
            };
            let action = match &v {
                Value::Object(o) => {
                    if let Some(r) = o.get("reward") {
                        rewards.push(num(r, "reward")? as f32);
                        has_r = true;
                    }
                    if let Some(r) = o.get("terminated") {
                        terminated.push((num(r, "terminated")? != 0.0) as u8);
                        has_te = true;
                    }
                    if let Some(r) = o.get("truncated") {
                        truncated.push((num(r, "truncated")? != 0.0) as u8);
                        has_tr = true;
                    }
                    o.get("action")
                        .ok_or_else(|| bad("an object without `action`".into()))?
                        .clone()
                }
                other => other.clone(),
            };
            let values: Vec<f64> = match &action {
                Value::Array(a) => a.iter().map(|x| num(x, "action")).collect::<Result<_>>()?,
                x => vec![num(x, "action")?],
            };
            set_width(&mut raw, values.len(), ln)?;
            raw.actions.extend(values);
        } else {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let parsed: Vec<Option<f64>> = fields
                .iter()
                .map(|f| match *f {
                    "true" | "True" => Some(1.0),
                    "false" | "False" => Some(0.0),
                    f => f.parse().ok(),
                })
                .collect();
            if header.is_none() && raw.actions.is_empty() && parsed.iter().any(Option::is_none) {
                header = Some(fields.iter().map(|f| f.to_lowercase()).collect());
                continue;
            }
            let names = header.clone().unwrap_or_default();
            ensure!(
                header.is_none() || fields.len() == names.len(),
                "{} line {ln}: {} fields, the header has {}",
                path.display(),
                fields.len(),
                names.len()
            );
            let mut values = Vec::new();
            for (k, v) in parsed.iter().enumerate() {
                let v = v.ok_or_else(|| bad(format!("`{}` is not a number", fields[k])))?;
                match names.get(k).map(String::as_str) {
                    Some("reward") => {
                        rewards.push(v as f32);
                        has_r = true
                    }
                    Some("terminated") => {
                        terminated.push((v != 0.0) as u8);
                        has_te = true
                    }
                    Some("truncated") => {
                        truncated.push((v != 0.0) as u8);
                        has_tr = true
                    }
                    _ => values.push(v),
                }
            }
            set_width(&mut raw, values.len(), ln)?;
            raw.actions.extend(values);
        }
    }
    ensure!(
        !raw.actions.is_empty(),
        "{} holds no actions",
        path.display()
    );
    let rows = raw.actions.len() / raw.width;
    for (name, has, len) in [
        ("reward", has_r, rewards.len()),
        ("terminated", has_te, terminated.len()),
        ("truncated", has_tr, truncated.len()),
    ] {
        ensure!(
            !has || len == rows,
            "{}: `{name}` is on {len} of its {rows} lines; give it on every line or none",
            path.display()
        );
    }
    raw.rewards = has_r.then_some(rewards);
    raw.terminated = has_te.then_some(terminated);
    raw.truncated = has_tr.then_some(truncated);
    Ok(raw)
}

/// The actions file of an episode: the first of `candidates` that exists.
fn find_actions(candidates: &[PathBuf], episode: &Path) -> Result<PathBuf> {
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "{}: no actions file (looked for {})",
                episode.display(),
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

// ---------------------------------------------------------------------------------------
// .npy arrays inside .npz archives.

struct Npy {
    descr: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// (kind, bytes) of a little-endian numpy dtype: b bool, u unsigned, i signed, f float.
fn dtype(descr: &str) -> Option<(char, usize)> {
    let d = descr.strip_prefix(['<', '|', '=']).unwrap_or(descr);
    let kind = d.chars().next()?;
    let size: usize = d[1..].parse().ok()?;
    matches!(
        (kind, size),
        ('b', 1) | ('u', 1 | 2 | 4 | 8) | ('i', 1 | 2 | 4 | 8) | ('f', 4 | 8)
    )
    .then_some((kind, size))
}

impl Npy {
    fn values(&self) -> Vec<f64> {
        let (kind, size) = dtype(&self.descr).expect("checked when read");
        self.data
            .chunks_exact(size)
            .map(|b| match (kind, size) {
                ('b', _) | ('u', 1) => b[0] as f64,
                ('i', 1) => b[0] as i8 as f64,
                ('u', 2) => u16::from_le_bytes([b[0], b[1]]) as f64,
                ('i', 2) => i16::from_le_bytes([b[0], b[1]]) as f64,
                ('u', 4) => u32::from_le_bytes(b.try_into().expect("4")) as f64,
                ('i', 4) => i32::from_le_bytes(b.try_into().expect("4")) as f64,
                ('f', 4) => f32::from_le_bytes(b.try_into().expect("4")) as f64,
                ('u', 8) => u64::from_le_bytes(b.try_into().expect("8")) as f64,
                ('i', 8) => i64::from_le_bytes(b.try_into().expect("8")) as f64,
                _ => f64::from_le_bytes(b.try_into().expect("8")),
            })
            .collect()
    }

    fn integral(&self) -> bool {
        matches!(dtype(&self.descr), Some(('b' | 'u' | 'i', _)))
    }
}

/// Reads the header of `name` in an open archive and checks its dtype; returns the
/// entry's reader positioned at the data.
fn npy_entry<'a>(
    zip: &'a mut zip::ZipArchive<std::fs::File>,
    name: &str,
    path: &Path,
) -> Result<(String, Vec<usize>, Box<dyn Read + 'a>)> {
    let mut e = zip
        .by_name(name)
        .with_context(|| format!("{}: reading `{name}`", path.display()))?;
    let (descr, fortran, shape, _) = media::npy_header(&mut e, path)?;
    ensure!(
        !fortran,
        "{}: `{name}` is in Fortran order, which is not supported",
        path.display()
    );
    ensure!(
        dtype(&descr).is_some(),
        "{}: `{name}` has dtype {descr}; little-endian bool, int, uint or float arrays are read",
        path.display()
    );
    Ok((descr, shape, Box::new(e)))
}

fn read_npy(zip: &mut zip::ZipArchive<std::fs::File>, name: &str, path: &Path) -> Result<Npy> {
    let (descr, shape, mut e) = npy_entry(zip, name, path)?;
    let size = dtype(&descr).expect("checked").1;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(size))
        .with_context(|| format!("{}: `{name}` is too large", path.display()))?;
    let mut data = vec![0u8; count];
    e.read_exact(&mut data)
        .with_context(|| format!("{}: `{name}` is truncated", path.display()))?;
    Ok(Npy { descr, shape, data })
}

/// The entry of array `base` (`base.npy` or `base`), if the archive has it.
fn entry_name(names: &[String], base: &str) -> Option<String> {
    names
        .iter()
        .find(|n| n.as_str() == format!("{base}.npy") || n.as_str() == base)
        .cloned()
}

fn frames_shape(path: &Path, shape: &[usize]) -> Result<(usize, usize, usize)> {
    match *shape {
        [t, h, w, 3] => Ok((t, h, w)),
        _ => bail!(
            "{}: `frames` has shape {shape:?}; frames are u8 [T, H, W, 3]",
            path.display()
        ),
    }
}

fn action_rows(path: &Path, a: &Npy) -> Result<(Vec<f64>, usize)> {
    let width = match a.shape.as_slice() {
        [_] => 1,
        [_, d] => *d,
        s => bail!(
            "{}: `actions` has shape {s:?}; actions are [T] or [T, D]",
            path.display()
        ),
    };
    Ok((a.values(), width))
}

fn optional(
    zip: &mut zip::ZipArchive<std::fs::File>,
    names: &[String],
    base: &str,
    path: &Path,
) -> Result<Option<Vec<f64>>> {
    match entry_name(names, base) {
        Some(n) => {
            let a = read_npy(zip, &n, path)?;
            ensure!(
                a.shape.len() == 1,
                "{}: `{base}` has shape {:?}; one value per step",
                path.display(),
                a.shape
            );
            Ok(Some(a.values()))
        }
        None => Ok(None),
    }
}

/// The per-step arrays of an archive: (actions, width, rewards, terminated, truncated).
type Steps = (
    Vec<f64>,
    usize,
    Option<Vec<f64>>,
    Option<Vec<f64>>,
    Option<Vec<f64>>,
);

fn read_steps(
    zip: &mut zip::ZipArchive<std::fs::File>,
    names: &[String],
    path: &Path,
) -> Result<Steps> {
    let an = entry_name(names, "actions")
        .with_context(|| format!("{}: no `actions` array (arrays: {names:?})", path.display()))?;
    let a = read_npy(zip, &an, path)?;
    let (actions, width) = action_rows(path, &a)?;
    Ok((
        actions,
        width,
        optional(zip, names, "rewards", path)?,
        optional(zip, names, "terminated", path)?,
        optional(zip, names, "truncated", path)?,
    ))
}

fn raw_of(
    frames: Vec<u8>,
    (t, h, w): (usize, usize, usize),
    steps: &Steps,
    range: std::ops::Range<usize>,
) -> Raw {
    let (actions, width, rewards, terminated, truncated) = steps;
    let width = *width;
    let take = |v: &Option<Vec<f64>>| v.as_ref().map(|v| v[range.clone()].to_vec());
    Raw {
        frames,
        t,
        h,
        w,
        actions: actions[range.start * width..range.end * width].to_vec(),
        width,
        rewards: take(rewards).map(|v| v.into_iter().map(|x| x as f32).collect()),
        terminated: take(terminated).map(|v| v.into_iter().map(|x| (x != 0.0) as u8).collect()),
        truncated: take(truncated).map(|v| v.into_iter().map(|x| (x != 0.0) as u8).collect()),
    }
}

// ---------------------------------------------------------------------------------------
// Writing.

/// The output dataset, with the ids already imported.
struct Sink {
    writer: DatasetWriter,
    done: HashSet<String>,
    space: ActionSpace,
    size: usize,
    last_flush: Instant,
    written: usize,
    steps: u64,
    skipped: usize,
}

impl Sink {
    fn open(out: &Path, header: DatasetHeader, collection: Value) -> Result<Self> {
        let space = header.action_space.clone();
        let size = header.frame_shape[0];
        let mut writer = DatasetWriter::create_or_append(out, header)
            .with_context(|| format!("opening {} for writing", out.display()))?;
        let done = writer
            .manifest()
            .episodes
            .iter()
            .filter_map(|e| {
                e.info
                    .get("import")
                    .and_then(Value::as_str)
                    .map(String::from)
            })
            .collect();
        writer.add_collection(collection)?;
        Ok(Self {
            writer,
            done,
            space,
            size,
            last_flush: Instant::now(),
            written: 0,
            steps: 0,
            skipped: 0,
        })
    }

    /// True (and counted) when `id` is already in the dataset.
    fn skip(&mut self, id: &str) -> bool {
        let seen = self.done.contains(id);
        self.skipped += seen as usize;
        seen
    }

    fn put(
        &mut self,
        id: String,
        raw: Raw,
        what: &str,
        seed: Option<u64>,
        mut info: Map<String, Value>,
    ) -> Result<()> {
        let ep = to_episode(raw, &self.space, self.size, what)?;
        info.insert("import".into(), Value::String(id.clone()));
        self.writer.append_unlisted(&ep, seed, info)?;
        self.done.insert(id);
        self.written += 1;
        self.steps += ep.steps() as u64;
        if self.last_flush.elapsed() > Duration::from_secs(2) {
            self.writer.flush()?;
            self.last_flush = Instant::now();
        }
        Ok(())
    }

    fn finish(self, out: &Path) -> Result<String> {
        self.writer.flush()?;
        ensure!(
            self.written + self.skipped > 0,
            "nothing was imported into {}",
            out.display()
        );
        Ok(format!(
            "{}: {} episodes imported ({} steps){}; {} in all",
            out.display(),
            self.written,
            self.steps,
            if self.skipped > 0 {
                format!(", {} already there", self.skipped)
            } else {
                String::new()
            },
            self.writer.manifest().num_episodes
        ))
    }
}

/// The last component of a path as text (empty for `/` or `..`): ids and names.
fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn default_header(args: &ImportArgs, space: ActionSpace) -> Result<DatasetHeader> {
    let name = match file_name(&args.src) {
        n if n.is_empty() => "data".to_string(),
        n => n,
    };
    let templates = match &args.templates {
        Some(p) => read_templates(p, &space)?,
        None => Vec::new(),
    };
    Ok(DatasetHeader {
        env_id: args
            .env_id
            .clone()
            .unwrap_or_else(|| format!("import:{name}")),
        env_config: json!({"imported_from": args.from.name(), "source": name}),
        action_space: space,
        action_templates: templates,
        frame_shape: [args.size, args.size, 3],
        final_frame_rendered: true,
        imagined: false,
    })
}

fn space_flag(args: &ImportArgs) -> Result<ActionSpace> {
    let s = args.action_space.as_deref().with_context(|| {
        format!(
            "--from {} needs --action-space (discrete:N, continuous:D or continuous:D:LOW:HIGH)",
            args.from.name()
        )
    })?;
    parse_space(s)
}

fn collection(args: &ImportArgs) -> Value {
    json!({
        "command": "dws dataset import",
        "from": args.from.name(),
        "source": args.src.display().to_string(),
    })
}

pub fn import(args: ImportArgs) -> Result<()> {
    ensure!(
        (8..=1024).contains(&args.size),
        "--size {} is outside 8..=1024",
        args.size
    );
    // Datasets this import would create; a failed import removes those it left empty, so
    // they do not stand in the way of the next attempt.
    let outs = [
        args.out.clone(),
        args.out.join("train"),
        args.out.join("test"),
    ];
    let fresh: Vec<&PathBuf> = outs
        .iter()
        .filter(|d| !d.join("manifest.json").exists())
        .collect();
    let result = match args.from {
        SourceKind::Npz => import_npz(&args),
        SourceKind::Frames | SourceKind::Video => import_media(&args),
        SourceKind::Bair => import_bair(&args),
    };
    if result.is_err() {
        for d in fresh.iter().rev() {
            if Dataset::open(d).is_ok_and(|ds| ds.is_empty()) {
                let _ = std::fs::remove_file(d.join("manifest.json"));
                let _ = std::fs::remove_dir(d); // only if nothing else is in it
            }
        }
    }
    result
}

fn import_npz(args: &ImportArgs) -> Result<()> {
    let src = &args.src;
    let files: Vec<PathBuf> = if src.is_file() {
        vec![src.clone()]
    } else if src.is_dir() {
        media::sorted_entries(src)?
            .into_iter()
            .filter(|p| p.is_file() && media::ext(p) == "npz")
            .collect()
    } else {
        bail!("{} does not exist", src.display())
    };
    ensure!(!files.is_empty(), "{} holds no .npz files", src.display());
    // An `export-npz` folder carries the original manifest: keep its header and seeds.
    let source_manifest: Option<Manifest> = match src.join("manifest.json") {
        m if src.is_dir() && m.is_file() => {
            let text = std::fs::read_to_string(&m)?;
            Some(serde_json::from_str(&text).with_context(|| {
                format!(
                    "{}: not a dws manifest (remove it to import without)",
                    m.display()
                )
            })?)
        }
        _ => None,
    };
    let header = match &source_manifest {
        Some(m) => {
            let mut h = m.header.clone();
            if let Some(s) = &args.action_space {
                ensure!(
                    parse_space(s)? == h.action_space,
                    "--action-space {s} disagrees with {}'s {:?}",
                    src.join("manifest.json").display(),
                    h.action_space
                );
            }
            if let Some(p) = &args.templates {
                h.action_templates = read_templates(p, &h.action_space)?;
            }
            if let Some(e) = &args.env_id {
                h.env_id = e.clone();
            }
            h.frame_shape = [args.size, args.size, 3];
            h
        }
        None => default_header(args, space_flag(args)?)?,
    };
    let mut about = collection(args);
    if let Some(m) = &source_manifest {
        about["original_collections"] = Value::Array(m.collections.clone());
    }
    let mut sink = Sink::open(&args.out, header, about)?;
    let bar = crate::progress::bar(files.len() as u64, "files");
    for path in &files {
        bar.inc(1);
        let name = media::stem(path);
        let id = file_name(path);
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut zip = zip::ZipArchive::new(file)
            .with_context(|| format!("{}: not an .npz (zip) file", path.display()))?;
        let names: Vec<String> = zip.file_names().map(String::from).collect();
        if let Some(lengths) = entry_name(&names, "episode_lengths") {
            import_npz_multi(&mut sink, &mut zip, &names, path, &id, &lengths)?;
            continue;
        }
        if sink.skip(&id) {
            continue;
        }
        let fname = entry_name(&names, "frames").with_context(|| {
            format!("{}: no `frames` array (arrays: {names:?})", path.display())
        })?;
        let frames = read_npy(&mut zip, &fname, path)?;
        ensure!(
            dtype(&frames.descr) == Some(('u', 1)),
            "{}: `frames` has dtype {}; frames are uint8",
            path.display(),
            frames.descr
        );
        let dims = frames_shape(path, &frames.shape)?;
        let steps = read_steps(&mut zip, &names, path)?;
        let rows = steps.0.len() / steps.1.max(1);
        // Seed and info of the original episode (export-npz names files episode_NNNNNN).
        let orig = source_manifest.as_ref().and_then(|m| {
            name.strip_prefix("episode_")
                .and_then(|n| n.parse::<usize>().ok())
                .and_then(|i| m.episodes.get(i))
        });
        let (seed, info) = orig
            .map(|e| (e.seed, e.info.clone()))
            .unwrap_or((None, Map::new()));
        let raw = raw_of(frames.data, dims, &steps, 0..rows);
        sink.put(id, raw, &path.display().to_string(), seed, info)?;
    }
    bar.finish_and_clear();
    println!("{}", sink.finish(&args.out)?);
    Ok(())
}

/// One archive holding several episodes back to back: `episode_lengths` (frames per
/// episode), `frames` `[sum, H, W, 3]` (streamed, one episode at a time), and per-step
/// arrays with either `sum - E` rows (T-1 per episode) or `sum` rows (T per episode).
fn import_npz_multi(
    sink: &mut Sink,
    zip: &mut zip::ZipArchive<std::fs::File>,
    names: &[String],
    path: &Path,
    id: &str,
    lengths_name: &str,
) -> Result<()> {
    let lengths = read_npy(zip, lengths_name, path)?;
    ensure!(
        lengths.integral() && lengths.shape.len() == 1,
        "{}: `episode_lengths` must be a 1-d integer array (frames per episode)",
        path.display()
    );
    let lengths: Vec<usize> = lengths.values().iter().map(|&v| v as usize).collect();
    ensure!(
        !lengths.is_empty(),
        "{}: `episode_lengths` is empty",
        path.display()
    );
    let total: usize = lengths.iter().sum();
    let steps = read_steps(zip, names, path)?;
    let rows = steps.0.len() / steps.1.max(1);
    let per_frame = if rows == total {
        true
    } else if rows + lengths.len() == total {
        false
    } else {
        bail!(
            "{}: {} actions for {} episodes of {total} frames in all; need {} (T-1 per \
             episode) or {total} (T per episode)",
            path.display(),
            rows,
            lengths.len(),
            total - lengths.len()
        )
    };
    let fname = entry_name(names, "frames")
        .with_context(|| format!("{}: no `frames` array", path.display()))?;
    let (descr, shape, _) = npy_entry(zip, &fname, path)?;
    ensure!(
        dtype(&descr) == Some(('u', 1)),
        "{}: `frames` has dtype {descr}; frames are uint8",
        path.display()
    );
    let (t_all, h, w) = frames_shape(path, &shape)?;
    ensure!(
        t_all == total,
        "{}: `frames` holds {t_all} frames, `episode_lengths` adds up to {total}",
        path.display()
    );
    // Stream the frames entry: the archive is reopened for a reader that owns it.
    let archive = zip::ZipArchive::new(std::fs::File::open(path)?)?;
    let mut r = media::ZipEntryReader::new(archive, &fname)?;
    media::npy_header(&mut r, path)?;
    let mut row_at = 0usize;
    for (e, &len) in lengths.iter().enumerate() {
        let mut frames = vec![0u8; len * h * w * 3];
        r.read_exact(&mut frames)
            .with_context(|| format!("{}: `frames` is truncated at episode {e}", path.display()))?;
        let n_rows = if per_frame {
            len
        } else {
            len.saturating_sub(1)
        };
        let range = row_at..row_at + n_rows;
        row_at += n_rows;
        let eid = format!("{id}#{e}");
        if sink.skip(&eid) {
            continue;
        }
        let raw = raw_of(frames, (len, h, w), &steps, range);
        sink.put(
            eid,
            raw,
            &format!("{} episode {e}", path.display()),
            None,
            Map::new(),
        )?;
    }
    Ok(())
}

fn import_media(args: &ImportArgs) -> Result<()> {
    let src = &args.src;
    ensure!(src.exists(), "{} does not exist", src.display());
    let space = space_flag(args)?;
    let frames_kind = args.from == SourceKind::Frames;
    let items: Vec<PathBuf> = if src.is_file() && !frames_kind {
        vec![src.clone()]
    } else {
        ensure!(src.is_dir(), "{} is not a folder", src.display());
        media::sorted_entries(src)?
            .into_iter()
            .filter(|p| {
                if frames_kind {
                    p.is_dir()
                } else {
                    p.is_file() && media::VIDEO_EXT.contains(&media::ext(p).as_str())
                }
            })
            .collect()
    };
    ensure!(
        !items.is_empty(),
        "{} holds no {}",
        src.display(),
        if frames_kind {
            "episode folders (one folder of frame images per episode)"
        } else {
            "videos (mp4, webm, avi, mov, mkv, gif)"
        }
    );
    let header = default_header(args, space)?;
    let mut sink = Sink::open(&args.out, header, collection(args))?;
    let bar = crate::progress::bar(items.len() as u64, "episodes");
    for item in &items {
        bar.inc(1);
        let name = media::stem(item);
        let id = file_name(item);
        if sink.skip(&id) {
            continue;
        }
        let parent = item.parent().unwrap_or(Path::new("."));
        let mut candidates = Vec::new();
        if frames_kind {
            candidates.push(item.join("actions.csv"));
            candidates.push(item.join("actions.jsonl"));
        }
        candidates.push(parent.join(format!("{name}.csv")));
        candidates.push(parent.join(format!("{name}.jsonl")));
        let actions_path = find_actions(&candidates, item)?;
        let video = if frames_kind {
            media::read_frame_dir(item)?
        } else if media::ext(item) == "gif" {
            media::read_gif(item)?
        } else {
            media::read_with_ffmpeg(item)?
        };
        let mut raw = read_actions_file(&actions_path)?;
        (raw.frames, raw.t, raw.h, raw.w) = (video.frames, video.t, video.h, video.w);
        let what = format!("{} with {}", item.display(), actions_path.display());
        sink.put(id, raw, &what, None, Map::new())?;
    }
    bar.finish_and_clear();
    println!("{}", sink.finish(&args.out)?);
    Ok(())
}

/// The TFRecord files of each split under a BAIR folder.
fn bair_splits(src: &Path) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let root = [src.join("softmotion30_44k"), src.to_path_buf()]
        .into_iter()
        .find(|p| p.join("train").is_dir() || p.join("test").is_dir());
    let records = |dir: &Path| -> Result<Vec<PathBuf>> {
        Ok(media::sorted_entries(dir)?
            .into_iter()
            .filter(|p| p.is_file() && media::ext(p) == "tfrecords")
            .collect())
    };
    let splits = match root {
        Some(root) => ["train", "test"]
            .iter()
            .filter(|s| root.join(s).is_dir())
            .map(|s| Ok((s.to_string(), records(&root.join(s))?)))
            .collect::<Result<Vec<_>>>()?,
        None if src.is_dir() => vec![(String::new(), records(src)?)],
        None => bail!("{} does not exist", src.display()),
    };
    ensure!(
        splits.iter().any(|(_, f)| !f.is_empty()),
        "{} holds no .tfrecords files (expected softmotion30_44k/train and test)",
        src.display()
    );
    Ok(splits)
}

fn import_bair(args: &ImportArgs) -> Result<()> {
    let space = match &args.action_space {
        Some(s) => parse_space(s)?,
        None => tfrecord::bair_action_space(),
    };
    ensure!(
        matches!(space, ActionSpace::Continuous { dim: 4, .. }),
        "BAIR actions are 4 floats: --action-space continuous:4[:LOW:HIGH]"
    );
    let splits = bair_splits(&args.src)?;
    let total: u64 = splits
        .iter()
        .flat_map(|(_, f)| f.iter())
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let bar = crate::progress::bar(total, "bytes");
    for (split, files) in &splits {
        let out = if split.is_empty() {
            args.out.clone()
        } else {
            args.out.join(split)
        };
        let header = DatasetHeader {
            env_id: args
                .env_id
                .clone()
                .unwrap_or_else(|| "bair:softmotion30_44k".into()),
            env_config: json!({"imported_from": "bair", "split": split}),
            action_space: space.clone(),
            action_templates: Vec::new(),
            frame_shape: [args.size, args.size, 3],
            final_frame_rendered: true,
            imagined: false,
        };
        let mut sink = Sink::open(&out, header, collection(args))?;
        for path in files {
            let fname = file_name(path);
            let mut r = TfRecordReader::open(path)?;
            loop {
                let index = r.index();
                let Some(bytes) = r.next_record()? else { break };
                bar.inc(bytes.len() as u64 + 16);
                let id = format!("{split}/{fname}#{index}");
                if sink.skip(&id) {
                    continue;
                }
                let what = format!("{} record {index}", path.display());
                let features =
                    tfrecord::parse_example(&bytes).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
                let (ep, _) = tfrecord::bair_episode(&features)
                    .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
                let (t, h, w) = (ep.num_frames(), ep.frame_shape[0], ep.frame_shape[1]);
                let Actions::Continuous { data, .. } = ep.actions else {
                    unreachable!("BAIR actions are continuous")
                };
                // Back to a raw episode: T frames with T-1 actions, flags as recorded.
                let raw = Raw {
                    t,
                    h,
                    w,
                    frames: ep.frames,
                    actions: data.iter().map(|&v| v as f64).collect(),
                    width: 4,
                    rewards: Some(ep.rewards),
                    terminated: Some(ep.terminated),
                    truncated: Some(ep.truncated),
                };
                sink.put(id, raw, &what, None, Map::new())?;
            }
        }
        let summary = sink.finish(&out)?;
        bar.suspend(|| println!("{summary}"));
    }
    bar.finish_and_clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_spaces_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_space("discrete:15").unwrap(),
            ActionSpace::Discrete { n: 15 }
        );
        assert_eq!(
            parse_space("continuous:4:-2:2.5").unwrap(),
            ActionSpace::Continuous {
                dim: 4,
                low: -2.0,
                high: 2.5
            }
        );
        for bad in [
            "discrete",
            "discrete:0",
            "box:3",
            "continuous:2:1:0",
            "continuous:x",
        ] {
            assert!(parse_space(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn frames_are_centre_cropped_and_resized() {
        // 2 frames of 4x8: the centre 4x4 (columns 2..6) is kept.
        let (h, w) = (4usize, 8usize);
        let mut frames = vec![0u8; 2 * h * w * 3];
        for y in 0..h {
            for x in 2..6 {
                for c in 0..3 {
                    frames[(y * w + x) * 3 + c] = 200;
                    frames[h * w * 3 + (y * w + x) * 3 + c] = 100;
                }
            }
        }
        let out = fit(frames, 2, h, w, 2);
        assert_eq!(out.len(), 2 * 2 * 2 * 3);
        assert!(out[..12].iter().all(|&v| v == 200), "{out:?}");
        assert!(out[12..].iter().all(|&v| v == 100), "{out:?}");
    }

    fn raw(t: usize, actions: Vec<f64>, width: usize) -> Raw {
        Raw {
            frames: vec![7u8; t * 8 * 8 * 3],
            t,
            h: 8,
            w: 8,
            actions,
            width,
            rewards: None,
            terminated: None,
            truncated: None,
        }
    }

    #[test]
    fn alignment_rule_is_applied_and_checked() {
        let d = ActionSpace::Discrete { n: 3 };
        // T-1 actions.
        let ep = to_episode(raw(3, vec![0.0, 2.0], 1), &d, 8, "x").unwrap();
        assert_eq!(ep.actions, Actions::Discrete(vec![0, 2]));
        assert_eq!(ep.truncated, vec![0, 1]);
        // T actions: the last is dropped.
        let ep = to_episode(raw(3, vec![1.0, 1.0, 2.0], 1), &d, 8, "x").unwrap();
        assert_eq!(ep.actions, Actions::Discrete(vec![1, 1]));
        let err = to_episode(raw(3, vec![1.0], 1), &d, 8, "ep7").unwrap_err();
        assert!(
            err.to_string().contains("ep7: 3 frames and 1 actions"),
            "{err}"
        );
        let err = to_episode(raw(3, vec![1.0, 3.0], 1), &d, 8, "ep7").unwrap_err();
        assert!(err.to_string().contains("action 1 is 3"), "{err}");
        let c = ActionSpace::Continuous {
            dim: 2,
            low: -1.0,
            high: 1.0,
        };
        let err = to_episode(raw(2, vec![0.5, 0.5, 0.1], 3), &c, 8, "v").unwrap_err();
        assert!(err.to_string().contains("3 values per step"), "{err}");
        let err = to_episode(raw(2, vec![0.5, 1.5], 2), &c, 8, "v").unwrap_err();
        assert!(err.to_string().contains("outside [-1, 1]"), "{err}");
        let err = to_episode(raw(1, vec![], 2), &c, 8, "v").unwrap_err();
        assert!(err.to_string().contains("at least 2"), "{err}");
    }

    #[test]
    fn actions_files_parse_with_headers_objects_and_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("a.csv");
        std::fs::write(&csv, "dx,dy,reward\n0.5,-0.5,1\n0.1,0.2,0\n").unwrap();
        let r = read_actions_file(&csv).unwrap();
        assert_eq!((r.width, r.actions.len()), (2, 4));
        assert_eq!(r.rewards, Some(vec![1.0, 0.0]));
        let jl = dir.path().join("a.jsonl");
        std::fs::write(
            &jl,
            "{\"action\": 2, \"reward\": 0.5, \"terminated\": true}\n3\n",
        )
        .unwrap();
        let err = read_actions_file(&jl).unwrap_err().to_string();
        assert!(err.contains("`reward` is on 1 of its 2 lines"), "{err}");
        std::fs::write(
            &jl,
            "{\"action\": 2, \"reward\": 0.5, \"terminated\": true}\n",
        )
        .unwrap();
        let r = read_actions_file(&jl).unwrap();
        assert_eq!(
            (r.actions.clone(), r.terminated.clone()),
            (vec![2.0], Some(vec![1]))
        );
        std::fs::write(&jl, "[1, 2]\n[1]\n").unwrap();
        let err = read_actions_file(&jl).unwrap_err().to_string();
        assert!(
            err.contains("a.jsonl line 2") && err.contains("1 action values"),
            "{err}"
        );
        std::fs::write(&csv, "1,2\n3,x\n").unwrap();
        let err = read_actions_file(&csv).unwrap_err().to_string();
        assert!(err.contains("a.csv line 2") && err.contains("`x`"), "{err}");
    }
}
