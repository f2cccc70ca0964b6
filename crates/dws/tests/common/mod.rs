//! Helpers shared by the integration tests: running the binary, and writing the files
//! users bring (PNG images, numpy archives).
#![allow(dead_code)] // each test file uses its own subset

use std::ffi::OsStr;
use std::fmt::Debug;
use std::io::Write;
use std::path::Path;
use std::process::Command;

/// Runs `dws args`: (success, stdout, stderr).
pub fn run<S: AsRef<OsStr> + Debug>(args: &[S]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dws"))
        .env("DWS_LOG", "warn")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `dws args`, which must succeed; returns stdout and stderr together.
pub fn ok<S: AsRef<OsStr> + Debug>(args: &[S]) -> String {
    let (success, out, err) = run(args);
    assert!(success, "dws {args:?} failed: {out}{err}");
    format!("{out}{err}")
}

/// Runs `dws args`, which must fail with a reported error (exit code 1, not a panic);
/// returns stderr.
pub fn fails<S: AsRef<OsStr> + Debug>(args: &[S]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dws"))
        .env("DWS_LOG", "warn")
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "dws {args:?}: expected a clean error, got: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

pub fn png(path: &Path, rgb: &[u8], h: usize, w: usize) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(f), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header().unwrap().write_image_data(rgb).unwrap();
}

/// One `.npy` array: numpy dtype string (`|u1`, `<i8`, `<f4`, ...), shape, raw bytes.
pub struct Npy<'a> {
    pub name: &'a str,
    pub descr: &'a str,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Writes an `.npz` (deflated zip of `.npy` files, as `numpy.savez_compressed` does).
pub fn npz(path: &Path, arrays: &[Npy]) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for a in arrays {
        let dims: Vec<String> = a.shape.iter().map(|d| d.to_string()).collect();
        let shape = if dims.len() == 1 {
            format!("({},)", dims[0])
        } else {
            format!("({})", dims.join(", "))
        };
        let mut header = format!(
            "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
            a.descr
        );
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut npy = b"\x93NUMPY\x01\x00".to_vec();
        npy.extend_from_slice(&(header.len() as u16).to_le_bytes());
        npy.extend_from_slice(header.as_bytes());
        npy.extend_from_slice(&a.data);
        z.start_file(format!("{}.npy", a.name), opts).unwrap();
        z.write_all(&npy).unwrap();
    }
    z.finish().unwrap();
}

/// Little-endian bytes of f32 values.
pub fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Little-endian bytes of i64 values.
pub fn i64s(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// (step, loss) of each line of a run's `metrics.jsonl`.
pub fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}
