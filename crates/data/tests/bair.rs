//! The BAIR TFRecord fixture (written by the independent `tfrecord` Python package, see
//! scripts/bair_fixture.py) reads back with the right frames and actions.

use dws_data::tfrecord::{bair_episode, parse_example, Feature, TfRecordReader};
use dws_data::Actions;
use std::path::PathBuf;

fn fixture(split: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bair/softmotion30_44k")
        .join(split);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 1, "{files:?}");
    files.remove(0)
}

/// What scripts/bair_fixture.py puts at (trajectory, step, row, column, channel).
fn bair_pixel(traj: usize, step: usize, r: usize, c: usize, ch: usize) -> u8 {
    ((traj * 71 + step * 37 + r * 3 + c * 5 + ch * 11) % 256) as u8
}

fn bair_action(traj: usize, step: usize) -> [f32; 4] {
    let (t, s) = (traj as f64, step as f64);
    [
        (0.1 * t - 0.05 * s) as f32,
        (0.02 * s) as f32,
        if step % 2 == 1 { -1.0 } else { 1.0 },
        0.25,
    ]
}

#[test]
fn bair_fixture_decodes_to_the_written_frames_and_actions() {
    for (split, trajs) in [("train", vec![0usize, 1]), ("test", vec![2])] {
        let mut r = TfRecordReader::open(fixture(split)).unwrap();
        for &traj in &trajs {
            let bytes = r.next_record().unwrap().expect("a record per trajectory");
            let features = parse_example(&bytes).unwrap();
            assert!(matches!(features.get("0/action"), Some(Feature::Floats(v)) if v.len() == 4));
            let (ep, ee) = bair_episode(&features).unwrap();
            // 3 frames, 3 actions: the last action leads nowhere and is dropped.
            assert_eq!(ep.steps(), 2);
            assert_eq!(ep.num_frames(), 3);
            for step in 0..3 {
                let f = ep.frame(step);
                for (i, &v) in f.iter().enumerate() {
                    let (r, c, ch) = (i / 192, (i / 3) % 64, i % 3);
                    assert_eq!(
                        v,
                        bair_pixel(traj, step, r, c, ch),
                        "traj {traj} step {step}"
                    );
                }
            }
            let Actions::Continuous { dim: 4, data } = &ep.actions else {
                panic!("continuous 4-d actions")
            };
            for step in 0..2 {
                assert_eq!(&data[step * 4..step * 4 + 4], &bair_action(traj, step));
            }
            assert_eq!(ep.truncated, vec![0, 1]);
            assert_eq!(ee.len(), 9);
            assert_eq!(ee[0], (0.5 * traj as f64) as f32);
        }
        assert!(
            r.next_record().unwrap().is_none(),
            "{split}: no extra records"
        );
    }
}

#[test]
fn a_flipped_byte_in_the_fixture_is_caught_with_file_and_record() {
    let src = std::fs::read(fixture("train")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // One byte inside the second record's frames.
    let mut bytes = src.clone();
    let at = src.len() - 5000;
    bytes[at] ^= 0x10;
    let path = dir.path().join("damaged.tfrecords");
    std::fs::write(&path, &bytes).unwrap();
    let mut r = TfRecordReader::open(&path).unwrap();
    r.next_record().unwrap().unwrap();
    let err = r.next_record().unwrap_err().to_string();
    assert!(
        err.contains("damaged.tfrecords") && err.contains("record 1") && err.contains("CRC"),
        "{err}"
    );
}
