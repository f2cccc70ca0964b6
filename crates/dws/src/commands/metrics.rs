//! `dws metrics`: the metrics of `dws eval` on anyone's files. `pair` scores predictions
//! against ground truth (PSNR, SSIM, LPIPS, per item and mean); `fvd` compares two sets
//! of videos, and can save and reuse the I3D features of a fixed reference set.

use crate::device::{dispatch, DeviceArg, Job};
use crate::media::{list, Item, Reader, Video};
use anyhow::{bail, ensure, Context, Result};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use clap::Subcommand;
use dws_metrics::fvd::frechet_distance;
use dws_metrics::i3d::{I3d, FEATURES};
use dws_metrics::image::{psnr, ssim, Frame};
use dws_metrics::lpips::Lpips;
use dws_metrics::video::{i3d_features, Clip, I3D_BATCH};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Subcommand, Clone, Debug)]
pub enum Command {
    /// PSNR, SSIM and LPIPS of B against A: two images, two videos, or two folders (or
    /// array files) of them matched by file name. Per item (mean over frames) and mean.
    Pair {
        /// Ground truth: an image, a video, or a folder or array file of them.
        a: PathBuf,
        /// Predictions, matched to A's items by name.
        b: PathBuf,
        /// Any of psnr, ssim, lpips, comma-separated.
        #[arg(long, default_value = "psnr,ssim,lpips")]
        metrics: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// cpu or cuda:N (a `--features cuda` build).
        #[arg(long, default_value = "cpu")]
        device: DeviceArg,
    },
    /// FVD between two sets of videos (REAL FAKE), each a folder of videos (GIF, MP4,
    /// folders of frames) or an .npz/.safetensors array [N, T, H, W, 3] u8. With
    /// `--real-features FILE`, give only FAKE.
    Fvd {
        /// Two sets, REAL then FAKE (only FAKE with --real-features).
        #[arg(required = true, num_args = 1..=2, value_name = "SET")]
        sets: Vec<PathBuf>,
        /// Frames of each video used (the first ones); the standard is 16.
        #[arg(long, default_value_t = 16)]
        frames: usize,
        /// Save the I3D features of both sets (safetensors: `real`, `fake`).
        #[arg(long)]
        features_out: Option<PathBuf>,
        /// Reuse the `real` features saved by `--features-out` instead of a REAL set.
        #[arg(long)]
        real_features: Option<PathBuf>,
        /// Print JSON instead of a line.
        #[arg(long)]
        json: bool,
        /// cpu or cuda:N (a `--features cuda` build).
        #[arg(long, default_value = "cpu")]
        device: DeviceArg,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Wanted {
    psnr: bool,
    ssim: bool,
    lpips: bool,
}

fn parse_metrics(s: &str) -> Result<Wanted> {
    let mut w = Wanted {
        psnr: false,
        ssim: false,
        lpips: false,
    };
    for m in s.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        match m {
            "psnr" => w.psnr = true,
            "ssim" => w.ssim = true,
            "lpips" => w.lpips = true,
            other => bail!("unknown metric `{other}`: psnr, ssim, lpips (FVD: `dws metrics fvd`)"),
        }
    }
    ensure!(w.psnr || w.ssim || w.lpips, "--metrics names no metric");
    Ok(w)
}

/// One matched pair's scores (means over its frames).
#[derive(Debug, Clone, Serialize)]
pub struct PairScores {
    pub name: String,
    pub frames: usize,
    pub psnr: Option<f64>,
    pub ssim: Option<f64>,
    pub lpips: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PairReport {
    pub items: Vec<PairScores>,
    /// Means over items.
    pub psnr: Option<f64>,
    pub ssim: Option<f64>,
    pub lpips: Option<f64>,
}

/// Matches the items of A and B: the only item of each, or equal names.
fn match_items(a: &Path, b: &Path) -> Result<Vec<(String, Item, Item)>> {
    let (la, lb) = (list(a)?, list(b)?);
    if la.len() == 1 && lb.len() == 1 {
        let (name, ia) = la.into_iter().next().expect("one");
        let (_, ib) = lb.into_iter().next().expect("one");
        return Ok(vec![(name, ia, ib)]);
    }
    let mut by_name: HashMap<String, Item> = lb.into_iter().collect();
    let mut out = Vec::new();
    for (name, ia) in la {
        let ib = by_name.remove(&name).with_context(|| {
            format!(
                "`{name}` in {} has no match (same name) in {}",
                a.display(),
                b.display()
            )
        })?;
        out.push((name, ia, ib));
    }
    if let Some(extra) = by_name.keys().min() {
        bail!(
            "`{extra}` in {} has no match (same name) in {}",
            b.display(),
            a.display()
        );
    }
    Ok(out)
}

fn frames_f32(v: &Video, i: usize) -> Vec<f32> {
    let f = v.h * v.w * 3;
    dws_metrics::image::to_unit(&v.frames[i * f..(i + 1) * f])
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

struct PairJob {
    a: PathBuf,
    b: PathBuf,
    want: Wanted,
}

impl Job for PairJob {
    type Out = PairReport;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<PairReport> {
        pair::<B::InnerBackend>(&self.a, &self.b, self.want, &device)
    }
}

fn pair<B: Backend>(a: &Path, b: &Path, want: Wanted, device: &B::Device) -> Result<PairReport> {
    let pairs = match_items(a, b)?;
    let lpips = if want.lpips {
        Some(Lpips::<B>::from_asset(device)?)
    } else {
        None
    };
    let (mut ra, mut rb) = (Reader::new(), Reader::new());
    let bar = crate::progress::bar(pairs.len() as u64, "pairs");
    let mut items = Vec::with_capacity(pairs.len());
    for (name, ia, ib) in &pairs {
        let va = ra.read(name, ia)?;
        let vb = rb.read(name, ib)?;
        ensure!(
            (va.t, va.h, va.w) == (vb.t, vb.h, vb.w),
            "`{name}`: {} frames of {}×{} in {} but {} frames of {}×{} in {}",
            va.t,
            va.h,
            va.w,
            a.display(),
            vb.t,
            vb.h,
            vb.w,
            b.display()
        );
        let (mut ps, mut ss) = (Vec::new(), Vec::new());
        if want.psnr || want.ssim {
            for i in 0..va.t {
                let (x, y) = (frames_f32(&va, i), frames_f32(&vb, i));
                let (fx, fy) = (Frame::new(&x, va.h, va.w)?, Frame::new(&y, va.h, va.w)?);
                if want.psnr {
                    ps.push(psnr(&fx, &fy)?);
                }
                if want.ssim {
                    ss.push(ssim(&fx, &fy).with_context(|| format!("`{name}`"))?);
                }
            }
        }
        let lp = match &lpips {
            Some(net) => {
                let d = net
                    .frame_distances(&va.frames, &vb.frames, (va.h, va.w), device)
                    .with_context(|| format!("`{name}`"))?;
                Some(mean(&d))
            }
            None => None,
        };
        items.push(PairScores {
            name: name.clone(),
            frames: va.t,
            psnr: want.psnr.then(|| mean(&ps)),
            ssim: want.ssim.then(|| mean(&ss)),
            lpips: lp,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let avg = |g: fn(&PairScores) -> Option<f64>| -> Option<f64> {
        let v: Vec<f64> = items.iter().filter_map(g).collect();
        (!v.is_empty()).then(|| mean(&v))
    };
    Ok(PairReport {
        psnr: avg(|s| s.psnr),
        ssim: avg(|s| s.ssim),
        lpips: avg(|s| s.lpips),
        items,
    })
}

/// I3D features of a set, read and encoded a few videos at a time.
fn set_features<B: Backend>(
    net: &I3d<B>,
    path: &Path,
    frames: usize,
    device: &B::Device,
) -> Result<Vec<f64>> {
    let items = list(path)?;
    ensure!(
        items.len() >= 2,
        "FVD needs at least two videos per set; {} holds {}",
        path.display(),
        items.len()
    );
    let mut reader = Reader::new();
    let bar = crate::progress::bar(items.len() as u64, "videos through I3D");
    let mut out = Vec::with_capacity(items.len() * FEATURES);
    let mut batch: Vec<Video> = Vec::new();
    let flush = |batch: &mut Vec<Video>, out: &mut Vec<f64>| -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let clips = batch
            .iter()
            .map(|v| Clip::new(&v.frames, v.t, v.h, v.w))
            .collect::<Result<Vec<_>, _>>()?;
        out.extend(i3d_features(
            net,
            &path.display().to_string(),
            &clips,
            device,
            |n| bar.inc(n as u64),
        )?);
        batch.clear();
        Ok(())
    };
    for (name, item) in &items {
        let v = reader
            .read(name, item)?
            .first(frames)
            .with_context(|| format!("in {}", path.display()))?;
        // A batch holds videos of one frame size.
        if batch.last().is_some_and(|l| (l.h, l.w) != (v.h, v.w)) || batch.len() == I3D_BATCH {
            flush(&mut batch, &mut out)?;
        }
        batch.push(v);
    }
    flush(&mut batch, &mut out)?;
    bar.finish_and_clear();
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct FvdReport {
    pub fvd: f64,
    pub real: usize,
    pub fake: usize,
    pub frames: usize,
}

struct FvdJob {
    real: Option<PathBuf>,
    fake: PathBuf,
    frames: usize,
    features_out: Option<PathBuf>,
    real_features: Option<PathBuf>,
}

impl Job for FvdJob {
    type Out = FvdReport;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<FvdReport> {
        fvd::<B::InnerBackend>(self, &device)
    }
}

fn read_features(path: &Path, frames: usize) -> Result<Vec<f64>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let saved: Option<usize> = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("frames"))
        .and_then(|f| f.parse().ok());
    if let Some(s) = saved {
        ensure!(
            s == frames,
            "{} holds features of {s}-frame clips; this run uses --frames {frames}",
            path.display()
        );
    }
    let t = st.tensor("real").with_context(|| {
        format!(
            "{} has no `real` features (write it with --features-out)",
            path.display()
        )
    })?;
    ensure!(
        t.dtype() == safetensors::Dtype::F32 && t.shape().len() == 2 && t.shape()[1] == FEATURES,
        "{}: `real` is {:?} {:?}, expected F32 [N, {FEATURES}]",
        path.display(),
        t.dtype(),
        t.shape()
    );
    Ok(t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
        .collect())
}

fn write_features(path: &Path, real: &[f64], fake: &[f64], frames: usize) -> Result<()> {
    let bytes =
        |v: &[f64]| -> Vec<u8> { v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect() };
    let (rb, fb) = (bytes(real), bytes(fake));
    let views = [
        (
            "real",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![real.len() / FEATURES, FEATURES],
                &rb,
            )?,
        ),
        (
            "fake",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![fake.len() / FEATURES, FEATURES],
                &fb,
            )?,
        ),
    ];
    let meta = HashMap::from([
        ("frames".to_string(), frames.to_string()),
        (
            "features".to_string(),
            "i3d-kinetics-400 logits".to_string(),
        ),
    ]);
    let data = safetensors::serialize(views, &Some(meta))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))
}

fn fvd<B: Backend>(j: FvdJob, device: &B::Device) -> Result<FvdReport> {
    ensure!(
        j.frames >= dws_metrics::i3d::MIN_FRAMES,
        "--frames must be at least {}",
        dws_metrics::i3d::MIN_FRAMES
    );
    let net = I3d::<B>::from_asset(device)?;
    let real = match (&j.real, &j.real_features) {
        (None, Some(f)) => read_features(f, j.frames)?,
        (Some(r), None) => set_features(&net, r, j.frames, device)?,
        _ => bail!("give REAL and FAKE, or --real-features FILE and FAKE"),
    };
    ensure!(
        real.len() >= 2 * FEATURES,
        "the real features hold fewer than two videos"
    );
    let fake = set_features(&net, &j.fake, j.frames, device)?;
    if let Some(out) = &j.features_out {
        write_features(out, &real, &fake, j.frames)?;
    }
    Ok(FvdReport {
        fvd: frechet_distance(&real, &fake, FEATURES)?,
        real: real.len() / FEATURES,
        fake: fake.len() / FEATURES,
        frames: j.frames,
    })
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.decimals$}"))
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Pair {
            a,
            b,
            metrics,
            json,
            device,
        } => {
            let want = parse_metrics(&metrics)?;
            let r = dispatch(device, PairJob { a, b, want })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let width = r
                    .items
                    .iter()
                    .map(|i| i.name.len())
                    .max()
                    .unwrap_or(4)
                    .max(4);
                println!(
                    "{:<width$} {:>6} {:>8} {:>7} {:>7}",
                    "item", "frames", "PSNR dB", "SSIM", "LPIPS"
                );
                for i in &r.items {
                    println!(
                        "{:<width$} {:>6} {:>8} {:>7} {:>7}",
                        i.name,
                        i.frames,
                        fmt(i.psnr, 2),
                        fmt(i.ssim, 4),
                        fmt(i.lpips, 4)
                    );
                }
                println!(
                    "{:<width$} {:>6} {:>8} {:>7} {:>7}",
                    "mean",
                    "",
                    fmt(r.psnr, 2),
                    fmt(r.ssim, 4),
                    fmt(r.lpips, 4)
                );
            }
        }
        Command::Fvd {
            sets,
            frames,
            features_out,
            real_features,
            json,
            device,
        } => {
            let (real, fake) = match (sets.as_slice(), &real_features) {
                ([fake], Some(_)) => (None, fake.clone()),
                ([real, fake], None) => (Some(real.clone()), fake.clone()),
                ([_, _], Some(_)) => bail!("with --real-features give only the FAKE set"),
                _ => bail!("give two sets, REAL and FAKE (or --real-features FILE and FAKE)"),
            };
            let r = dispatch(
                device,
                FvdJob {
                    real,
                    fake,
                    frames,
                    features_out: features_out.clone(),
                    real_features,
                },
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "FVD {:.2} ({} real, {} fake videos, {} frames each)",
                    r.fvd, r.real, r.fake, r.frames
                );
                if let Some(f) = features_out {
                    println!(
                        "features saved to {} (reuse: --real-features {})",
                        f.display(),
                        f.display()
                    );
                }
            }
        }
    }
    Ok(())
}
