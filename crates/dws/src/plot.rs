//! Line plots as PNG, drawn pixel by pixel: axes, ticks labelled with a built-in 5×7
//! digit font, one coloured line per series. Titles and legends belong to the page that
//! shows the plot (the HTML report), so the drawing needs no font files.

use anyhow::{ensure, Result};
use std::path::Path;

/// 5×7 glyphs, one row per byte (bit 4 = leftmost column).
fn glyph(c: char) -> Option<[u8; 7]> {
    Some(match c {
        '0' => [0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e],
        '1' => [0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e],
        '2' => [0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f],
        '3' => [0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e],
        '4' => [0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02],
        '5' => [0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e],
        '6' => [0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e],
        '7' => [0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e],
        '9' => [0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c],
        '.' => [0, 0, 0, 0, 0, 0x0c, 0x0c],
        '-' => [0, 0, 0, 0x1f, 0, 0, 0],
        ' ' => [0; 7],
        _ => return None,
    })
}

/// One line of a plot.
pub struct Series<'a> {
    pub values: &'a [f64],
    pub rgb: [u8; 3],
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, rgb: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&rgb);
        }
    }

    /// Text with its top-left corner at (x, y), glyphs scaled by 2; unknown characters
    /// are skipped.
    fn text(&mut self, x: i64, y: i64, s: &str, rgb: [u8; 3]) {
        for (k, c) in s.chars().enumerate() {
            let Some(g) = glyph(c) else { continue };
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            let px = x + (k as i64) * 12 + col * 2 + dx;
                            self.set(px, y + row as i64 * 2 + dy, rgb);
                        }
                    }
                }
            }
        }
    }

    /// A line 2 pixels thick.
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), rgb: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                self.set(x.round() as i64 + dx, y.round() as i64 + dy, rgb);
            }
        }
    }
}

fn label(v: f64, span: f64) -> String {
    let decimals = if span >= 10.0 {
        0
    } else if span >= 1.0 {
        1
    } else if span >= 0.1 {
        2
    } else {
        3
    };
    format!("{v:.decimals$}")
}

/// Writes a plot of `series` against x = `x0, x0 + 1, ...` to `path` (PNG, 640×360).
pub fn write_line_plot(path: &Path, series: &[Series<'_>], x0: usize) -> Result<()> {
    ensure!(
        series.iter().any(|s| !s.values.is_empty()),
        "nothing to plot into {}",
        path.display()
    );
    let (w, h) = (640usize, 360usize);
    let (left, right, top, bottom) = (90.0, 620.0, 20.0, 320.0);
    let mut c = Canvas {
        w,
        h,
        px: vec![255; w * h * 3],
    };
    let finite = || {
        series
            .iter()
            .flat_map(|s| s.values.iter().copied())
            .filter(|v| v.is_finite())
    };
    let (mut lo, mut hi) = (
        finite().fold(f64::INFINITY, f64::min),
        finite().fold(f64::NEG_INFINITY, f64::max),
    );
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.08;
    let (lo, hi) = (lo - pad, hi + pad);
    let n = series
        .iter()
        .map(|s| s.values.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let px = |i: usize| left + (right - left) * i as f64 / (n - 1) as f64;
    let py = |v: f64| bottom - (bottom - top) * (v - lo) / (hi - lo);
    let (axis, grid, ink) = ([60, 60, 60], [225, 225, 225], [40, 40, 40]);
    for k in 0..=4 {
        let v = lo + (hi - lo) * k as f64 / 4.0;
        let y = py(v);
        c.line((left, y), (right, y), grid);
        let s = label(v, hi - lo);
        c.text(left as i64 - 8 - 12 * s.len() as i64, y as i64 - 7, &s, ink);
    }
    let step = n.div_ceil(10).max(1);
    for i in (0..n).step_by(step) {
        let x = px(i);
        c.line((x, bottom), (x, bottom + 5.0), axis);
        let s = (x0 + i).to_string();
        c.text(x as i64 - 6 * s.len() as i64, bottom as i64 + 12, &s, ink);
    }
    c.line((left, top), (left, bottom), axis);
    c.line((left, bottom), (right, bottom), axis);
    for s in series {
        let pts: Vec<(f64, f64)> = s
            .values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, &v)| (px(i), py(v)))
            .collect();
        for pair in pts.windows(2) {
            c.line(pair[0], pair[1], s.rgb);
        }
        for &(x, y) in &pts {
            for dy in -2..=2 {
                for dx in -2..=2 {
                    c.set(x as i64 + dx, y as i64 + dy, s.rgb);
                }
            }
        }
    }
    dws_data::write_png(path, w, h, &c.px)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_character_has_a_glyph() {
        for s in [label(-12.5, 30.0), label(0.123, 0.5), label(3.25, 2.0)] {
            assert!(s.chars().all(|c| glyph(c).is_some()), "{s}");
        }
    }
}
