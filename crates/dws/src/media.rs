//! Reading videos and images that come from anywhere, for `dws metrics`: PNG/JPEG images,
//! GIFs, folders of frame images, `.npz`/`.safetensors` arrays of u8 videos, and MP4 (and
//! other containers) through `ffmpeg` when it is installed.
//!
//! A path names a set of items: a file is one item (an array file holds one per video),
//! a folder's entries are items: images, video files, array files, and sub-folders, each
//! of which is one video of frame images in file-name order. Items are read one at a
//! time, and array files are read sequentially, so memory stays bounded by one video
//! however many there are.

use anyhow::{bail, ensure, Context, Result};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// A decoded video (an image is a 1-frame video): `[t, h, w, 3]` u8.
#[derive(Debug, Clone)]
pub struct Video {
    pub name: String,
    pub frames: Vec<u8>,
    pub t: usize,
    pub h: usize,
    pub w: usize,
}

impl Video {
    /// The first `n` frames, or an error naming the video when it is shorter.
    pub fn first(mut self, n: usize) -> Result<Self> {
        ensure!(
            self.t >= n,
            "{} has {} frames; {n} are needed",
            self.name,
            self.t
        );
        self.frames.truncate(n * self.h * self.w * 3);
        self.t = n;
        Ok(self)
    }
}

/// Where one video comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// An image, GIF or video container file.
    File(PathBuf),
    /// A folder of frame images, in file-name order.
    FrameDir(PathBuf),
    /// Video `index` of an array file (`.npz`/`.safetensors`) holding `[N, T, H, W, 3]`
    /// or one `[T, H, W, 3]` video.
    Array { path: PathBuf, index: usize },
}

pub(crate) const IMAGE_EXT: &[&str] = &["png", "jpg", "jpeg"];
pub(crate) const VIDEO_EXT: &[&str] = &["gif", "mp4", "webm", "avi", "mov", "mkv"];
const ARRAY_EXT: &[&str] = &["npz", "safetensors"];

pub(crate) fn ext(p: &Path) -> String {
    p.extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default()
}

pub(crate) fn is_image(p: &Path) -> bool {
    IMAGE_EXT.contains(&ext(p).as_str())
}

pub(crate) fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading folder {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading folder {}", dir.display()))?;
    v.retain(|p| {
        !p.file_name()
            .map(|n| n.to_string_lossy().starts_with('.'))
            .unwrap_or(true)
    });
    v.sort();
    Ok(v)
}

pub(crate) fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// The items of a path, each with the name pairs are matched by (file name without
/// extension; `name[i]` for the videos of an array file).
pub fn list(path: &Path) -> Result<Vec<(String, Item)>> {
    if path.is_dir() {
        let entries = sorted_entries(path)?;
        let mut out = Vec::new();
        for p in entries {
            if p.is_dir() {
                out.push((stem(&p), Item::FrameDir(p)));
            } else if ARRAY_EXT.contains(&ext(&p).as_str()) {
                out.extend(array_items(&p)?);
            } else if is_image(&p) || VIDEO_EXT.contains(&ext(&p).as_str()) {
                out.push((stem(&p), Item::File(p)));
            }
        }
        ensure!(
            !out.is_empty(),
            "{} holds no images, videos, frame folders or arrays",
            path.display()
        );
        Ok(out)
    } else if path.is_file() {
        let e = ext(path);
        if ARRAY_EXT.contains(&e.as_str()) {
            array_items(path)
        } else if IMAGE_EXT.contains(&e.as_str()) || VIDEO_EXT.contains(&e.as_str()) {
            Ok(vec![(stem(path), Item::File(path.to_path_buf()))])
        } else {
            bail!(
                "{}: unknown kind of file (images: {}; videos: {}; arrays: {})",
                path.display(),
                IMAGE_EXT.join(", "),
                VIDEO_EXT.join(", "),
                ARRAY_EXT.join(", ")
            )
        }
    } else {
        bail!("{} does not exist", path.display())
    }
}

fn array_items(path: &Path) -> Result<Vec<(String, Item)>> {
    let info = ArrayInfo::read(path)?;
    let name = stem(path);
    Ok((0..info.n)
        .map(|index| {
            (
                format!("{name}[{index}]"),
                Item::Array {
                    path: path.to_path_buf(),
                    index,
                },
            )
        })
        .collect())
}

fn rgb_of(img: image::DynamicImage) -> (Vec<u8>, usize, usize) {
    let rgb = img.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    (rgb.into_raw(), h, w)
}

pub(crate) fn read_image(path: &Path) -> Result<(Vec<u8>, usize, usize)> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("reading {}", path.display()))?
        .decode()
        .with_context(|| format!("decoding image {}", path.display()))?;
    Ok(rgb_of(img))
}

pub(crate) fn read_gif(path: &Path) -> Result<Video> {
    use image::AnimationDecoder;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let dec = image::codecs::gif::GifDecoder::new(BufReader::new(file))
        .with_context(|| format!("decoding GIF {}", path.display()))?;
    let mut frames = Vec::new();
    let (mut h, mut w, mut t) = (0, 0, 0);
    for f in dec.into_frames() {
        let f = f.with_context(|| format!("decoding GIF {}", path.display()))?;
        let (data, fh, fw) = rgb_of(image::DynamicImage::ImageRgba8(f.into_buffer()));
        (h, w) = (fh, fw);
        frames.extend(data);
        t += 1;
    }
    ensure!(t > 0, "GIF {} has no frames", path.display());
    Ok(Video {
        name: stem(path),
        frames,
        t,
        h,
        w,
    })
}

pub(crate) fn read_frame_dir(dir: &Path) -> Result<Video> {
    let files: Vec<PathBuf> = sorted_entries(dir)?
        .into_iter()
        .filter(|p| p.is_file() && is_image(p))
        .collect();
    ensure!(!files.is_empty(), "{} holds no frame images", dir.display());
    let mut frames = Vec::new();
    let (data, h, w) = read_image(&files[0])?;
    frames.extend(data);
    for f in &files[1..] {
        let (data, fh, fw) = read_image(f)?;
        ensure!(
            (fh, fw) == (h, w),
            "{} is {fh}×{fw} but {} is {h}×{w}: the frames of a video must match",
            f.display(),
            files[0].display()
        );
        frames.extend(data);
    }
    Ok(Video {
        name: stem(dir),
        frames,
        t: files.len(),
        h,
        w,
    })
}

pub(crate) fn read_with_ffmpeg(path: &Path) -> Result<Video> {
    use std::process::Command;
    let missing = |e: std::io::Error| {
        anyhow::anyhow!(
            "reading {} needs ffmpeg ({e}): install it (Debian: `apt-get install ffmpeg`) or convert the video to a GIF or a folder of PNG frames",
            path.display()
        )
    };
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=width,height",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .map_err(missing)?;
    ensure!(
        probe.status.success(),
        "ffprobe cannot read {}: {}",
        path.display(),
        String::from_utf8_lossy(&probe.stderr).trim()
    );
    let text = String::from_utf8_lossy(&probe.stdout);
    let dims: Vec<usize> = text
        .trim()
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let [w, h] = dims[..] else {
        bail!("ffprobe found no video stream in {}", path.display());
    };
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .map_err(missing)?;
    ensure!(
        out.status.success(),
        "ffmpeg cannot decode {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let per = h * w * 3;
    ensure!(
        per > 0 && !out.stdout.is_empty() && out.stdout.len() % per == 0,
        "ffmpeg gave {} bytes for {w}×{h} frames of {}",
        out.stdout.len(),
        path.display()
    );
    Ok(Video {
        name: stem(path),
        t: out.stdout.len() / per,
        frames: out.stdout,
        h,
        w,
    })
}

/// Where the u8 videos of an array file are.
struct ArrayInfo {
    n: usize,
    t: usize,
    h: usize,
    w: usize,
    /// safetensors: byte offset of the data in the file; npz: name of the zip entry and
    /// offset of the data inside it.
    at: ArrayAt,
}

enum ArrayAt {
    Safetensors(u64),
    Npz { entry: String, offset: u64 },
}

/// Array names tried, in order, when a file holds several.
const ARRAY_NAMES: &[&str] = &["videos", "frames", "video", "x"];

fn pick_array(path: &Path, names: &[String]) -> Result<String> {
    if names.len() == 1 {
        return Ok(names[0].clone());
    }
    for want in ARRAY_NAMES {
        if let Some(n) = names.iter().find(|n| n.trim_end_matches(".npy") == *want) {
            return Ok(n.clone());
        }
    }
    bail!(
        "{} holds arrays {:?}; name the videos array `videos` or `frames`",
        path.display(),
        names
    )
}

fn video_shape(path: &Path, name: &str, shape: &[usize]) -> Result<(usize, usize, usize, usize)> {
    match *shape {
        [n, t, h, w, 3] => Ok((n, t, h, w)),
        [t, h, w, 3] => Ok((1, t, h, w)),
        _ => bail!(
            "{}: array `{name}` has shape {shape:?}; videos are u8 [N, T, H, W, 3] or [T, H, W, 3]",
            path.display()
        ),
    }
}

/// Parses a `.npy` header: (dtype, fortran order, shape, header length in bytes).
pub(crate) fn npy_header(
    r: &mut impl Read,
    path: &Path,
) -> Result<(String, bool, Vec<usize>, u64)> {
    let mut pre = [0u8; 8];
    r.read_exact(&mut pre)
        .with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        &pre[..6] == b"\x93NUMPY",
        "{}: not a .npy array",
        path.display()
    );
    let (len, skip) = match pre[6] {
        1 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            (u16::from_le_bytes(b) as usize, 10)
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            r.read_exact(&mut b)?;
            (u32::from_le_bytes(b) as usize, 12)
        }
        v => bail!("{}: .npy version {v} is not supported", path.display()),
    };
    let mut h = vec![0u8; len];
    r.read_exact(&mut h)?;
    let h = String::from_utf8_lossy(&h);
    let field = |key: &str| -> Option<String> {
        let at = h.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = h[at..].trim_start().strip_prefix(':')?.trim_start();
        if let Some(r) = rest.strip_prefix('(') {
            Some(r[..r.find(')')?].to_string())
        } else {
            let end = rest.find([',', '}']).unwrap_or(rest.len());
            Some(rest[..end].trim().trim_matches('\'').to_string())
        }
    };
    let descr =
        field("descr").with_context(|| format!("{}: .npy header without descr", path.display()))?;
    let fortran = field("fortran_order").as_deref() == Some("True");
    let shape = field("shape")
        .with_context(|| format!("{}: .npy header without shape", path.display()))?
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: bad .npy shape", path.display()))?;
    Ok((descr, fortran, shape, (skip + len) as u64))
}

impl ArrayInfo {
    fn read(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        if ext(path) == "safetensors" {
            let mut r = BufReader::new(file);
            let mut b = [0u8; 8];
            r.read_exact(&mut b)
                .with_context(|| format!("{}: not a safetensors file", path.display()))?;
            let n = u64::from_le_bytes(b);
            ensure!(n < 100 << 20, "{}: not a safetensors file", path.display());
            let mut header = vec![0u8; n as usize];
            r.read_exact(&mut header)
                .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
            let header: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&header)
                    .with_context(|| format!("{}: bad safetensors header", path.display()))?;
            let names: Vec<String> = header
                .keys()
                .filter(|k| *k != "__metadata__")
                .cloned()
                .collect();
            let name = pick_array(path, &names)?;
            let t = &header[&name];
            ensure!(
                t["dtype"] == "U8",
                "{}: array `{name}` is {}, videos must be U8",
                path.display(),
                t["dtype"]
            );
            let shape: Vec<usize> = t["shape"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_u64().map(|v| v as usize))
                        .collect()
                })
                .unwrap_or_default();
            let (n_, tt, h, w) = video_shape(path, &name, &shape)?;
            let start = t["data_offsets"][0].as_u64().unwrap_or(0);
            let len = std::fs::metadata(path)?.len();
            ensure!(
                8 + n + start + (n_ * tt * h * w * 3) as u64 <= len,
                "{}: truncated (array `{name}` runs past the end)",
                path.display()
            );
            Ok(Self {
                n: n_,
                t: tt,
                h,
                w,
                at: ArrayAt::Safetensors(8 + n + start),
            })
        } else {
            let mut zip = zip::ZipArchive::new(file)
                .with_context(|| format!("{}: not an .npz (zip) file", path.display()))?;
            let names: Vec<String> = zip.file_names().map(String::from).collect();
            let name = pick_array(path, &names)?;
            let mut entry = zip
                .by_name(&name)
                .with_context(|| format!("{}: reading `{name}`", path.display()))?;
            let (descr, fortran, shape, offset) = npy_header(&mut entry, path)?;
            ensure!(
                descr == "|u1" || descr == "<u1",
                "{}: array `{name}` has dtype {descr}, videos must be uint8",
                path.display()
            );
            ensure!(
                !fortran,
                "{}: Fortran-order arrays are not supported",
                path.display()
            );
            let (n_, t, h, w) = video_shape(path, &name, &shape)?;
            Ok(Self {
                n: n_,
                t,
                h,
                w,
                at: ArrayAt::Npz {
                    entry: name,
                    offset,
                },
            })
        }
    }
}

/// Reads the videos of a set one after another; an array file stays open between its
/// videos, so a set of N videos in one array is read once, front to back.
pub struct Reader {
    open: Option<(PathBuf, ArrayInfo, Box<dyn Read>, usize)>,
}

impl Default for Reader {
    fn default() -> Self {
        Self::new()
    }
}

impl Reader {
    pub fn new() -> Self {
        Self { open: None }
    }

    pub fn read(&mut self, name: &str, item: &Item) -> Result<Video> {
        let mut v = match item {
            Item::FrameDir(d) => read_frame_dir(d)?,
            Item::File(p) => match ext(p).as_str() {
                "gif" => read_gif(p)?,
                e if IMAGE_EXT.contains(&e) => {
                    let (frames, h, w) = read_image(p)?;
                    Video {
                        name: stem(p),
                        frames,
                        t: 1,
                        h,
                        w,
                    }
                }
                _ => read_with_ffmpeg(p)?,
            },
            Item::Array { path, index } => self.read_array(path, *index)?,
        };
        v.name = name.to_string();
        Ok(v)
    }

    fn read_array(&mut self, path: &Path, index: usize) -> Result<Video> {
        let reuse = matches!(&self.open, Some((p, _, _, next)) if p == path && *next <= index);
        if !reuse {
            let info = ArrayInfo::read(path)?;
            let reader: Box<dyn Read> = match &info.at {
                ArrayAt::Safetensors(offset) => {
                    let mut f = std::fs::File::open(path)?;
                    f.seek(SeekFrom::Start(*offset))?;
                    Box::new(BufReader::new(f))
                }
                ArrayAt::Npz { entry, offset } => {
                    // Entries may be compressed: decompress from the start of the entry.
                    let zip = zip::ZipArchive::new(std::fs::File::open(path)?)?;
                    let mut r = ZipEntryReader::new(zip, entry)?;
                    std::io::copy(&mut (&mut r).take(*offset), &mut std::io::sink())?;
                    Box::new(r)
                }
            };
            self.open = Some((path.to_path_buf(), info, reader, 0));
        }
        let (_, info, reader, next) = self.open.as_mut().expect("opened above");
        let per = info.t * info.h * info.w * 3;
        ensure!(
            index < info.n,
            "{} holds {} videos, not {}",
            path.display(),
            info.n,
            index + 1
        );
        std::io::copy(
            &mut reader.take(((index - *next) * per) as u64),
            &mut std::io::sink(),
        )?;
        let mut frames = vec![0u8; per];
        reader
            .read_exact(&mut frames)
            .with_context(|| format!("{}: truncated at video {index}", path.display()))?;
        *next = index + 1;
        Ok(Video {
            name: String::new(),
            frames,
            t: info.t,
            h: info.h,
            w: info.w,
        })
    }
}

/// A zip entry streamed by a thread that owns the archive (the zip crate's entry readers
/// borrow it), in 1 MiB chunks through a channel of four: memory stays bounded however
/// large the entry.
pub(crate) struct ZipEntryReader {
    rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    chunk: std::io::Cursor<Vec<u8>>,
}

impl ZipEntryReader {
    pub(crate) fn new(mut zip: zip::ZipArchive<std::fs::File>, entry: &str) -> Result<Self> {
        zip.by_name(entry)?; // fail here, not in the thread, when it is missing
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        let entry = entry.to_string();
        std::thread::spawn(move || {
            let mut e = match zip.by_name(&entry) {
                Ok(e) => e,
                Err(err) => {
                    let _ = tx.send(Err(std::io::Error::other(err)));
                    return;
                }
            };
            loop {
                let mut buf = vec![0u8; 1 << 20];
                match e.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.send(Ok(buf)).is_err() {
                            return; // the reader is gone
                        }
                    }
                    Err(err) => {
                        let _ = tx.send(Err(err));
                        return;
                    }
                }
            }
        });
        Ok(Self {
            rx,
            chunk: std::io::Cursor::new(Vec::new()),
        })
    }
}

impl Read for ZipEntryReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.chunk.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            match self.rx.recv() {
                Ok(Ok(next)) => self.chunk = std::io::Cursor::new(next),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0), // end of the entry
            }
        }
    }
}
