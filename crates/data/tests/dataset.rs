//! The episode dataset: round trips, damage detection, appends, clips, export.

use dws_data::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::fs;
use std::path::Path;

const SHAPE: [usize; 3] = [4, 4, 3];

fn header(space: ActionSpace) -> DatasetHeader {
    DatasetHeader {
        env_id: "test:env".into(),
        env_config: serde_json::json!({"family": "test"}),
        action_space: space,
        action_templates: vec![],
        frame_shape: SHAPE,
        final_frame_rendered: true,
        imagined: false,
    }
}

/// An episode whose frame t is filled with the value `base + t`.
fn episode(base: u8, steps: usize) -> Episode {
    let f = SHAPE.iter().product::<usize>();
    let mut ep = Episode::new(&vec![base; f], SHAPE, &ActionSpace::Discrete { n: 4 });
    for t in 0..steps {
        let last = t + 1 == steps;
        ep.push_discrete(
            (t % 4) as u32,
            t as f32,
            last,
            false,
            &vec![base + t as u8 + 1; f],
        );
    }
    ep
}

fn write(dir: &Path, eps: &[Episode]) {
    let mut w =
        DatasetWriter::create_or_append(dir, header(ActionSpace::Discrete { n: 4 })).unwrap();
    for (i, ep) in eps.iter().enumerate() {
        w.append(ep, Some(i as u64), Default::default()).unwrap();
    }
}

#[test]
fn round_trip_and_append() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &[episode(0, 5), episode(100, 3)]);
    write(dir.path(), &[episode(50, 7)]);
    let ds = Dataset::open(dir.path()).unwrap();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.manifest().num_steps, 15);
    assert_eq!(ds.read_episode(0).unwrap(), episode(0, 5));
    assert_eq!(ds.read_episode(2).unwrap(), episode(50, 7));
    assert_eq!(ds.manifest().episodes[1].ret, 3.0);
    assert!(ds.manifest().episodes[1].terminated);
    assert!(ds.read_episode(3).is_err());
}

#[test]
fn continuous_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let space = ActionSpace::Continuous {
        dim: 2,
        low: -1.0,
        high: 1.0,
    };
    let f = SHAPE.iter().product::<usize>();
    let mut ep = Episode::new(&vec![1; f], SHAPE, &space);
    ep.push_continuous(&[0.5, -0.25], -1.0, false, true, &vec![2; f]);
    let mut w = DatasetWriter::create_or_append(dir.path(), header(space)).unwrap();
    w.append(&ep, None, Default::default()).unwrap();
    assert_eq!(
        Dataset::open(dir.path()).unwrap().read_episode(0).unwrap(),
        ep
    );
    // Discrete episodes do not go into a continuous dataset.
    assert!(w.append(&episode(0, 2), None, Default::default()).is_err());
}

fn first_file(dir: &Path) -> std::path::PathBuf {
    dir.join(&Dataset::open(dir).unwrap().manifest().episodes[0].file)
}

#[test]
fn truncated_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &[episode(0, 5)]);
    let path = first_file(dir.path());
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = Dataset::open(dir.path())
        .unwrap()
        .read_episode(0)
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::WrongSize { .. }), "{msg}");
    assert!(
        msg.contains("ep_000000.safetensors") && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn flipped_byte_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &[episode(0, 5)]);
    let path = first_file(dir.path());
    let mut bytes = fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    let err = Dataset::open(dir.path())
        .unwrap()
        .read_episode(0)
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::Checksum { .. }), "{msg}");
    assert!(
        msg.contains("ep_000000.safetensors") && msg.contains("damaged"),
        "{msg}"
    );
}

#[test]
fn future_version_and_foreign_manifests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &[episode(0, 2)]);
    let mpath = dir.path().join("manifest.json");
    let text = fs::read_to_string(&mpath).unwrap();
    fs::write(&mpath, text.replace("\"version\": 1", "\"version\": 7")).unwrap();
    let msg = Dataset::open(dir.path()).err().unwrap().to_string();
    assert!(
        msg.contains("manifest.json") && msg.contains("version 7"),
        "{msg}"
    );
    // Appending to it is refused too (never overwrite what we cannot read).
    assert!(
        DatasetWriter::create_or_append(dir.path(), header(ActionSpace::Discrete { n: 4 }))
            .is_err()
    );
    fs::write(&mpath, "{\"hello\": 1}").unwrap();
    let msg = Dataset::open(dir.path()).err().unwrap().to_string();
    assert!(
        msg.contains("manifest.json") && msg.contains("format"),
        "{msg}"
    );
    fs::write(&mpath, "not json").unwrap();
    assert!(Dataset::open(dir.path())
        .err()
        .unwrap()
        .to_string()
        .contains("not JSON"));
    let empty = tempfile::tempdir().unwrap();
    let msg = Dataset::open(empty.path()).err().unwrap().to_string();
    assert!(msg.contains("not a dws dataset"), "{msg}");
}

#[test]
fn foreign_episode_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &[episode(0, 2)]);
    let path = first_file(dir.path());
    // Same size, valid CRC in the manifest, but not safetensors: the parser must say so.
    let junk = vec![b'x'; fs::metadata(&path).unwrap().len() as usize];
    fs::write(&path, &junk).unwrap();
    let mpath = dir.path().join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&mpath).unwrap()).unwrap();
    m["episodes"][0]["crc32"] = crc32fast::hash(&junk).into();
    fs::write(&mpath, serde_json::to_string(&m).unwrap()).unwrap();
    let msg = Dataset::open(dir.path())
        .unwrap()
        .read_episode(0)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("ep_000000.safetensors") && msg.contains("malformed"),
        "{msg}"
    );
}

#[test]
fn other_env_is_not_appended_and_leftovers_are_cleaned() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &[episode(0, 2)]);
    let mut other = header(ActionSpace::Discrete { n: 4 });
    other.env_id = "other:env".into();
    let msg = DatasetWriter::create_or_append(dir.path(), other)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("other:env") && msg.contains("test:env"),
        "{msg}"
    );
    // A killed writer leaves a temporary file and an unlisted episode.
    fs::write(dir.path().join(".ep_000001.safetensors.tmp-99"), b"partial").unwrap();
    fs::write(dir.path().join("ep_000001.safetensors"), b"unlisted").unwrap();
    write(dir.path(), &[episode(9, 3)]);
    let ds = Dataset::open(dir.path()).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.read_episode(1).unwrap(), episode(9, 3));
    assert!(!dir.path().join(".ep_000001.safetensors.tmp-99").exists());
}

#[test]
fn clips_come_from_one_episode_in_order() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        &[episode(0, 5), episode(100, 2), episode(50, 9)],
    );
    let ds = Dataset::open(dir.path()).unwrap();
    let sampler = ClipSampler::from_dataset(&ds, 4).unwrap();
    // 6 frames → 3 starts, 3 frames → none, 10 frames → 7 starts.
    assert_eq!(sampler.num_clips(), 10);
    assert_eq!(sampler.locate(3), (2, 0));
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let b = sampler.sample(64, &mut rng);
    let f = SHAPE.iter().product::<usize>();
    assert_eq!(b.frames.len(), 64 * 4 * f);
    let Actions::Discrete(actions) = &b.actions else {
        panic!()
    };
    assert_eq!(actions.len(), 64 * 3);
    for i in 0..64 {
        let first = b.frames[i * 4 * f];
        for t in 0..4 {
            assert_eq!(
                b.frames[(i * 4 + t) * f],
                first + t as u8,
                "clip {i} frame {t}"
            );
        }
        // Reward of step t equals its index in the episode: consecutive too.
        assert_eq!(b.rewards[i * 3 + 1], b.rewards[i * 3] + 1.0);
        assert_eq!(actions[i * 3], (b.rewards[i * 3] as u32) % 4);
    }
    assert!(ClipSampler::from_dataset(&ds, 11).is_err());
}

#[test]
fn npz_export_holds_the_arrays() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), &[episode(0, 5)]);
    let out = tempfile::tempdir().unwrap();
    let files = export_npz(&Dataset::open(dir.path()).unwrap(), out.path()).unwrap();
    assert_eq!(files.len(), 1);
    let mut zip = zip::ZipArchive::new(fs::File::open(&files[0]).unwrap()).unwrap();
    let mut names: Vec<String> = zip.file_names().map(String::from).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "actions.npy",
            "frames.npy",
            "rewards.npy",
            "terminated.npy",
            "truncated.npy"
        ]
    );
    let mut frames = Vec::new();
    std::io::Read::read_to_end(&mut zip.by_name("frames.npy").unwrap(), &mut frames).unwrap();
    assert!(String::from_utf8_lossy(&frames[..128]).contains("'shape': (6, 4, 4, 3)"));
    assert_eq!(frames.len() % 64, (6 * 48) % 64);
    assert_eq!(*frames.last().unwrap(), 5);
}
