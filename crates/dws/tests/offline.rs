//! Offline RL with world-model augmentation end to end on the debug presets (Procgen
//! CoinRun): an expert trained with `dws ppo` collects data, a DWS world model is
//! fine-tuned on it, `dws imagine` makes transitions, CQL and IQL learn with and without
//! them, `dws compare` tabulates the returns; bad inputs give errors that name the file.

mod common;

use common::{fails, ok};
use std::fs;
use std::path::Path;

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

/// The `stats` of every line of a run's metrics.
fn losses(run: &Path) -> Vec<(u64, String)> {
    fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["stats"].to_string())
        })
        .collect()
}

#[test]
fn expert_data_imagination_cql_iql_and_the_table() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let opts = "num_levels=20,distribution_mode=easy,max_episode_steps=40";
    // The expert and its data.
    ok(&[
        "ppo",
        "--env",
        "procgen:coinrun",
        "--env-opts",
        opts,
        "--preset",
        "debug",
        "--steps",
        "128",
        "--num-envs",
        "4",
        "--num-steps",
        "16",
        "--baseline-episodes",
        "0",
        "--out",
        &p("expert"),
    ]);
    let expert = format!("ppo:{}", p("expert"));
    ok(&[
        "collect",
        "--env",
        "procgen:coinrun",
        "--env-opts",
        opts,
        "--policy",
        &expert,
        "--episodes",
        "6",
        "--out",
        &p("data"),
    ]);
    // The world simulator: a debug base fine-tuned with DWS on the expert data.
    ok(&[
        "pretrain",
        "--data",
        &p("data"),
        "--steps",
        "4",
        "--out",
        &p("base"),
    ]);
    ok(&[
        "finetune",
        "--base",
        &p("base"),
        "--data",
        &p("data"),
        "--steps",
        "4",
        "--out",
        &p("wm"),
    ]);
    // Imagination, interrupted by nothing but run twice: the second run finds the work
    // done and adds nothing.
    let imagine = |out: &str, transitions: &str| {
        ok(&[
            "imagine",
            "--ckpt",
            &p("wm"),
            "--starts",
            &p("data"),
            "--preset",
            "debug",
            "--transitions",
            transitions,
            "--horizon",
            "4",
            "--batch",
            "3",
            "--out",
            out,
        ])
    };
    let text = imagine(&p("imagined"), "20");
    assert!(text.contains("imagined transitions"), "{text}");
    let m = json(&tmp.path().join("imagined/manifest.json"));
    assert_eq!(m["imagined"], true);
    let steps = m["num_steps"].as_u64().unwrap();
    assert!(steps >= 20, "{m}");
    assert_eq!(m["num_episodes"].as_u64().unwrap() % 3, 0, "whole rounds");
    assert_eq!(m["collections"][0]["world_model_env"], "procgen:coinrun");
    assert!(tmp.path().join("imagined/preview.png").is_file());
    assert!(tmp.path().join("imagined/models/reward").is_dir());
    assert!(tmp.path().join("imagined/models/policy").is_dir());
    // Asking for more continues the same dataset with the next rounds.
    imagine(&p("imagined"), "40");
    let m2 = json(&tmp.path().join("imagined/manifest.json"));
    assert!(m2["num_steps"].as_u64().unwrap() >= 40);
    assert_eq!(
        m2["episodes"][0], m["episodes"][0],
        "earlier episodes stay as they were"
    );
    // Another settings on the same dataset are refused.
    let err = fails(&[
        "imagine",
        "--ckpt",
        &p("wm"),
        "--starts",
        &p("data"),
        "--preset",
        "debug",
        "--transitions",
        "60",
        "--horizon",
        "5",
        "--batch",
        "3",
        "--out",
        &p("imagined"),
    ]);
    assert!(err.contains("other settings"), "{err}");
    // The same rounds in a fresh directory give the same episodes.
    imagine(&p("imagined-again"), "20");
    let again = json(&tmp.path().join("imagined-again/manifest.json"));
    assert_eq!(again["episodes"][0]["crc32"], m["episodes"][0]["crc32"]);
    ok(&["dataset", "info", &p("imagined"), "--check"]);

    // CQL and IQL, with and without the imagined data.
    let offline = |algo: &str, data: &str, out: &str, extra: &[&str]| {
        let mut args = vec![
            "offline",
            "--algo",
            algo,
            "--data",
            data,
            "--preset",
            "debug",
            "--steps",
            "12",
            "--eval-every",
            "6",
            "--eval-episodes",
            "2",
            "--eval-envs",
            "2",
            "--log-every",
            "3",
            "--out",
            out,
        ];
        args.extend_from_slice(extra);
        ok(&args)
    };
    let both = format!("{},{}", p("data"), p("imagined"));
    let mut runs = Vec::new();
    for algo in ["cql", "iql"] {
        for (data, tag) in [(p("data"), ""), (both.clone(), "-wm")] {
            let out = p(&format!("{algo}{tag}"));
            let text = offline(algo, &data, &out, &[]);
            assert!(text.contains("on training levels"), "{text}");
            let s = json(&Path::new(&out).join("summary.json"));
            assert_eq!(s["with_world_model"], !tag.is_empty());
            assert!(s["eval"]["train_return"].as_f64().is_some());
            assert!(s["eval"]["test_return"].as_f64().is_some(), "{s}");
            runs.push(out);
        }
    }
    // A batch mix of 1:1 instead of the union's proportions.
    let cfg = {
        offline("bc", &both, &p("bc-mix"), &["--mix", "1:1"]);
        json(&tmp.path().join("bc-mix/config.json"))
    };
    assert_eq!(cfg["real_share"], 0.5);
    runs.push(p("bc-mix"));
    let table_path = p("table.md");
    let mut args = vec!["compare".to_string()];
    args.extend(runs.iter().cloned());
    args.extend(["--out".to_string(), table_path.clone()]);
    let text = ok(&args);
    for row in ["| CQL |", "| IQL |", "| BC |", "training levels + WM"] {
        assert!(text.contains(row), "{text}");
    }
    let written = fs::read_to_string(&table_path).unwrap();
    let rows: Vec<&str> = written.lines().filter(|l| l.starts_with("| ")).collect();
    assert_eq!(
        rows.len(),
        4,
        "a header and one row per algorithm: {written}"
    );
    // CQL and IQL ran with and without world-model data, one seed each; BC with.
    assert!(
        rows.iter()
            .any(|r| r.starts_with("| CQL |") && r.ends_with("| 1 / 1 |")),
        "{written}"
    );
    assert!(
        rows.iter()
            .any(|r| r.starts_with("| BC | - |") && r.ends_with("| 0 / 1 |")),
        "{written}"
    );

    // An interrupted run resumes onto the same losses as an uninterrupted one.
    offline("cql", &both, &p("cql-resumed"), &["--stop-after", "6"]);
    offline("cql", &both, &p("cql-resumed"), &["--resume"]);
    assert_eq!(
        losses(&tmp.path().join("cql-resumed")),
        losses(&tmp.path().join("cql-wm"))
    );

    // Mismatches name the file.
    ok(&[
        "collect",
        "--env",
        "push",
        "--policy",
        "random",
        "--episodes",
        "1",
        "--out",
        &p("push"),
    ]);
    let mixed = format!("{},{}", p("data"), p("push"));
    let err = fails(&[
        "offline",
        "--algo",
        "cql",
        "--data",
        &mixed,
        "--out",
        &p("bad"),
    ]);
    assert!(
        err.contains(&format!("{}/manifest.json", p("push"))),
        "{err}"
    );
    let err = fails(&[
        "offline",
        "--algo",
        "iql",
        "--data",
        &p("data"),
        "--env",
        "procgen:ninja",
        "--out",
        &p("bad"),
    ]);
    assert!(
        err.contains(&format!("{}/manifest.json", p("data"))),
        "{err}"
    );
    // An imagined dataset whose world model learned another game.
    let manifest = tmp.path().join("imagined-again/manifest.json");
    let text = fs::read_to_string(&manifest).unwrap();
    fs::write(
        &manifest,
        text.replace(
            "\"world_model_env\": \"procgen:coinrun\"",
            "\"world_model_env\": \"procgen:ninja\"",
        ),
    )
    .unwrap();
    let other = format!("{},{}", p("data"), p("imagined-again"));
    let err = fails(&[
        "offline",
        "--algo",
        "cql",
        "--data",
        &other,
        "--out",
        &p("bad"),
    ]);
    assert!(
        err.contains("imagined-again/manifest.json") && err.contains("procgen:ninja"),
        "{err}"
    );
    // Imagination from a world model of another env than the start data.
    let err = fails(&[
        "imagine",
        "--ckpt",
        &p("wm"),
        "--starts",
        &p("push"),
        "--out",
        &p("bad-imagined"),
    ]);
    assert!(err.contains("was trained on procgen:coinrun"), "{err}");
}
