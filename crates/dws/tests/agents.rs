//! `dws score` and `dws compare` on agents: two seeds of `dws ppo` and one `dws mbrl`
//! run on the pushing task (no assets), scored over real episodes and tabulated by what
//! trained them.

mod common;

use common::{fails, ok};
use std::fs;
use std::path::Path;

fn ppo(run: &Path, seed: &str, extra: &[&str]) -> String {
    let args = [
        "ppo",
        "--env",
        "push",
        "--preset",
        "debug",
        "--steps",
        "128",
        "--num-envs",
        "4",
        "--num-steps",
        "16",
        "--baseline-episodes",
        "4",
        "--seed",
        seed,
        "--out",
        run.to_str().unwrap(),
    ];
    ok(&[&args[..], extra].concat())
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn agents_are_scored_over_real_episodes_and_compared_by_group() {
    let dir = tempfile::tempdir().unwrap();
    let (p0, p1, m) = (
        dir.path().join("ppo-s0"),
        dir.path().join("ppo-s1"),
        dir.path().join("mbrl"),
    );
    ppo(&p0, "0", &[]);
    ppo(&p1, "1", &[]);
    ok(&[
        "mbrl",
        "--env",
        "push",
        "--preset",
        "debug",
        "--steps",
        "128",
        "--baseline-episodes",
        "4",
        "--eval-every",
        "0",
        "--out",
        m.to_str().unwrap(),
    ]);
    let runs = [&p0, &p1, &m].map(|p| p.to_str().unwrap().to_string());
    let table = dir.path().join("agents.md");
    let table_s = table.to_str().unwrap();

    // Unscored runs are tabulated from their training returns.
    let out = ok(&[
        &["compare".to_string()],
        &runs[..],
        &["--out".into(), table_s.into()],
    ]
    .concat());
    assert!(
        out.contains("| push | PPO (model-free) | 2 | 128 |"),
        "{out}"
    );
    let row = out
        .lines()
        .find(|l| l.starts_with(&format!("| {} |", p0.display())))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.ends_with("| - |"), "no score yet: {row}");

    let score_args = |run: &str| {
        vec![
            "score".to_string(),
            run.to_string(),
            "--episodes".into(),
            "3".into(),
            "--num-envs".into(),
            "2".into(),
        ]
    };
    let out = ok(&[&score_args(&runs[0])[..], &runs[1..]].concat());
    assert!(out.contains("uniform-random policy on push"), "{out}");
    // 3 episodes on 2 envs: 2 from each.
    let scores = [&p0, &p1, &m].map(|p| json(&p.join("score.json")));
    for s in &scores {
        assert_eq!(s["episodes"], 4, "{s}");
        assert!(s["mean_return"].as_f64().unwrap().is_finite(), "{s}");
        assert!(s["mean_length"].as_f64().unwrap() >= 1.0, "{s}");
    }
    assert_eq!(scores[0]["random_return"], scores[2]["random_return"]);
    assert!(scores[2]["checkpoint"]
        .as_str()
        .unwrap()
        .contains("agent/checkpoints"));
    // The same seed gives the same score.
    ok(&score_args(&runs[0]));
    assert_eq!(json(&p0.join("score.json")), scores[0]);

    let out = ok(&[
        &["compare".to_string()],
        &runs[..],
        &["--out".into(), table_s.into()],
    ]
    .concat());
    let ret = |s: &serde_json::Value| s["mean_return"].as_f64().unwrap() as f32;
    let (a, b) = (ret(&scores[0]), ret(&scores[1]));
    let (mean, std) = ((a + b) / 2.0, (a - b).abs() / 2.0);
    assert!(
        out.contains("| push | PPO (model-free) | 2 | 128 |")
            && out.contains(&format!("| {mean:.2} ± {std:.2} |")),
        "{out}"
    );
    assert!(
        out.contains(
            "| push | MBRL, prioritized starts (0.5 imagined per real step, horizon 4) | 1 | 128 |"
        ),
        "{out}"
    );
    assert!(
        out.contains(&format!("| {} | MBRL, prioritized starts", m.display()))
            && out.contains(&format!(
                "{:.2} ± {:.2} (4 episodes)",
                ret(&scores[2]),
                scores[2]["std_return"].as_f64().unwrap()
            )),
        "{out}"
    );
    assert!(out.contains("(scored like the agents)"), "{out}");
    let written = fs::read_to_string(&table).unwrap();
    assert!(
        written.contains("| push | PPO (model-free) | 2 | 128 |"),
        "{written}"
    );
    assert!(written.contains("agents.png"), "{written}");
    let png = fs::read(dir.path().join("agents.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");

    // Unfinished runs, other kinds of directories and non-runs are refused clearly.
    let part = dir.path().join("ppo-part");
    ppo(&part, "2", &["--stop-after", "1"]);
    let err = fails(&[
        "compare",
        &runs[0],
        part.to_str().unwrap(),
        "--out",
        table_s,
    ]);
    assert!(err.contains("has not finished"), "{err}");
    let err = fails(&[
        "compare",
        &runs[0],
        dir.path().to_str().unwrap(),
        "--out",
        table_s,
    ]);
    assert!(err.contains("is not a dws ppo or dws mbrl run"), "{err}");
    let err = fails(&["score", dir.path().to_str().unwrap()]);
    assert!(err.contains("not a dws ppo or dws mbrl run"), "{err}");
    let err = fails(&["score", &runs[0], "--episodes", "0"]);
    assert!(err.contains("--episodes must be at least 1"), "{err}");
}
