//! The world-model commands end to end on the debug preset.

use std::path::Path;
use std::process::Command;

fn dws(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dws"))
        .env("DWS_LOG", "warn")
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "dws {args:?} failed: {text}");
    text
}

fn losses(run: &Path) -> Vec<(usize, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap() as usize,
                v["loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn pretrain_finetune_predict_and_exact_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).to_string_lossy().into_owned();
    dws(&[
        "collect",
        "--env",
        "push",
        "--policy",
        "scripted",
        "--episodes",
        "4",
        "--env-opts",
        "max_episode_steps=30",
        "--out",
        &p("push"),
    ]);
    dws(&[
        "pretrain",
        "--data",
        &p("push"),
        "--steps",
        "6",
        "--out",
        &p("base"),
    ]);
    assert_eq!(losses(&tmp.path().join("base")).len(), 6);

    // Uninterrupted fine-tuning (continuous actions: the linear embedder).
    let (base, data) = (p("base"), p("push"));
    let ft = |out: &str, extra: &[&str]| {
        let out = p(out);
        let mut args = vec![
            "finetune", "--base", &base, "--data", &data, "--steps", "8", "--out", &out,
        ];
        args.extend_from_slice(extra);
        dws(&args);
    };
    ft("full", &[]);
    // The same run interrupted after 3 steps, then resumed.
    ft("resumed", &["--stop-after", "3"]);
    assert_eq!(losses(&tmp.path().join("resumed")).len(), 3);
    ft("resumed", &["--resume"]);
    let a = losses(&tmp.path().join("full"));
    let b = losses(&tmp.path().join("resumed"));
    assert_eq!(a.len(), 8);
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        b.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-4 * x.abs().max(1.0),
            "step {s}: {x} vs {y}"
        );
    }

    let gif = p("pred.gif");
    let text = dws(&[
        "predict",
        "--ckpt",
        &p("full"),
        "--data",
        &p("push"),
        "--episode",
        "1",
        "--horizon",
        "5",
        "--out",
        &gif,
    ]);
    assert!(
        text.contains("with actions") && text.contains("PSNR"),
        "{text}"
    );
    let bytes = std::fs::read(&gif).unwrap();
    assert_eq!(&bytes[..6], b"GIF89a");
    let png = std::fs::read(tmp.path().join("pred.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");

    // Several episodes, and the same start under another episode's actions: the truth
    // of that counterfactual comes from replaying the actions in the environment.
    let json = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join(name)).unwrap()).unwrap()
    };
    let args = |out: &str, extra: &[&str]| {
        let mut v: Vec<String> = [
            "predict",
            "--ckpt",
            &p("full"),
            "--data",
            &p("push"),
            "--horizon",
            "6",
            "--out",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push(p(out));
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |out: &str, extra: &[&str]| {
        let a = args(out, extra);
        dws(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    run("all.gif", &["--episodes", "4"]);
    let all = json("all.json");
    assert_eq!(all["episodes"].as_array().unwrap().len(), 4);
    let text = run("own.gif", &["--episode", "0"]);
    assert!(text.contains("repeat last frame"), "{text}");
    let text = run("other.gif", &["--episode", "0", "--actions-from", "2"]);
    assert!(text.contains("truth replayed"), "{text}");
    let (own, other) = (json("own.json"), json("other.json"));
    assert_eq!(own["episodes"][0]["truth"], "recorded");
    assert_eq!(other["episodes"][0]["truth"], "replayed");
    // Same first frame, so the repeat-frame reference differs only through the truth:
    // other actions moved the arm elsewhere.
    assert_ne!(
        own["episodes"][0]["repeat_last"]["mse_per_frame"],
        other["episodes"][0]["repeat_last"]["mse_per_frame"]
    );

    // Bad requests are refused with the reason.
    let bad = |extra: &[&str]| {
        let a = args("bad.gif", extra);
        let out = Command::new(env!("CARGO_BIN_EXE_dws"))
            .args(&a)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(bad(&["--episodes", "9"]).contains("has 4 episodes"));
    assert!(bad(&["--actions-from", "1", "--episodes", "2"]).contains("--episodes 1"));
    assert!(bad(&["--sample-steps", "0"]).contains("at least 1"));
}
