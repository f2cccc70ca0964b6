//! `dws dataset import`: export → import round trip, the BAIR TFRecord fixture, training on
//! imported data, resuming, and errors that name the file.

use dws_data::{Actions, Dataset};
use std::path::{Path, PathBuf};

mod common;
use common::{f32s, fails, i64s, npz, ok, png, Npy};

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A command line split at spaces (the temporary paths here have none).
fn words(line: &str) -> Vec<String> {
    line.split_whitespace().map(String::from).collect()
}

/// `dataset import --from FROM SRC --out OUT EXTRA...`.
fn import_args(from: &str, src: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "dataset".into(),
        "import".into(),
        "--from".into(),
        from.into(),
    ];
    v.extend([s(src), "--out".into(), s(out)]);
    v.extend(extra.iter().map(|e| e.to_string()));
    v
}

fn episode_files(dir: &Path) -> Vec<Vec<u8>> {
    let ds = Dataset::open(dir).unwrap();
    ds.manifest()
        .episodes
        .iter()
        .map(|e| std::fs::read(dir.join(&e.file)).unwrap())
        .collect()
}

#[test]
fn export_then_import_gives_the_same_episode_files_and_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n);
    ok(&words(&format!(
        "collect --env push --policy scripted --episodes 3 --seed 5 --out {}",
        s(&p("orig"))
    )));
    ok(&words(&format!(
        "dataset export-npz {} --out {}",
        s(&p("orig")),
        s(&p("npz"))
    )));
    let out = ok(&import_args("npz", &p("npz"), &p("back"), &[]));
    assert!(out.contains("3 episodes imported"), "{out}");
    assert_eq!(episode_files(&p("orig")), episode_files(&p("back")));
    let (a, b) = (
        Dataset::open(p("orig")).unwrap(),
        Dataset::open(p("back")).unwrap(),
    );
    assert_eq!(a.header(), b.header());

    // Run again: nothing is added twice.
    let out = ok(&import_args("npz", &p("npz"), &p("back"), &[]));
    assert!(
        out.contains("0 episodes imported") && out.contains("3 already there"),
        "{out}"
    );
    assert_eq!(Dataset::open(p("back")).unwrap().len(), 3);

    // The debug preset trains on the imported dataset.
    ok(&words(&format!(
        "pretrain --data {} --preset debug --steps 2 --out {}",
        s(&p("back")),
        s(&p("base"))
    )));
    ok(&words(&format!(
        "finetune --base {} --data {} --preset debug --steps 2 --out {}",
        s(&p("base")),
        s(&p("back")),
        s(&p("dws"))
    )));
    assert!(p("dws").join("checkpoints").is_dir());
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/tests/fixtures/bair")
}

#[test]
fn bair_tfrecords_import_with_split_frames_and_actions() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bair");
    let text = ok(&import_args("bair", &fixture(), &out, &[]));
    assert!(
        text.contains("train: 2 episodes") && text.contains("test: 1 episodes"),
        "{text}"
    );
    let train = Dataset::open(out.join("train")).unwrap();
    let test = Dataset::open(out.join("test")).unwrap();
    assert_eq!((train.len(), test.len()), (2, 1));
    // scripts/bair_fixture.py: pixel (traj, step, r, c, ch) and the actions.
    for (ds, trajs) in [(&train, vec![0usize, 1]), (&test, vec![2])] {
        for (i, &traj) in trajs.iter().enumerate() {
            let ep = ds.read_episode(i).unwrap();
            assert_eq!(ep.num_frames(), 3);
            let want = |step: usize, k: usize| {
                let (r, c, ch) = (k / 192, (k / 3) % 64, k % 3);
                ((traj * 71 + step * 37 + r * 3 + c * 5 + ch * 11) % 256) as u8
            };
            for step in 0..3 {
                assert!(ep
                    .frame(step)
                    .iter()
                    .enumerate()
                    .all(|(k, &v)| v == want(step, k)));
            }
            let Actions::Continuous { dim: 4, data } = &ep.actions else {
                panic!("4-d continuous actions")
            };
            let x = (0.1 * traj as f64 - 0.05) as f32;
            assert_eq!(&data[4..8], &[x, 0.02f64 as f32, -1.0, 0.25]);
        }
    }

    // A flipped byte is caught, naming the file and the record.
    let src = tmp.path().join("damaged/softmotion30_44k/train");
    std::fs::create_dir_all(&src).unwrap();
    let mut bytes =
        std::fs::read(fixture().join("softmotion30_44k/train/traj_0_to_1.tfrecords")).unwrap();
    let at = bytes.len() / 2 + 100;
    bytes[at] ^= 0x01;
    std::fs::write(src.join("traj_0_to_1.tfrecords"), bytes).unwrap();
    let err = fails(&import_args(
        "bair",
        &tmp.path().join("damaged"),
        &tmp.path().join("d"),
        &[],
    ));
    assert!(
        err.contains("traj_0_to_1.tfrecords") && err.contains("record 1") && err.contains("CRC"),
        "{err}"
    );
}

/// A frame folder episode: `t` 16×24 PNG frames.
fn frame_folder(dir: &Path, t: usize) {
    for i in 0..t {
        let rgb: Vec<u8> = (0..16 * 24 * 3)
            .map(|k| ((k + 40 * i) % 256) as u8)
            .collect();
        png(&dir.join(format!("f{i:03}.png")), &rgb, 16, 24);
    }
}

#[test]
fn frames_and_one_file_npz_import_and_resume_without_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("rec");
    frame_folder(&src.join("a"), 4);
    std::fs::write(
        src.join("a/actions.csv"),
        "action,reward\n0,1\n2,0.5\n1,0\n",
    )
    .unwrap();
    frame_folder(&src.join("b"), 3);
    std::fs::write(src.join("b.jsonl"), "1\n2\n").unwrap();
    let out = tmp.path().join("ds");
    let args = [
        "dataset",
        "import",
        "--from",
        "frames",
        &s(&src),
        "--out",
        &s(&out),
        "--action-space",
        "discrete:3",
        "--size",
        "8",
    ];
    ok(&args);
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.header().frame_shape, [8, 8, 3]);
    let a = ds.read_episode(0).unwrap();
    assert_eq!(a.actions, Actions::Discrete(vec![0, 2, 1]));
    assert_eq!(a.rewards, vec![1.0, 0.5, 0.0]);
    assert_eq!(
        ds.read_episode(1).unwrap().actions,
        Actions::Discrete(vec![1, 2])
    );
    // A third episode appears; importing again adds it alone.
    frame_folder(&src.join("c"), 2);
    std::fs::write(src.join("c.csv"), "0\n").unwrap();
    let text = ok(&args);
    assert!(
        text.contains("1 episodes imported") && text.contains("2 already there"),
        "{text}"
    );
    assert_eq!(Dataset::open(&out).unwrap().len(), 3);

    // One archive with episodes of 3 and 2 frames, T actions each (the last dropped).
    let (h, w) = (8usize, 8usize);
    let frames: Vec<u8> = (0..5 * h * w * 3).map(|k| (k % 251) as u8).collect();
    let one = tmp.path().join("all.npz");
    npz(
        &one,
        &[
            Npy {
                name: "frames",
                descr: "|u1",
                shape: vec![5, h, w, 3],
                data: frames.clone(),
            },
            Npy {
                name: "actions",
                descr: "<f4",
                shape: vec![5, 2],
                data: f32s(&[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, -0.1, -0.2, -0.3, -0.4]),
            },
            Npy {
                name: "episode_lengths",
                descr: "<i8",
                shape: vec![2],
                data: i64s(&[3, 2]),
            },
        ],
    );
    let out2 = tmp.path().join("ds2");
    ok(&import_args(
        "npz",
        &one,
        &out2,
        &["--action-space", "continuous:2", "--size", "8"],
    ));
    let ds = Dataset::open(&out2).unwrap();
    assert_eq!(ds.len(), 2);
    let e1 = ds.read_episode(1).unwrap();
    assert_eq!(e1.frames, frames[3 * h * w * 3..]);
    assert_eq!(
        e1.actions,
        Actions::Continuous {
            dim: 2,
            data: vec![-0.1, -0.2]
        }
    );
}

#[test]
fn bad_inputs_name_the_file_and_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n);
    let import = |from: &str, src: &Path, space: &str| {
        fails(&import_args(
            from,
            src,
            &p("out"),
            &["--action-space", space],
        ))
    };
    // Frame and action counts disagree.
    frame_folder(&p("counts/ep"), 4);
    std::fs::write(p("counts/ep/actions.csv"), "0\n1\n").unwrap();
    let err = import("frames", &p("counts"), "discrete:2");
    assert!(
        err.contains("actions.csv") && err.contains("4 frames and 2 actions"),
        "{err}"
    );
    // An unreadable image.
    frame_folder(&p("img/ep"), 2);
    std::fs::write(p("img/ep/f001.png"), b"not a png").unwrap();
    std::fs::write(p("img/ep/actions.csv"), "0\n").unwrap();
    let err = import("frames", &p("img"), "discrete:2");
    assert!(err.contains("f001.png"), "{err}");
    // No actions file.
    frame_folder(&p("noact/ep"), 2);
    let err = import("frames", &p("noact"), "discrete:2");
    assert!(
        err.contains("no actions file") && err.contains("actions.csv"),
        "{err}"
    );
    // Wrong action dimension, at a line.
    frame_folder(&p("dim/ep"), 3);
    std::fs::write(p("dim/ep/actions.jsonl"), "[0.1, 0.2]\n[0.3]\n").unwrap();
    let err = import("frames", &p("dim"), "continuous:2");
    assert!(err.contains("actions.jsonl line 2"), "{err}");
    std::fs::write(p("dim/ep/actions.jsonl"), "[0.1, 0.2, 0]\n[0.3, 0, 0]\n").unwrap();
    let err = import("frames", &p("dim"), "continuous:2");
    assert!(
        err.contains("3 values per step") && err.contains("has 2"),
        "{err}"
    );
    // Empty folders.
    std::fs::create_dir_all(p("empty")).unwrap();
    for from in ["frames", "npz", "video"] {
        let err = import(from, &p("empty"), "discrete:2");
        assert!(
            err.contains("empty") && err.contains("holds no"),
            "{from}: {err}"
        );
    }
    // An action id outside the space, and a missing --action-space.
    std::fs::write(p("counts/ep/actions.csv"), "0\n1\n5\n").unwrap();
    let err = import("frames", &p("counts"), "discrete:2");
    assert!(err.contains("action 2 is 5"), "{err}");
    let err = fails(&import_args("frames", &p("counts"), &p("o"), &[]));
    assert!(err.contains("--action-space"), "{err}");
    // An npz without actions.
    std::fs::create_dir_all(p("npz")).unwrap();
    npz(
        &p("npz/e.npz"),
        &[Npy {
            name: "frames",
            descr: "|u1",
            shape: vec![2, 4, 4, 3],
            data: vec![0; 96],
        }],
    );
    let err = import("npz", &p("npz"), "discrete:2");
    assert!(
        err.contains("e.npz") && err.contains("no `actions`"),
        "{err}"
    );
}

/// The Python snippets of docs/dataset-format.md run as written (numpy only): one writes
/// an episode that imports, the other reads the imported dataset back.
#[test]
fn the_documented_python_snippets_work() {
    let has_numpy = std::process::Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_numpy {
        eprintln!("skipped: python3 with numpy is not installed (CI installs python3-numpy)");
        return;
    }
    let doc = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/dataset-format.md"),
    )
    .unwrap();
    let blocks: Vec<&str> = doc
        .split("```python\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert_eq!(blocks.len(), 2);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("my-episodes")).unwrap();
    let py = |code: &str| {
        let out = std::process::Command::new("python3")
            .args(["-c", code])
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    py(blocks[0]);
    ok(&import_args(
        "npz",
        &tmp.path().join("my-episodes"),
        &tmp.path().join("my-data"),
        &["--action-space", "continuous:2"],
    ));
    assert_eq!(py(blocks[1]).trim(), "(51, 64, 64, 3) (50, 2)");
}
