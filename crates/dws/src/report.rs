//! Media written for people: side-by-side GIFs and PNG filmstrips of predictions.

use anyhow::{Context, Result};
use std::path::Path;

const SCALE: usize = 3;
const GAP: usize = 2;
const BACKGROUND: u8 = 40;

/// One rollout to show: ground truth and prediction, `[T, H, W, C]` u8 each, same T.
pub struct Pair<'a> {
    pub truth: &'a [u8],
    pub pred: &'a [u8],
}

fn create(path: &Path) -> Result<std::fs::File> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))
}

/// Draws an `[H, W, C]` frame whose value at index `i` is `f(i)` into the RGB canvas at
/// (x0, y0), upscaled by `scale`.
fn blit(
    canvas: &mut [u8],
    canvas_w: usize,
    (h, w, c): (usize, usize, usize),
    (x0, y0): (usize, usize),
    scale: usize,
    f: impl Fn(usize) -> u8,
) {
    for y in 0..h * scale {
        for x in 0..w * scale {
            let s = ((y / scale) * w + x / scale) * c;
            let d = ((y0 + y) * canvas_w + x0 + x) * 3;
            for k in 0..3 {
                canvas[d + k] = f(s + k.min(c - 1));
            }
        }
    }
}

/// One GIF with a row per rollout: ground truth | prediction | absolute difference,
/// upscaled, 4 frames per second.
pub fn write_side_by_side_gif(
    path: &Path,
    rows: &[Pair<'_>],
    h: usize,
    w: usize,
    c: usize,
) -> Result<()> {
    anyhow::ensure!(
        !rows.is_empty(),
        "no rollouts to draw into {}",
        path.display()
    );
    let f = h * w * c;
    let frames = rows[0].truth.len() / f;
    let (cw, ch) = (w * SCALE, h * SCALE);
    let width = 3 * cw + 2 * GAP;
    let height = rows.len() * (ch + GAP) - GAP;
    let mut enc = gif::Encoder::new(create(path)?, width as u16, height as u16, &[])?;
    enc.set_repeat(gif::Repeat::Infinite)?;
    for t in 0..frames {
        let mut rgb = vec![BACKGROUND; width * height * 3];
        for (r, pair) in rows.iter().enumerate() {
            let gt = &pair.truth[t * f..(t + 1) * f];
            let pr = &pair.pred[t * f..(t + 1) * f];
            let y0 = r * (ch + GAP);
            let dims = (h, w, c);
            blit(&mut rgb, width, dims, (0, y0), SCALE, |i| gt[i]);
            blit(&mut rgb, width, dims, (cw + GAP, y0), SCALE, |i| pr[i]);
            blit(&mut rgb, width, dims, (2 * (cw + GAP), y0), SCALE, |i| {
                gt[i].abs_diff(pr[i])
            });
        }
        let mut frame = gif::Frame::from_rgb_speed(width as u16, height as u16, &rgb, 10);
        frame.delay = 25;
        enc.write_frame(&frame)?;
    }
    Ok(())
}

/// A still of the same rollouts: per rollout, a row of ground-truth frames over a row of
/// predicted frames, time left to right, at twice the size.
pub fn write_filmstrip_png(
    path: &Path,
    rows: &[Pair<'_>],
    h: usize,
    w: usize,
    c: usize,
) -> Result<()> {
    const S: usize = 2;
    anyhow::ensure!(
        !rows.is_empty(),
        "no rollouts to draw into {}",
        path.display()
    );
    let f = h * w * c;
    let frames = rows[0].truth.len() / f;
    let (cw, ch) = (w * S, h * S);
    let width = frames * (cw + GAP) - GAP;
    let height = rows.len() * (2 * ch + 3 * GAP) - 2 * GAP;
    let mut rgb = vec![BACKGROUND; width * height * 3];
    for (r, pair) in rows.iter().enumerate() {
        let y0 = r * (2 * ch + 3 * GAP);
        for t in 0..frames {
            let gt = &pair.truth[t * f..(t + 1) * f];
            let pr = &pair.pred[t * f..(t + 1) * f];
            let x0 = t * (cw + GAP);
            blit(&mut rgb, width, (h, w, c), (x0, y0), S, |i| gt[i]);
            blit(&mut rgb, width, (h, w, c), (x0, y0 + ch + GAP), S, |i| {
                pr[i]
            });
        }
    }
    dws_data::write_png(path, width, height, &rgb)?;
    Ok(())
}

/// Sequences of frames `[T_i, H, W, C]`, one row each, time left to right, at twice the
/// size; shorter rows leave the rest blank.
pub fn write_rows_png(path: &Path, rows: &[Vec<u8>], h: usize, w: usize, c: usize) -> Result<()> {
    const S: usize = 2;
    let f = h * w * c;
    let frames = rows.iter().map(|r| r.len() / f).max().unwrap_or(0);
    anyhow::ensure!(frames > 0, "no frames to draw into {}", path.display());
    let (cw, ch) = (w * S, h * S);
    let width = frames * (cw + GAP) - GAP;
    let height = rows.len() * (ch + GAP) - GAP;
    let mut rgb = vec![BACKGROUND; width * height * 3];
    for (r, row) in rows.iter().enumerate() {
        for (t, frame) in row.chunks_exact(f).enumerate() {
            let at = (t * (cw + GAP), r * (ch + GAP));
            blit(&mut rgb, width, (h, w, c), at, S, |i| frame[i]);
        }
    }
    dws_data::write_png(path, width, height, &rgb)?;
    Ok(())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The page `dws eval` writes beside its files: a metrics table, the per-frame plots and
/// the first `gifs` clips as ground truth | prediction | difference.
pub fn eval_html(r: &crate::commands::eval::EvalReport, gifs: usize) -> String {
    let fvd = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.1}"));
    let row = |label: &str, s: &crate::commands::eval::Scores| {
        format!(
            "<tr><td>{}</td><td>{:.2}</td><td>{:.4}</td><td>{:.4}</td><td>{}</td><td>{}</td></tr>",
            escape(label),
            s.psnr,
            s.ssim,
            s.lpips,
            fvd(s.fvd),
            crate::commands::eval::fmt_db(s.psnr_moving)
        )
    };
    let mut clips = String::new();
    for k in 0..gifs {
        let (ep, start) = r.picks[k];
        clips += &format!(
            "<figure><img src=\"gifs/clip{k:03}.gif\" alt=\"clip {k}\"><figcaption>clip {k}: episode {ep}, frames {}–{}</figcaption></figure>\n",
            start + r.context,
            start + r.context + r.horizon - 1
        );
    }
    let note = r
        .fvd_note
        .as_ref()
        .map(|n| format!("<p>FVD: {}</p>", escape(n)))
        .unwrap_or_default();
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dws eval: {name}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.plots, .clips {{ display: flex; flex-wrap: wrap; gap: 1em; }}
.plots figure {{ margin: 0; }} .plots img {{ width: 400px; }}
.clips figure {{ margin: 0; }} .clips img {{ image-rendering: pixelated; }}
figcaption {{ font-size: 0.85em; color: #555; }}
.key {{ font-size: 0.9em; color: #555; }}
</style></head><body>
<h1>dws eval: {name}</h1>
<p>{clips_n} held-out clips from <code>{data}</code> (seed {seed}): {context} context frame(s), {horizon} predicted, sampled with {sampling}, model {actions}. Checkpoint <code>{ckpt}</code>. Took {secs:.0} s.</p>
<table><tr><th></th><th>PSNR (dB) ↑</th><th>SSIM ↑</th><th>LPIPS ↓</th><th>FVD ↓</th><th>moving PSNR (dB) ↑</th></tr>
{model_row}
{other_row}
{ref_row}
</table>
<p class="key">PSNR, SSIM and LPIPS (AlexNet, v0.1) are means over clips and predicted frames; FVD (Kinetics-400 I3D) compares whole clips (context + prediction) with the ground-truth clips. Moving PSNR scores only the pixels where the true frame differs from the last context frame (by more than {moving} in some channel), pooled per clip: whole-frame PSNR barely sees a small moving part such as a robot arm. The reference repeats the last context frame: a model that has learned no motion scores about the same. "Given other clips' actions" rolls the model out from the same starts with the next clip's actions and the same sampler noise, scored against the recorded future: a model that follows its actions does clearly worse there; about the same score means it ignores them.</p>
{note}
<h2>Per predicted frame</h2>
<p class="key">Blue: model. Orange: the model given other clips' actions (models with actions). Grey: repeat the last context frame. x: frame index in the clip.</p>
<div class="plots">
<figure><img src="psnr.png" alt="PSNR per frame"><figcaption>PSNR (dB)</figcaption></figure>
<figure><img src="ssim.png" alt="SSIM per frame"><figcaption>SSIM</figcaption></figure>
<figure><img src="lpips.png" alt="LPIPS per frame"><figcaption>LPIPS</figcaption></figure>
</div>
<h2>Clips</h2>
<p class="key">Each: ground truth | prediction | absolute difference.</p>
<div class="clips">
{clips}</div>
<p class="key">Numbers: <a href="metrics.json">metrics.json</a>.</p>
</body></html>
"#,
        name = escape(&r.name),
        clips_n = r.clips,
        data = escape(&r.data.display().to_string()),
        seed = r.seed,
        context = r.context,
        horizon = r.horizon,
        sampling = escape(&if r.sampling.is_empty() {
            format!("{} Euler step(s) per frame", r.sample_steps.unwrap_or(0))
        } else {
            r.sampling.clone()
        }),
        actions = if r.with_actions {
            "conditioned on actions"
        } else {
            "without actions"
        },
        ckpt = escape(&r.ckpt.display().to_string()),
        secs = r.seconds,
        moving = crate::commands::eval::MOVING_THRESHOLD,
        model_row = row(&r.name, &r.model),
        ref_row = row("repeat last frame", &r.repeat_last),
        other_row = r
            .other_actions
            .as_ref()
            .map(|o| row("… given other clips' actions", o))
            .unwrap_or_default(),
    )
}
