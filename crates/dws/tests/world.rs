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
}
