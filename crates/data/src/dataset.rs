//! The dataset directory: manifest, atomic writer, validating reader.

use crate::{io_err, ActionSpace, DataError, Episode, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `format` field of every manifest.
pub const FORMAT: &str = "dws-episodes";
/// Newest manifest version this code reads and the one it writes.
pub const VERSION: u32 = 1;
const MANIFEST: &str = "manifest.json";

/// What every episode of a dataset shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetHeader {
    /// e.g. `procgen:coinrun`.
    pub env_id: String,
    /// The env's full config (as the env crate serialises it).
    pub env_config: serde_json::Value,
    pub action_space: ActionSpace,
    /// One phrase per discrete action.
    #[serde(default)]
    pub action_templates: Vec<String>,
    /// `[H, W, 3]`.
    pub frame_shape: [usize; 3],
    /// False where the last frame of a terminated episode repeats the one before
    /// (Procgen never renders its terminal state).
    pub final_frame_rendered: bool,
    /// True for transitions made up by a world model.
    #[serde(default)]
    pub imagined: bool,
}

/// One episode file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeEntry {
    pub file: String,
    pub steps: usize,
    pub bytes: u64,
    pub crc32: u32,
    /// Sum of rewards.
    #[serde(rename = "return")]
    pub ret: f32,
    pub terminated: bool,
    /// The seed the env was reset with, when there was one.
    pub seed: Option<u64>,
    /// Whatever else the env or collector recorded (level seed, policy, ...).
    #[serde(default)]
    pub info: serde_json::Map<String, serde_json::Value>,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    #[serde(flatten)]
    pub header: DatasetHeader,
    /// How the data was made (policy, seeds, command), newest last.
    #[serde(default)]
    pub collections: Vec<serde_json::Value>,
    pub num_episodes: usize,
    pub num_steps: u64,
    pub episodes: Vec<EpisodeEntry>,
}

impl Manifest {
    fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        if !path.is_file() {
            if !dir.exists() {
                return Err(DataError::Invalid(format!(
                    "dataset directory {} does not exist",
                    dir.display()
                )));
            }
            return Err(DataError::NotADataset {
                path: dir.to_path_buf(),
            });
        }
        let text = fs::read_to_string(&path).map_err(io_err("reading", &path))?;
        let bad = |detail: String| DataError::Manifest {
            path: path.clone(),
            detail,
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not JSON ({e})")))?;
        // Check the format and version before the fields, which a newer version may change.
        if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(bad(format!("`format` is not \"{FORMAT}\"")));
        }
        let version = value
            .get("version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad("no numeric `version`".into()))?;
        if version > VERSION as u64 {
            return Err(DataError::FutureVersion {
                path,
                found: version,
                supported: VERSION,
            });
        }
        let m: Manifest = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        if m.num_episodes != m.episodes.len()
            || m.num_steps != m.episodes.iter().map(|e| e.steps as u64).sum::<u64>()
        {
            return Err(bad("episode counts disagree with the episode list".into()));
        }
        Ok(m)
    }

    fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("manifest serialises");
        write_atomic(dir, MANIFEST, text.as_bytes())
    }
}

/// Writes `bytes` to `dir/name` so that a crash leaves either the old file or the new one:
/// temporary file, fsync, rename, fsync of the directory.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let dest = dir.join(name);
    {
        let mut f = fs::File::create(&tmp).map_err(io_err("creating", &tmp))?;
        f.write_all(bytes).map_err(io_err("writing", &tmp))?;
        f.sync_all().map_err(io_err("syncing", &tmp))?;
    }
    fs::rename(&tmp, &dest).map_err(io_err("renaming into place", &dest))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn episode_file(index: usize) -> String {
    format!("ep_{index:06}.safetensors")
}

/// A dataset opened for reading.
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
}

impl Dataset {
    /// Opens and checks the manifest (episode files are checked as they are read).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let manifest = Manifest::read(&dir)?;
        Ok(Self { dir, manifest })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn header(&self) -> &DatasetHeader {
        &self.manifest.header
    }

    pub fn len(&self) -> usize {
        self.manifest.episodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.manifest.episodes.is_empty()
    }

    /// Reads episode `i`, checking size, CRC-32, layout and shapes.
    pub fn read_episode(&self, i: usize) -> Result<Episode> {
        let entry = self.manifest.episodes.get(i).ok_or_else(|| {
            DataError::Invalid(format!(
                "{} has {} episodes, no episode {i}",
                self.dir.display(),
                self.len()
            ))
        })?;
        let path = self.dir.join(&entry.file);
        let bytes = fs::read(&path).map_err(io_err("reading episode", &path))?;
        if bytes.len() as u64 != entry.bytes {
            return Err(DataError::WrongSize {
                path,
                actual: bytes.len() as u64,
                expected: entry.bytes,
            });
        }
        let crc = crc32fast::hash(&bytes);
        if crc != entry.crc32 {
            return Err(DataError::Checksum {
                path,
                actual: crc,
                expected: entry.crc32,
            });
        }
        let h = &self.manifest.header;
        Episode::from_safetensors(&bytes, &path, entry.steps, h.frame_shape, &h.action_space)
    }

    /// Reads every episode (a full check of the dataset).
    pub fn read_all(&self) -> Result<Vec<Episode>> {
        (0..self.len()).map(|i| self.read_episode(i)).collect()
    }
}

/// Appends episodes to a dataset directory, creating it if needed.
pub struct DatasetWriter {
    dir: PathBuf,
    manifest: Manifest,
}

impl DatasetWriter {
    /// Opens `dir` for appending (creating a new dataset when it has no manifest). The
    /// header must match an existing dataset's. Leftovers of a killed writer (temporary
    /// files, episode files the manifest does not list) are removed.
    pub fn create_or_append(dir: impl AsRef<Path>, header: DatasetHeader) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        // Compare and store the header as it reads back from JSON (floats in the env
        // config would otherwise differ in their last digits from the stored copy).
        let text = serde_json::to_string(&header).expect("header serialises");
        let header: DatasetHeader = serde_json::from_str(&text).expect("header round-trips");
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let manifest = if dir.join(MANIFEST).exists() {
            let m = Manifest::read(&dir)?;
            if m.header != header {
                let detail = describe_mismatch(&m.header, &header);
                return Err(DataError::Incompatible { path: dir, detail });
            }
            m
        } else {
            Manifest {
                format: FORMAT.into(),
                version: VERSION,
                header,
                collections: Vec::new(),
                num_episodes: 0,
                num_steps: 0,
                episodes: Vec::new(),
            }
        };
        let listed: std::collections::HashSet<&str> =
            manifest.episodes.iter().map(|e| e.file.as_str()).collect();
        for entry in fs::read_dir(&dir)
            .map_err(io_err("listing", &dir))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale_episode = name.starts_with("ep_")
                && name.ends_with(".safetensors")
                && !listed.contains(name.as_str());
            if (name.starts_with('.') && name.contains(".tmp-")) || stale_episode {
                tracing::info!("removing {} left by an interrupted writer", name);
                let _ = fs::remove_file(entry.path());
            }
        }
        let writer = Self { dir, manifest };
        writer.manifest.write(&writer.dir)?;
        Ok(writer)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Index the next appended episode gets.
    pub fn next_index(&self) -> usize {
        self.manifest.episodes.len()
    }

    /// Records how a batch of episodes is being made.
    pub fn add_collection(&mut self, info: serde_json::Value) -> Result<()> {
        self.manifest.collections.push(info);
        self.manifest.write(&self.dir)
    }

    /// Writes one episode file, then the manifest that lists it.
    pub fn append(
        &mut self,
        episode: &Episode,
        seed: Option<u64>,
        info: serde_json::Map<String, serde_json::Value>,
    ) -> Result<&EpisodeEntry> {
        self.append_unlisted(episode, seed, info)?;
        self.flush()?;
        Ok(self.manifest.episodes.last().expect("just pushed"))
    }

    /// Writes the manifest, listing every episode appended so far.
    pub fn flush(&self) -> Result<()> {
        self.manifest.write(&self.dir)
    }

    /// Writes one episode file and adds it to the in-memory manifest only: the manifest
    /// on disk lists it after the next [`Self::flush`] (or [`Self::append`]). Rewriting
    /// the manifest after every episode costs time quadratic in the number of episodes;
    /// a bulk writer appends this way and flushes every few seconds. A crash loses the
    /// unlisted episodes (their files are removed when the dataset is next opened for
    /// writing), never the listed ones.
    pub fn append_unlisted(
        &mut self,
        episode: &Episode,
        seed: Option<u64>,
        info: serde_json::Map<String, serde_json::Value>,
    ) -> Result<&EpisodeEntry> {
        let h = &self.manifest.header;
        if episode.frame_shape != h.frame_shape {
            return Err(DataError::BadEpisode(format!(
                "frame shape {:?}, the dataset's is {:?}",
                episode.frame_shape, h.frame_shape
            )));
        }
        let kind_ok = matches!(
            (&episode.actions, &h.action_space),
            (crate::Actions::Discrete(_), ActionSpace::Discrete { .. })
        ) || matches!(
            (&episode.actions, &h.action_space),
            (crate::Actions::Continuous { dim, .. }, ActionSpace::Continuous { dim: d, .. }) if dim == d
        );
        if !kind_ok {
            return Err(DataError::BadEpisode(
                "actions do not match the dataset's action space".into(),
            ));
        }
        let index = self.next_index();
        let file = episode_file(index);
        // One metadata key holding sorted JSON: a map with several keys would be written
        // in hash order, and the same episode must always give the same bytes.
        let about = serde_json::json!({
            "format": FORMAT,
            "env_id": h.env_id,
            "episode": index,
            "seed": seed,
        });
        let meta = HashMap::from([("dws".to_string(), about.to_string())]);
        let bytes = episode.to_safetensors(meta)?;
        write_atomic(&self.dir, &file, &bytes)?;
        self.manifest.episodes.push(EpisodeEntry {
            file,
            steps: episode.steps(),
            bytes: bytes.len() as u64,
            crc32: crc32fast::hash(&bytes),
            ret: episode.total_reward(),
            terminated: episode.terminated.last().copied() == Some(1),
            seed,
            info,
        });
        self.manifest.num_episodes = self.manifest.episodes.len();
        self.manifest.num_steps += episode.steps() as u64;
        Ok(self.manifest.episodes.last().expect("just pushed"))
    }
}

fn describe_mismatch(have: &DatasetHeader, want: &DatasetHeader) -> String {
    if have.env_id != want.env_id {
        format!(
            "it holds {} episodes and these are {}; collect into another directory",
            have.env_id, want.env_id
        )
    } else if have.env_config != want.env_config {
        format!(
            "it was collected with env options {} and these use {}",
            have.env_config, want.env_config
        )
    } else {
        "its action space, frame shape or templates differ from these episodes'".into()
    }
}
