//! `dws metrics` on files: the same inputs through every format give the library's
//! numbers (fixture of the metrics crate), and bad inputs are refused naming the file.

use burn::backend::Flex;
use dws_metrics::video::Clip;
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

mod common;
use common::{png, run};
use std::process::Command;

fn json(args: &[&str]) -> serde_json::Value {
    let (ok, out, err) = run(args);
    assert!(ok, "dws {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn fail(args: &[&str]) -> String {
    let (ok, _, err) = run(args);
    assert!(!ok, "dws {args:?} should fail");
    err
}

struct Fixture(Vec<u8>);

impl Fixture {
    fn load() -> Self {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../metrics/tests/fixtures/metrics_reference.safetensors"
        );
        Self(std::fs::read(p).unwrap())
    }
    fn u8(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::U8);
        (t.shape().to_vec(), t.data().to_vec())
    }
    fn f64(&self, name: &str) -> Vec<f64> {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).unwrap();
        match t.dtype() {
            Dtype::F64 => t
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            d => panic!("{d:?}"),
        }
    }
}

/// A GIF with an exact palette per frame (the frames have at most 256 colours), so it
/// is lossless.
fn gif(path: &Path, frames: &[u8], t: usize, h: usize, w: usize) {
    let f = std::fs::File::create(path).unwrap();
    let mut enc = gif::Encoder::new(f, w as u16, h as u16, &[]).unwrap();
    for k in 0..t {
        let px = &frames[k * h * w * 3..(k + 1) * h * w * 3];
        let mut palette: Vec<[u8; 3]> = Vec::new();
        let idx: Vec<u8> = px
            .chunks(3)
            .map(|c| {
                let c = [c[0], c[1], c[2]];
                let i = palette.iter().position(|p| *p == c).unwrap_or_else(|| {
                    palette.push(c);
                    palette.len() - 1
                });
                i as u8
            })
            .collect();
        assert!(palette.len() <= 256);
        let flat: Vec<u8> = palette.concat();
        let frame = gif::Frame::from_palette_pixels(w as u16, h as u16, idx, flat, None);
        enc.write_frame(&frame).unwrap();
    }
}

fn npz(path: &Path, name: &str, data: &[u8], shape: &[usize]) {
    common::npz(
        path,
        &[common::Npy {
            name,
            descr: "|u1",
            shape: shape.to_vec(),
            data: data.to_vec(),
        }],
    );
}

fn safetensors_file(path: &Path, name: &str, data: &[u8], shape: &[usize]) {
    let view = safetensors::tensor::TensorView::new(Dtype::U8, shape.to_vec(), data).unwrap();
    let bytes = safetensors::serialize([(name, view)], &None).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn pair_metrics_of_png_images_match_the_references() {
    let fx = Fixture::load();
    let (s, a) = fx.u8("images_a");
    let (_, b) = fx.u8("images_b");
    let tmp = tempfile::tempdir().unwrap();
    let per = s[1] * s[2] * 3;
    for i in 0..s[0] {
        png(
            &tmp.path().join(format!("a/{i}.png")),
            &a[i * per..(i + 1) * per],
            64,
            64,
        );
        png(
            &tmp.path().join(format!("b/{i}.png")),
            &b[i * per..(i + 1) * per],
            64,
            64,
        );
    }
    let (pa, pb) = (tmp.path().join("a"), tmp.path().join("b"));
    let r = json(&[
        "metrics",
        "pair",
        pa.to_str().unwrap(),
        pb.to_str().unwrap(),
        "--json",
    ]);
    let items = r["items"].as_array().unwrap();
    assert_eq!(items.len(), 6);
    let (wp, ws, wl) = (fx.f64("psnr"), fx.f64("ssim"), fx.f64("lpips"));
    for it in items {
        let i: usize = it["name"].as_str().unwrap().parse().unwrap();
        let g = |k: &str| it[k].as_f64().unwrap();
        assert!(
            (g("psnr") - wp[i]).abs() < 1e-4,
            "{i}: {} vs {}",
            g("psnr"),
            wp[i]
        );
        assert!(
            (g("ssim") - ws[i]).abs() < 1e-4,
            "{i}: {} vs {}",
            g("ssim"),
            ws[i]
        );
        assert!(
            (g("lpips") - wl[i]).abs() < 1e-3,
            "{i}: {} vs {}",
            g("lpips"),
            wl[i]
        );
    }
    let mean = wp.iter().sum::<f64>() / 6.0;
    assert!((r["psnr"].as_f64().unwrap() - mean).abs() < 1e-4);

    // A JPEG of the same image reads as that image, up to compression.
    let jpg = tmp.path().join("a0.jpg");
    image::RgbImage::from_raw(64, 64, a[..per].to_vec())
        .unwrap()
        .save_with_format(&jpg, image::ImageFormat::Jpeg)
        .unwrap();
    let r = json(&[
        "metrics",
        "pair",
        tmp.path().join("a/0.png").to_str().unwrap(),
        jpg.to_str().unwrap(),
        "--json",
    ]);
    let p = r["psnr"].as_f64().unwrap();
    assert!(p > 25.0 && p < 100.0, "JPEG round trip: {p} dB");

    // Only some metrics; sizes that do not match; a file that is not an image.
    let r = json(&[
        "metrics",
        "pair",
        pa.to_str().unwrap(),
        pb.to_str().unwrap(),
        "--json",
        "--metrics",
        "psnr",
    ]);
    assert!(r["ssim"].is_null() && r["psnr"].is_number());
    png(
        &tmp.path().join("small.png"),
        &vec![0u8; 32 * 32 * 3],
        32,
        32,
    );
    let e = fail(&[
        "metrics",
        "pair",
        tmp.path().join("a/0.png").to_str().unwrap(),
        tmp.path().join("small.png").to_str().unwrap(),
    ]);
    assert!(e.contains("64×64") && e.contains("32×32"), "{e}");
    std::fs::write(tmp.path().join("b/5.png"), b"not a png").unwrap();
    let e = fail(&[
        "metrics",
        "pair",
        pa.to_str().unwrap(),
        pb.to_str().unwrap(),
    ]);
    assert!(e.contains("5.png"), "{e}");
    std::fs::remove_file(tmp.path().join("b/5.png")).unwrap();
    let e = fail(&[
        "metrics",
        "pair",
        pa.to_str().unwrap(),
        pb.to_str().unwrap(),
    ]);
    assert!(e.contains("`5`") && e.contains("no match"), "{e}");
    let e = fail(&[
        "metrics",
        "pair",
        pa.to_str().unwrap(),
        pb.to_str().unwrap(),
        "--metrics",
        "fvd",
    ]);
    assert!(e.contains("unknown metric `fvd`"), "{e}");
}

/// The fixture clips with colours rounded to 6 levels per channel (at most 216 colours,
/// so GIFs hold them exactly): real = both clips, fake = both clips flipped left-right
/// and played backwards.
fn clip_sets() -> (Vec<u8>, Vec<u8>, [usize; 4]) {
    let (s, v) = Fixture::load().u8("clips");
    let (n, t, h, w) = (s[0], s[1], s[2], s[3]);
    let real: Vec<u8> = v
        .iter()
        .map(|&x| ((x as f32 / 51.0).round() * 51.0) as u8)
        .collect();
    let mut fake = vec![0u8; real.len()];
    for i in 0..n {
        for k in 0..t {
            for y in 0..h {
                for x in 0..w {
                    for c in 0..3 {
                        let src = (((i * t + k) * h + y) * w + x) * 3 + c;
                        let dst = (((i * t + (t - 1 - k)) * h + y) * w + (w - 1 - x)) * 3 + c;
                        fake[dst] = real[src];
                    }
                }
            }
        }
    }
    (real, fake, [n, t, h, w])
}

/// Writes a set of clips in `format` under `dir` and returns the path to pass.
fn write_set(dir: &Path, format: &str, clips: &[u8], [n, t, h, w]: [usize; 4]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let per = t * h * w * 3;
    match format {
        "frames" => {
            for i in 0..n {
                for k in 0..t {
                    let f = &clips[i * per + k * h * w * 3..i * per + (k + 1) * h * w * 3];
                    png(&dir.join(format!("clip{i}/{k:03}.png")), f, h, w);
                }
            }
            dir.to_path_buf()
        }
        "gif" => {
            for i in 0..n {
                gif(
                    &dir.join(format!("clip{i}.gif")),
                    &clips[i * per..(i + 1) * per],
                    t,
                    h,
                    w,
                );
            }
            dir.to_path_buf()
        }
        "npz" => {
            let p = dir.join("set.npz");
            npz(&p, "videos", clips, &[n, t, h, w, 3]);
            p
        }
        "safetensors" => {
            let p = dir.join("set.safetensors");
            safetensors_file(&p, "videos", clips, &[n, t, h, w, 3]);
            p
        }
        _ => unreachable!(),
    }
}

#[test]
fn fvd_is_the_same_through_every_format_and_equals_the_library() {
    let (real, fake, shape) = clip_sets();
    let [n, t, h, w] = shape;
    let tmp = tempfile::tempdir().unwrap();
    let per = t * h * w * 3;
    let mut values = Vec::new();
    for format in ["frames", "gif", "npz", "safetensors"] {
        let r = write_set(&tmp.path().join(format).join("real"), format, &real, shape);
        let f = write_set(&tmp.path().join(format).join("fake"), format, &fake, shape);
        let out = json(&[
            "metrics",
            "fvd",
            r.to_str().unwrap(),
            f.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(
            (out["real"].as_u64(), out["fake"].as_u64()),
            (Some(2), Some(2)),
            "{format}"
        );
        values.push((format, out["fvd"].as_f64().unwrap()));
    }
    // The library on the same bytes.
    let device = Default::default();
    let net = dws_metrics::i3d::I3d::<Flex>::from_asset(&device).unwrap();
    let clips =
        |v: &[u8]| -> Vec<Vec<u8>> { (0..n).map(|i| v[i * per..(i + 1) * per].to_vec()).collect() };
    let (rc, fc) = (clips(&real), clips(&fake));
    let rs: Vec<Clip<'_>> = rc.iter().map(|v| Clip::new(v, t, h, w).unwrap()).collect();
    let fs: Vec<Clip<'_>> = fc.iter().map(|v| Clip::new(v, t, h, w).unwrap()).collect();

    let want = dws_metrics::video::fvd(&net, &rs, &fs, &device).unwrap();
    assert!(
        want > 1.0,
        "flipped, reversed clips are not the same set: {want}"
    );
    for (format, v) in &values {
        assert!(
            (v - want).abs() <= 1e-3 * want,
            "{format}: {v} vs library {want}"
        );
    }

    // Features saved once and reused give the same FVD.
    let feats = tmp.path().join("feats.safetensors");
    let (r, f) = (
        tmp.path().join("npz/real/set.npz"),
        tmp.path().join("npz/fake/set.npz"),
    );
    json(&[
        "metrics",
        "fvd",
        r.to_str().unwrap(),
        f.to_str().unwrap(),
        "--features-out",
        feats.to_str().unwrap(),
        "--json",
    ]);
    let again = json(&[
        "metrics",
        "fvd",
        f.to_str().unwrap(),
        "--real-features",
        feats.to_str().unwrap(),
        "--json",
    ]);
    assert!((again["fvd"].as_f64().unwrap() - want).abs() <= 1e-3 * want);
    let e = fail(&[
        "metrics",
        "fvd",
        f.to_str().unwrap(),
        "--real-features",
        feats.to_str().unwrap(),
        "--frames",
        "12",
    ]);
    assert!(e.contains("16-frame"), "{e}");

    // The same clip pair scored through GIFs and through frame folders (whose images
    // are matched by name, one item per frame) agrees.
    let g = |fmt: &str, set: &str, item: &str| tmp.path().join(fmt).join(set).join(item);
    let via_gif = json(&[
        "metrics",
        "pair",
        g("gif", "real", "clip0.gif").to_str().unwrap(),
        g("gif", "fake", "clip0.gif").to_str().unwrap(),
        "--json",
    ]);
    let via_png = json(&[
        "metrics",
        "pair",
        g("frames", "real", "clip0").to_str().unwrap(),
        g("frames", "fake", "clip0").to_str().unwrap(),
        "--json",
    ]);
    for k in ["psnr", "ssim", "lpips"] {
        let (a, b) = (via_gif[k].as_f64().unwrap(), via_png[k].as_f64().unwrap());
        assert!((a - b).abs() < 1e-9, "{k}: {a} vs {b}");
    }
    assert_eq!(via_gif["items"][0]["frames"], 16);
    assert_eq!(via_png["items"].as_array().unwrap().len(), 16);

    // Too few videos, too short videos, a damaged array file.
    let one = tmp.path().join("one");
    write_set(&one, "gif", &real[..per], [1, t, h, w]);
    let e = fail(&["metrics", "fvd", one.to_str().unwrap(), f.to_str().unwrap()]);
    assert!(
        e.contains("at least two videos") && e.contains("one"),
        "{e}"
    );
    let e = fail(&[
        "metrics",
        "fvd",
        r.to_str().unwrap(),
        f.to_str().unwrap(),
        "--frames",
        "20",
    ]);
    assert!(e.contains("set[0] has 16 frames; 20 are needed"), "{e}");
    let bytes = std::fs::read(tmp.path().join("safetensors/fake/set.safetensors")).unwrap();
    let cut = tmp.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = fail(&["metrics", "fvd", r.to_str().unwrap(), cut.to_str().unwrap()]);
    assert!(
        e.contains("cut.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn videos_are_read_through_ffmpeg_or_the_error_says_how_to_get_it() {
    let has_ffmpeg = Command::new("ffmpeg").arg("-version").output().is_ok();
    let tmp = tempfile::tempdir().unwrap();
    let mp4 = tmp.path().join("clip.mp4");
    std::fs::write(&mp4, b"not really a video").unwrap();
    let e = fail(&[
        "metrics",
        "pair",
        mp4.to_str().unwrap(),
        mp4.to_str().unwrap(),
    ]);
    if !has_ffmpeg {
        assert!(
            e.contains("needs ffmpeg") && e.contains("apt-get install ffmpeg"),
            "{e}"
        );
        return;
    }
    assert!(e.contains("clip.mp4"), "{e}");
    // A lossless video made by ffmpeg from a GIF decodes to the GIF's frames.
    let (real, _, [_, t, h, w]) = clip_sets();
    let g = tmp.path().join("clip.gif");
    gif(&g, &real[..t * h * w * 3], t, h, w);
    let mkv = tmp.path().join("clip.mkv");
    let ok = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-i"])
        .arg(&g)
        .args(["-c:v", "ffv1", "-pix_fmt", "bgr0"])
        .arg(&mkv)
        .status()
        .unwrap()
        .success();
    assert!(ok, "ffmpeg could not write {}", mkv.display());
    let r = json(&[
        "metrics",
        "pair",
        g.to_str().unwrap(),
        mkv.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(r["items"][0]["frames"], 16, "{r}");
    assert_eq!(r["psnr"].as_f64(), Some(100.0), "{r}");
}
