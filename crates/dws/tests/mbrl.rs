//! `dws mbrl` end to end on the pushing task (continuous actions, pure Rust, no assets):
//! a run killed mid-way resumes from its last checkpoint with its replay intact.

mod common;

use common::{fails, ok, run};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn args(run: &str) -> Vec<String> {
    [
        "mbrl",
        "--env",
        "push",
        "--preset",
        "debug",
        "--steps",
        "640",
        "--baseline-episodes",
        "4",
        "--eval-every",
        "5",
        "--eval-episodes",
        "2",
        "--checkpoint-every",
        "2",
        "--out",
        run,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn chunks(run: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(run.join("replay"))
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().to_string(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn state_iteration(run: &Path) -> Option<u64> {
    let text = fs::read_to_string(run.join("state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["iteration"].as_u64()
}

#[test]
fn mbrl_runs_is_killed_and_resumes_without_losing_its_replay() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("mbrl-push");
    let run_s = run.to_str().unwrap();
    let base = args(run_s);
    // Started, then killed (SIGKILL: no chance to save) once a checkpoint exists.
    let mut child = Command::new(env!("CARGO_BIN_EXE_dws"))
        .env("DWS_LOG", "warn")
        .args(&base)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while state_iteration(&run).is_none_or(|i| i < 2) {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint after 5 minutes"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("dws mbrl exited ({status}) before it was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = chunks(&run);
    let saved = state_iteration(&run).unwrap();
    assert!(
        at_kill.len() as u64 >= saved,
        "every collected rollout is on disk"
    );
    let out = ok(&[&base[..], &["--resume".to_string()]].concat());
    assert!(out.contains("10 updates, 640 real"), "{out}");
    // The chunks the checkpoint covers were kept as they were; the rest were collected
    // again; the debug replay keeps 8, so all ten are still on disk.
    let after = chunks(&run);
    assert_eq!(after.len(), 10, "{:?}", after.keys());
    for (name, bytes) in &at_kill {
        let it: u64 = name[6..14].parse().unwrap();
        if it <= saved {
            assert_eq!(after.get(name), Some(bytes), "{name} changed on resume");
        }
    }
    let text = fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let logs: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let iterations: Vec<u64> = logs
        .iter()
        .map(|v| v["iteration"].as_u64().unwrap())
        .collect();
    assert_eq!(iterations, (1..=10).collect::<Vec<_>>());
    // Imagination runs from update 2 on, with finite losses everywhere, and its step
    // count carries over the resume.
    let mut imagined = 0;
    for v in &logs {
        assert!(v["policy_loss"].as_f64().unwrap().is_finite());
        assert!(v["world_loss"].as_f64().unwrap().is_finite());
        assert!(v["reward_mse"].as_f64().unwrap().is_finite());
        let now = v["imagined_steps"].as_u64().unwrap();
        if v["iteration"].as_u64().unwrap() >= 2 {
            assert!(now > imagined, "{v}");
            assert!(v["start_td"].as_f64().unwrap().is_finite());
        }
        imagined = now;
    }
    assert!(logs[4]["eval_return"].as_f64().is_some());
    let summary: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["updates"], 10);
    assert_eq!(summary["starts"], "prioritized");
    assert!(summary["eval_return"].as_f64().is_some());
    let png = fs::read(run.join("returns.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    // The simulator is an ordinary world-model run.
    let world: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(run.join("world/config.json")).unwrap()).unwrap();
    assert_eq!(world["command"], "mbrl");
    assert!(run.join("world/checkpoints/step-00000010").is_dir());
    assert!(run.join("starts-00000010.safetensors").is_file());
}

#[test]
fn mbrl_refuses_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let o = out.to_str().unwrap();
    let err = fails(&["mbrl", "--env", "push", "--preset", "huge", "--out", o]);
    assert!(err.contains("unknown MBRL preset"), "{err}");
    // Flag values are checked by the argument parser (exit code 2).
    let (success, _, err) = run(&[
        "mbrl", "--env", "push", "--preset", "debug", "--starts", "best", "--out", o,
    ]);
    assert!(!success && err.contains("prioritized or uniform"), "{err}");
    let err = fails(&[
        "mbrl",
        "--env",
        "push",
        "--preset",
        "debug",
        "--horizon",
        "0",
        "--out",
        o,
    ]);
    assert!(err.contains("horizon"), "{err}");
    let err = fails(&[
        "mbrl",
        "--env",
        "push",
        "--preset",
        "debug",
        "--base",
        "/nonexistent/run",
        "--baseline-episodes",
        "0",
        "--out",
        o,
    ]);
    assert!(err.contains("base world model"), "{err}");
}
