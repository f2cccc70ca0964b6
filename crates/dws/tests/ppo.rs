//! `dws ppo` end to end on the pushing task (continuous actions, pure Rust, no assets).

mod common;

use common::{fails, ok};
use std::fs;

#[test]
fn ppo_trains_resumes_and_reports_on_the_pushing_task() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("ppo-push");
    let run_s = run.to_str().unwrap();
    let base = [
        "ppo",
        "--env",
        "push",
        "--preset",
        "debug",
        "--steps",
        "512",
        "--num-envs",
        "4",
        "--num-steps",
        "16",
        "--baseline-episodes",
        "4",
        "--checkpoint-every",
        "2",
        "--out",
        run_s,
    ];
    // Interrupted after 3 of 8 updates, then resumed.
    let first = ok(&[&base[..], &["--stop-after", "3"]].concat());
    assert!(first.contains("random policy on push"), "{first}");
    let lines = |p: &std::path::Path| fs::read_to_string(p).unwrap().lines().count();
    assert_eq!(lines(&run.join("metrics.jsonl")), 3);
    let out = ok(&[&base[..], &["--resume"]].concat());
    assert!(out.contains("8 updates, 512 env steps"), "{out}");
    let text = fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let iterations: Vec<u64> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v["policy_loss"].as_f64().unwrap().is_finite());
            assert!(v["entropy"].as_f64().unwrap().is_finite());
            v["iteration"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(iterations, (1..=8).collect::<Vec<_>>());
    let summary: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["updates"], 8);
    assert!(summary["random_return"].as_f64().is_some());
    let baseline: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(run.join("baseline.json")).unwrap()).unwrap();
    assert_eq!(baseline["episodes"], 4);
    let png = fs::read(run.join("returns.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert!(run.join("checkpoints").is_dir());

    // The trained agent collects a dataset (the expert of offline RL), greedy and
    // sampled, and the manifest names it.
    let data = dir.path().join("expert");
    let data_s = data.to_str().unwrap();
    let policy = format!("ppo:{run_s}");
    for greedy in [true, false] {
        let mut args = vec![
            "collect",
            "--env",
            "push",
            "--policy",
            &policy,
            "--episodes",
            "2",
            "--out",
            data_s,
        ];
        if greedy {
            args.push("--greedy");
        }
        ok(&args);
    }
    let manifest = fs::read_to_string(data.join("manifest.json")).unwrap();
    assert!(
        manifest.contains("(greedy)") && manifest.contains("(sampled)"),
        "{manifest}"
    );
    assert!(manifest.contains("step-00000008"), "{manifest}");
    let info = ok(&["dataset", "info", data_s]);
    assert!(info.contains("episodes  4"), "{info}");
    // An agent of one env does not collect in another, and --greedy needs an agent.
    let err = fails(&[
        "collect",
        "--env",
        "procgen:coinrun",
        "--policy",
        &policy,
        "--episodes",
        "1",
        "--out",
        data_s,
    ]);
    assert!(err.contains("trained on push"), "{err}");
    let err = fails(&[
        "collect",
        "--env",
        "push",
        "--greedy",
        "--episodes",
        "1",
        "--out",
        data_s,
    ]);
    assert!(err.contains("--greedy is for --policy ppo"), "{err}");

    // Resuming with another env is refused, naming the run.
    let err = fails(&[
        "ppo",
        "--env",
        "procgen:coinrun",
        "--preset",
        "debug",
        "--out",
        run_s,
        "--resume",
    ]);
    assert!(err.contains("resume with the same --env"), "{err}");
}

#[test]
fn ppo_refuses_bad_settings_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let out = out.to_str().unwrap();
    let err = fails(&["ppo", "--env", "push", "--preset", "huge", "--out", out]);
    assert!(err.contains("unknown PPO preset `huge`"), "{err}");
    let err = fails(&["ppo", "--env", "nope", "--out", out]);
    assert!(err.contains("nope"), "{err}");
    let err = fails(&[
        "ppo",
        "--env",
        "push",
        "--preset",
        "debug",
        "--num-envs",
        "0",
        "--out",
        out,
    ]);
    assert!(err.contains("num_envs"), "{err}");
}
