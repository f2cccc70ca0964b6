//! Export to numpy's `.npz` (one archive per episode, the arrays of the episode file), so
//! Python users can `np.load` a dataset without dws.

use crate::episode::f32_bytes;
use crate::{io_err, Actions, Dataset, Result};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One `.npy` file: header (format 1.0) and little-endian data.
fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Writes `episode_NNNNNN.npz` for every episode into `out` (plus a copy of the manifest)
/// and returns the files written. Arrays: frames u8 [T+1,H,W,3], actions int64 [T] or
/// float32 [T,D], rewards float32 [T], terminated and truncated bool [T].
pub fn export_npz(dataset: &Dataset, out: &Path) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(out).map_err(io_err("creating", out))?;
    let mut written = Vec::new();
    for i in 0..dataset.len() {
        let ep = dataset.read_episode(i)?;
        let t = ep.steps();
        let [h, w, c] = ep.frame_shape;
        let actions = match &ep.actions {
            Actions::Discrete(v) => npy(
                "<i8",
                &[t],
                &v.iter()
                    .flat_map(|a| (*a as i64).to_le_bytes())
                    .collect::<Vec<_>>(),
            ),
            Actions::Continuous { dim, data } => npy("<f4", &[t, *dim], &f32_bytes(data)),
        };
        let arrays = [
            ("frames.npy", npy("|u1", &[t + 1, h, w, c], &ep.frames)),
            ("actions.npy", actions),
            ("rewards.npy", npy("<f4", &[t], &f32_bytes(&ep.rewards))),
            ("terminated.npy", npy("|b1", &[t], &ep.terminated)),
            ("truncated.npy", npy("|b1", &[t], &ep.truncated)),
        ];
        let path = out.join(format!("episode_{i:06}.npz"));
        let tmp = out.join(format!(".episode_{i:06}.npz.tmp"));
        let file = fs::File::create(&tmp).map_err(io_err("creating", &tmp))?;
        let mut zip = zip::ZipWriter::new(file);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        for (name, bytes) in arrays {
            let zerr = |e: zip::result::ZipError| crate::DataError::Io {
                action: "writing npz",
                path: tmp.clone(),
                source: std::io::Error::other(e),
            };
            zip.start_file(name, opts).map_err(zerr)?;
            zip.write_all(&bytes).map_err(io_err("writing npz", &tmp))?;
        }
        zip.finish().map_err(|e| crate::DataError::Io {
            action: "finishing npz",
            path: tmp.clone(),
            source: std::io::Error::other(e),
        })?;
        fs::rename(&tmp, &path).map_err(io_err("renaming", &path))?;
        written.push(path);
    }
    let manifest = dataset.dir().join("manifest.json");
    fs::copy(&manifest, out.join("manifest.json")).map_err(io_err("copying", &manifest))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_parsable() {
        let b = npy("|u1", &[2, 3], &[0, 1, 2, 3, 4, 5]);
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
        assert!(header.contains("'shape': (2, 3)") && header.ends_with('\n'));
        assert_eq!(&b[10 + hlen..], &[0, 1, 2, 3, 4, 5]);
        assert!(std::str::from_utf8(&npy("<f4", &[4], &[0; 16])[10..])
            .unwrap_or("")
            .contains("(4,)"));
    }
}
