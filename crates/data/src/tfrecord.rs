//! TFRecord files and `tf.train.Example` records, read without TensorFlow, and the BAIR
//! robot-pushing layout on top of them.
//!
//! A TFRecord file is a sequence of records, each
//! `u64 length (LE) | u32 masked CRC-32C of the length bytes | data | u32 masked CRC-32C
//! of the data`, with `masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8`. Both checksums
//! are verified; an error names the file and the record.

use crate::{ActionSpace, DataError, Episode, Result};
use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// Records longer than this are taken for corruption (a flipped length byte would
/// otherwise ask for terabytes).
const MAX_RECORD: u64 = 1 << 30;

fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Reads the records of one TFRecord file in order.
pub struct TfRecordReader {
    r: BufReader<std::fs::File>,
    path: PathBuf,
    index: u64,
}

impl TfRecordReader {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let f = std::fs::File::open(&path).map_err(crate::io_err("opening", &path))?;
        Ok(Self {
            r: BufReader::new(f),
            path,
            index: 0,
        })
    }

    fn corrupt(&self, detail: impl std::fmt::Display) -> DataError {
        DataError::Corrupt {
            path: self.path.clone(),
            detail: format!("record {}: {detail}", self.index),
        }
    }

    /// Fills `buf`; `Ok(false)` at a clean end of file (nothing read).
    fn fill(&mut self, buf: &mut [u8], at_start: bool) -> Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            match self.r.read(&mut buf[got..]) {
                Ok(0) if got == 0 && at_start => return Ok(false),
                Ok(0) => return Err(self.corrupt("the file ends inside the record")),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(crate::io_err("reading", &self.path)(e)),
            }
        }
        Ok(true)
    }

    /// The next record's data, `None` after the last one.
    pub fn next_record(&mut self) -> Result<Option<Vec<u8>>> {
        let mut head = [0u8; 12];
        if !self.fill(&mut head, true)? {
            return Ok(None);
        }
        let len_bytes: [u8; 8] = head[..8].try_into().expect("8 bytes");
        let want = u32::from_le_bytes(head[8..].try_into().expect("4 bytes"));
        if masked_crc(&len_bytes) != want {
            return Err(self.corrupt("the CRC of its length does not match (damaged file)"));
        }
        let len = u64::from_le_bytes(len_bytes);
        if len > MAX_RECORD {
            return Err(self.corrupt(format!("implausible length {len}")));
        }
        let mut data = vec![0u8; len as usize];
        self.fill(&mut data, false)?;
        let mut crc = [0u8; 4];
        self.fill(&mut crc, false)?;
        if masked_crc(&data) != u32::from_le_bytes(crc) {
            return Err(self.corrupt("the CRC of its data does not match (damaged file)"));
        }
        self.index += 1;
        Ok(Some(data))
    }

    /// Index of the next record.
    pub fn index(&self) -> u64 {
        self.index
    }
}

/// The protobuf messages of `tf.train.Example` (tensorflow/core/example/feature.proto).
mod proto {
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Example {
        #[prost(message, optional, tag = "1")]
        pub features: Option<Features>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Features {
        #[prost(map = "string, message", tag = "1")]
        pub feature: HashMap<String, Feature>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Feature {
        #[prost(oneof = "Kind", tags = "1, 2, 3")]
        pub kind: Option<Kind>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    #[allow(clippy::enum_variant_names)] // the names of feature.proto
    pub enum Kind {
        #[prost(message, tag = "1")]
        BytesList(BytesList),
        #[prost(message, tag = "2")]
        FloatList(FloatList),
        #[prost(message, tag = "3")]
        Int64List(Int64List),
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct BytesList {
        #[prost(bytes = "vec", repeated, tag = "1")]
        pub value: Vec<Vec<u8>>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FloatList {
        #[prost(float, repeated, tag = "1")]
        pub value: Vec<f32>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Int64List {
        #[prost(int64, repeated, tag = "1")]
        pub value: Vec<i64>,
    }
}

/// One feature of an example.
#[derive(Debug, Clone, PartialEq)]
pub enum Feature {
    Bytes(Vec<Vec<u8>>),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    /// A feature with no list set.
    Empty,
}

/// Decodes a serialised `tf.train.Example` into its features.
pub fn parse_example(bytes: &[u8]) -> std::result::Result<HashMap<String, Feature>, String> {
    use prost::Message;
    let ex = proto::Example::decode(bytes).map_err(|e| format!("not a tf.train.Example: {e}"))?;
    Ok(ex
        .features
        .map(|f| f.feature)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            let v = match v.kind {
                Some(proto::Kind::BytesList(b)) => Feature::Bytes(b.value),
                Some(proto::Kind::FloatList(f)) => Feature::Floats(f.value),
                Some(proto::Kind::Int64List(i)) => Feature::Ints(i.value),
                None => Feature::Empty,
            };
            (k, v)
        })
        .collect())
}

/// BAIR robot pushing (softmotion30_44k): frames are 64×64 RGB, actions 4 floats.
pub const BAIR_SIZE: usize = 64;
pub const BAIR_ACTION_DIM: usize = 4;

/// The action space BAIR episodes are imported with.
pub fn bair_action_space() -> ActionSpace {
    ActionSpace::Continuous {
        dim: BAIR_ACTION_DIM,
        low: -1.0,
        high: 1.0,
    }
}

/// One BAIR example as an episode: per time step `i`, `i/image_aux1/encoded` (raw
/// 64×64×3 u8 bytes) and `i/action` (4 floats); steps run from 0 while the image key
/// exists. `T` frames come with `T` actions: the action at frame `i` leads to frame
/// `i + 1`, so the last one, which leads nowhere in the record, is dropped. Rewards are
/// 0; the last step is marked truncated (the recording stops, the task does not end).
/// `i/endeffector_pos` is returned per frame (3 floats each) for the caller to keep.
pub fn bair_episode(
    features: &HashMap<String, Feature>,
) -> std::result::Result<(Episode, Vec<f32>), String> {
    let frame_len = BAIR_SIZE * BAIR_SIZE * 3;
    let mut frames = Vec::new();
    let mut actions = Vec::new();
    let mut ee = Vec::new();
    let mut t = 0;
    while let Some(img) = features.get(&format!("{t}/image_aux1/encoded")) {
        let bytes = match img {
            Feature::Bytes(b) if b.len() == 1 => &b[0],
            _ => return Err(format!("`{t}/image_aux1/encoded` is not one byte string")),
        };
        if bytes.len() != frame_len {
            return Err(format!(
                "`{t}/image_aux1/encoded` holds {} bytes; a raw 64×64×3 frame has {frame_len}",
                bytes.len()
            ));
        }
        frames.extend_from_slice(bytes);
        match features.get(&format!("{t}/action")) {
            Some(Feature::Floats(a)) if a.len() == BAIR_ACTION_DIM => actions.extend_from_slice(a),
            Some(other) => {
                return Err(format!(
                    "`{t}/action` is {other:?}, not {BAIR_ACTION_DIM} floats"
                ))
            }
            None => return Err(format!("no `{t}/action`")),
        }
        match features.get(&format!("{t}/endeffector_pos")) {
            Some(Feature::Floats(p)) if p.len() == 3 => ee.extend_from_slice(p),
            _ => ee.extend_from_slice(&[f32::NAN; 3]),
        }
        t += 1;
    }
    if t < 2 {
        return Err(format!(
            "{t} time steps with `i/image_aux1/encoded` (need at least 2); keys: {:?}",
            {
                let mut k: Vec<&String> = features.keys().take(6).collect();
                k.sort();
                k
            }
        ));
    }
    let steps = t - 1;
    actions.truncate(steps * BAIR_ACTION_DIM);
    let mut truncated = vec![0u8; steps];
    truncated[steps - 1] = 1;
    let ep = Episode {
        frames,
        frame_shape: [BAIR_SIZE, BAIR_SIZE, 3],
        actions: crate::Actions::Continuous {
            dim: BAIR_ACTION_DIM,
            data: actions,
        },
        rewards: vec![0.0; steps],
        terminated: vec![0; steps],
        truncated,
    };
    ep.validate().map_err(|e| e.to_string())?;
    Ok((ep, ee))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(data: &[u8]) -> Vec<u8> {
        let len = (data.len() as u64).to_le_bytes();
        let mut out = len.to_vec();
        out.extend_from_slice(&masked_crc(&len).to_le_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(&masked_crc(data).to_le_bytes());
        out
    }

    #[test]
    fn masked_crc_matches_a_known_value() {
        // CRC-32C("123456789") = 0xe3069283 (the standard check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // Masked by hand: rotate right by 15, add 0xa282ead8 (mod 2^32).
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
    }

    #[test]
    fn records_read_back_and_damage_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tfrecords");
        let mut bytes = record(b"first");
        bytes.extend(record(b"second record"));
        std::fs::write(&path, &bytes).unwrap();
        let mut r = TfRecordReader::open(&path).unwrap();
        assert_eq!(r.next_record().unwrap().unwrap(), b"first");
        assert_eq!(r.next_record().unwrap().unwrap(), b"second record");
        assert!(r.next_record().unwrap().is_none());

        let mut flipped = bytes.clone();
        let at = bytes.len() - 8; // inside the second record's data
        flipped[at] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        let mut r = TfRecordReader::open(&path).unwrap();
        r.next_record().unwrap();
        let err = r.next_record().unwrap_err().to_string();
        assert!(
            err.contains("a.tfrecords") && err.contains("record 1"),
            "{err}"
        );

        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let mut r = TfRecordReader::open(&path).unwrap();
        r.next_record().unwrap();
        let err = r.next_record().unwrap_err().to_string();
        assert!(err.contains("ends inside"), "{err}");
    }
}
