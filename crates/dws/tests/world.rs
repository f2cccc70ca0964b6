//! The world-model commands end to end on the debug preset.

mod common;

use common::{losses, ok as dws};
use std::process::Command;

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
    // Moving-pixel PSNR: the arm moves, so each score has one. Repeating the first frame
    // errs only where something moved, so it scores far lower there than on whole frames.
    let rl = &own["episodes"][0]["repeat_last"];
    assert!(
        rl["moving_psnr"].as_f64().unwrap() < rl["mean_psnr"].as_f64().unwrap(),
        "{rl}"
    );
    let vs = &other["episodes"][0]["model_vs_recorded"];
    assert!(vs["moving_psnr"].as_f64().is_some(), "{vs}");
    assert!(text.contains("moving pixels"), "{text}");

    // dws eval: metrics of the model and of the repeat-last-frame reference, FVD, plots,
    // GIFs and an HTML report that points at them; dws compare tabulates evals.
    let full = p("full");
    let ev = |out: &str, extra: &[&str]| {
        let out = p(out);
        let mut a = vec![
            "eval",
            "--ckpt",
            &full,
            "--data",
            &data,
            "--horizon",
            "8",
            "--clips",
            "3",
            "--gifs",
            "2",
            "--out",
            &out,
        ];
        a.extend_from_slice(extra);
        dws(&a)
    };
    let text = ev("eval-a", &[]);
    assert!(
        text.contains("repeat last frame") && text.contains("report.html"),
        "{text}"
    );
    let m = json("eval-a/metrics.json");
    for who in ["model", "repeat_last"] {
        let s = &m[who];
        assert_eq!(s["psnr_per_frame"].as_array().unwrap().len(), 8, "{who}");
        let psnr = s["psnr"].as_f64().unwrap();
        let ssim = s["ssim"].as_f64().unwrap();
        let lpips = s["lpips"].as_f64().unwrap();
        let fvd = s["fvd"].as_f64().unwrap();
        assert!((5.0..100.0).contains(&psnr), "{who}: PSNR {psnr}");
        assert!(ssim > -1.0 && ssim < 1.0, "{who}: SSIM {ssim}");
        assert!(lpips > 0.0 && lpips < 1.5, "{who}: LPIPS {lpips}");
        assert!(fvd > 0.0, "{who}: FVD {fvd}");
        // One mean per clip, and the overall mean is their mean.
        let clips: Vec<f64> = s["psnr_per_clip"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(clips.len(), 3, "{who}");
        assert!(
            (clips.iter().sum::<f64>() / 3.0 - psnr).abs() < 1e-9,
            "{who}"
        );
        assert_eq!(s["lpips_per_clip"].as_array().unwrap().len(), 3, "{who}");
        // The arm moves in every clip, so each has a moving-pixel PSNR, and their mean
        // is the reported one.
        let moving: Vec<f64> = s["psnr_moving_per_clip"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().expect("something moved"))
            .collect();
        assert_eq!(moving.len(), 3, "{who}");
        let mean_moving = s["psnr_moving"].as_f64().unwrap();
        assert!(
            (moving.iter().sum::<f64>() / 3.0 - mean_moving).abs() < 1e-9,
            "{who}"
        );
    }
    // Repeating the last frame errs only where something moved, so its error there is
    // larger than over the whole frame.
    for k in 0..3 {
        let whole = m["repeat_last"]["psnr_per_clip"][k].as_f64().unwrap();
        let moving = m["repeat_last"]["psnr_moving_per_clip"][k]
            .as_f64()
            .unwrap();
        assert!(moving < whole, "clip {k}: {moving} vs {whole}");
    }
    // The model has actions, so eval also rolls it out with other clips' actions.
    let other = m["other_actions"]["psnr_per_frame"].as_array().unwrap();
    assert_eq!(other.len(), 8);
    // The arm moves in these clips, so repeating the first frame is not perfect and its
    // error grows with the horizon.
    let r = m["repeat_last"]["psnr_per_frame"].as_array().unwrap();
    assert!(r[0].as_f64().unwrap() > r[7].as_f64().unwrap(), "{r:?}");
    let html = std::fs::read_to_string(tmp.path().join("eval-a/report.html")).unwrap();
    for file in [
        "psnr.png",
        "ssim.png",
        "lpips.png",
        "gifs/clip000.gif",
        "gifs/clip001.gif",
    ] {
        assert!(html.contains(file), "report does not show {file}");
        let bytes = std::fs::read(tmp.path().join("eval-a").join(file)).unwrap();
        assert!(&bytes[..6] == b"GIF89a" || &bytes[1..4] == b"PNG", "{file}");
    }
    ev(
        "eval-b",
        &["--no-fvd", "--seed", "3", "--name", "other-seed"],
    );
    assert!(json("eval-b/metrics.json")["model"]["fvd"].is_null());
    let table = dws(&["compare", &p("eval-a"), &p("eval-b"), "--out", &p("cmp.md")]);
    assert!(
        table.contains("| full |") && table.contains("| other-seed |"),
        "{table}"
    );
    assert!(table.contains("other clips"), "{table}");
    assert!(
        table.contains(" dB (moving pixels "),
        "PSNR drop with other actions: {table}"
    );
    let written = std::fs::read_to_string(tmp.path().join("cmp.md")).unwrap();
    assert!(
        table.starts_with(&written),
        "the file holds the printed table"
    );
    // Header, then one row per eval and one for the reference; no paired differences,
    // as the two evals drew other clips.
    assert_eq!(written.matches("\n| ").count(), 3, "{written}");
    assert!(!written.contains("Per-clip differences"), "{written}");
    // The same clips and sampler noise again: paired differences, all zero.
    ev("eval-c", &["--no-fvd", "--name", "same-clips"]);
    let table = dws(&[
        "compare",
        &p("eval-a"),
        &p("eval-c"),
        "--out",
        &p("cmp2.md"),
    ]);
    assert!(
        table.contains("Per-clip differences against `full`")
            && table.contains("| same-clips | +0.00 ± 0.00 (better on 0/3) |")
            && table.contains("| Δ moving PSNR dB |"),
        "{table}"
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
    assert!(bad(&["--warp-snap=-1"]).contains("length in pixels"));
    assert!(bad(&["--temperature", "0"]).contains("flow-model run"));
    let bad_eval_on = |data: &str, extra: &[&str]| {
        let mut a = vec![
            "eval",
            "--ckpt",
            &base,
            "--data",
            data,
            "--out",
            "/nonexistent/x",
        ];
        a.extend_from_slice(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_dws"))
            .args(&a)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let bad_eval = |extra: &[&str]| bad_eval_on(&data, extra);
    assert!(bad_eval(&["--clips", "1"]).contains("needs --clips 2"));
    assert!(bad_eval(&["--clips", "100000"]).contains("distinct"));
    assert!(bad_eval(&["--horizon", "200"]).contains("no episode has 201 frames"));
    let e = bad_eval_on("/nonexistent/data", &[]);
    assert!(e.contains("/nonexistent/data"), "{e}");
    let out = Command::new(env!("CARGO_BIN_EXE_dws"))
        .args(["compare", &p("push")])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds no eval"));
}
