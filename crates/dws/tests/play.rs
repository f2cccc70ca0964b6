//! `dws play`: the server under a real browser (headless Chromium driven through the
//! DevTools protocol) and under hostile clients.

mod common;

use base64::Engine;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

type Socket = WebSocket<MaybeTlsStream<TcpStream>>;

/// A running `dws play` (killed on drop).
struct Server {
    child: Child,
    addr: String,
    stderr: Arc<Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dws"))
            .arg("play")
            .args(args)
            .args(["--port", "0"])
            .env("DWS_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(rest) = line.split("open http://").nth(1) {
                        break rest.split('/').next().unwrap().to_string();
                    }
                }
                _ => panic!("dws play exited before serving: {}", stderr.lock().unwrap()),
            }
        };
        // Keep draining stdout so the server never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            addr,
            stderr,
        }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc")
    }

    /// A WebSocket to the server and its hello message.
    fn connect(&self) -> (Socket, Value) {
        let (mut ws, _) = tungstenite::connect(format!("ws://{}/ws", self.addr)).unwrap();
        if let MaybeTlsStream::Plain(s) = ws.get_mut() {
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        }
        let hello = recv_json(&mut ws);
        (ws, hello)
    }
}

fn recv(ws: &mut Socket) -> Message {
    loop {
        match ws.read().expect("a message from the server") {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

fn recv_json(ws: &mut Socket) -> Value {
    match recv(ws) {
        Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
        other => panic!("expected JSON, got {other:?}"),
    }
}

fn send(ws: &mut Socket, v: Value) {
    ws.send(Message::text(v.to_string())).unwrap();
}

/// Sends a reset or an action; returns the frame's JSON and pixels.
fn step(ws: &mut Socket, msg: Value) -> (Value, Vec<u8>) {
    send(ws, msg);
    let meta = recv_json(ws);
    assert_eq!(meta["type"], "frame", "{meta}");
    match recv(ws) {
        Message::Binary(b) => (meta, b.to_vec()),
        other => panic!("expected pixels, got {other:?}"),
    }
}

/// Sends a bad message; the server must answer with an error and keep the connection.
fn expect_error(ws: &mut Socket, msg: Message) -> String {
    ws.send(msg).unwrap();
    let reply = recv_json(ws);
    assert_eq!(reply["type"], "error", "{reply}");
    reply["message"].as_str().unwrap().to_string()
}

#[test]
fn hostile_clients_get_errors_and_the_server_keeps_serving() {
    let server = Server::start(&[
        "--real-only",
        "--env",
        "push",
        "--host",
        "0.0.0.0",
        "--max-sessions",
        "3",
    ]);
    let warned = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        server
            .stderr
            .lock()
            .unwrap()
            .contains("warning: serving on 0.0.0.0")
    });
    assert!(
        warned,
        "no warning for 0.0.0.0: {}",
        server.stderr.lock().unwrap()
    );

    // A tab that plays normally throughout.
    let (mut good, hello) = server.connect();
    assert_eq!(hello["mode"], "real");
    assert_eq!(hello["action_space"]["type"], "continuous");
    let (meta, px) = step(&mut good, json!({"type": "reset"}));
    assert_eq!((meta["t"].as_u64(), px[0], px[1]), (Some(0), 1, 2));
    assert_eq!(px.len(), 6 + 64 * 64 * 3);
    for _ in 0..20 {
        step(&mut good, json!({"type": "act", "action": [0.5, -0.5]}));
    }
    let rss_before = server.rss_kib();

    let bad: Vec<Message> = vec![
        Message::text("not json {"),
        Message::text(r#"{"type":"fly"}"#),
        Message::text(r#"{"type":"act","action":[5,5]}"#),
        Message::text(r#"{"type":"act","action":[0.1]}"#),
        Message::text(r#"{"type":"act","action":"left"}"#),
        Message::text(r#"{"type":"act"}"#),
        Message::text(r#"{"type":"steps","value":3}"#),
        Message::text(r#"{"type":"record","on":false}"#),
        Message::text(r#"{"type":"reset","episode":2}"#),
        Message::text(r#"{"type":"act","action":[0,0],"extra":1}"#),
        Message::binary(vec![0u8, 1, 2, 3]),
        Message::text("[]"),
    ];
    let mut sent = 0;
    let mut connections = 0;
    let mut closed_for_size = 0;
    while sent < 1000 {
        let (mut ws, _) = server.connect();
        connections += 1;
        // An oversized message closes the connection it came on.
        if connections % 4 == 0 {
            let _ = ws.send(Message::text("x".repeat(64 * 1024)));
            sent += 1;
            let closed = loop {
                match ws.read() {
                    Ok(Message::Close(_)) | Err(_) => break true,
                    Ok(_) => continue,
                }
            };
            assert!(closed);
            closed_for_size += 1;
            continue;
        }
        let first = connections == 1;
        // The first connection goes past the limit of bad messages and is closed; the
        // others stay under it.
        let n = if first { 100 } else { 80 };
        for i in 0..n {
            let msg = bad[(sent + i) % bad.len()].clone();
            if first && i == n - 1 {
                ws.send(msg).unwrap();
                let reply = recv_json(&mut ws);
                assert_eq!(reply["type"], "error");
                let closed = loop {
                    match ws.read() {
                        Ok(Message::Close(Some(f))) => break u16::from(f.code) == 1008,
                        Ok(Message::Close(None)) | Err(_) => break true,
                        Ok(_) => continue,
                    }
                };
                assert!(closed, "the 100th bad message closes the connection");
            } else {
                let e = expect_error(&mut ws, msg);
                assert!(!e.is_empty());
            }
        }
        sent += n;
        // Between bursts the good tab still plays.
        let (meta, _) = step(&mut good, json!({"type": "act", "action": [-0.5, 0.5]}));
        assert_eq!(meta["type"], "frame");
        drop(ws);
    }
    assert!(closed_for_size >= 3 && connections >= 10);
    // Errors say what is wrong.
    let (mut ws, _) = server.connect();
    assert!(
        expect_error(&mut ws, Message::text(r#"{"type":"act","action":[5,5]}"#))
            .contains("[-1, 1]")
    );
    assert!(expect_error(&mut ws, Message::text("{")).contains("bad message"));
    drop(ws);

    // A new tab plays normally afterwards.
    let (mut ws, _) = server.connect();
    step(&mut ws, json!({"type": "reset"}));
    let mut frames = Vec::new();
    for i in 0..30 {
        let (meta, px) = step(&mut ws, json!({"type": "act", "action": [1.0, 0.0]}));
        assert_eq!(meta["t"].as_u64(), Some(i + 1));
        frames.push(px);
    }
    assert_ne!(frames[0], frames[29], "pushing right moves the arm");
    drop(ws);
    let rss_after = server.rss_kib();
    assert!(
        rss_after < rss_before + 32 * 1024,
        "memory grew from {rss_before} KiB to {rss_after} KiB"
    );

    // The number of tabs is bounded, and closing one frees its place.
    let (a, _) = server.connect();
    let (b, _) = server.connect();
    drop(good);
    std::thread::sleep(Duration::from_millis(200));
    let (c, _) = server.connect();
    let (mut d, full) = server.connect();
    assert_eq!(full["type"], "error");
    assert!(
        full["message"].as_str().unwrap().contains("server full"),
        "{full}"
    );
    assert!(matches!(d.read(), Ok(Message::Close(_)) | Err(_)));
    drop((a, b));
    let opened = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        let (_ws, hello) = server.connect();
        hello["type"] == "hello"
    });
    assert!(opened, "closed tabs free their places");
    drop(c);
}

/// The DevTools protocol: the browser's WebSocket, commands sent to one page's session.
struct Cdp {
    ws: Socket,
    next: u64,
    session: Option<String>,
}

impl Cdp {
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        send(&mut self.ws, msg);
        loop {
            let m = recv_json(&mut self.ws);
            if m["id"].as_u64() == Some(id) {
                assert!(m.get("error").is_none(), "{method}: {m}");
                return m["result"].clone();
            }
        }
    }

    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is true.
    fn wait(&mut self, expr: &str, what: &str) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if self.eval(expr) == json!(true) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "timed out waiting for {what}; page state: {}",
            self.eval("JSON.stringify({frames: dws.frames, meta: dws.meta, errors: dws.errors})")
        );
    }

    fn key(&mut self, code: &str, vk: u32, down: bool) {
        self.call(
            "Input.dispatchKeyEvent",
            json!({
                "type": if down { "keyDown" } else { "keyUp" },
                "code": code,
                "key": code,
                "windowsVirtualKeyCode": vk,
            }),
        );
    }

    /// A canvas's RGBA pixels.
    fn pixels(&mut self, id: &str) -> Vec<u8> {
        let v = self.eval(&format!(
            "Array.from(document.getElementById('{id}').getContext('2d').getImageData(0, 0, 64, 64).data)"
        ));
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u8)
            .collect()
    }

    /// Holds a key until the page has shown `frames` more frames; returns the frames shown.
    fn hold(&mut self, code: &str, vk: u32, frames: u64) -> Value {
        let start = self.eval("dws.frames").as_u64().unwrap();
        self.key(code, vk, true);
        self.wait(
            &format!("dws.frames >= {}", start + frames),
            &format!("{frames} frames with {code} held"),
        );
        self.key(code, vk, false);
        // The last action sent with the key held.
        self.eval("dws.meta.action")
    }
}

/// Headless Chromium with a DevTools WebSocket (killed on drop).
struct Browser {
    child: Child,
    url: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromium(profile: &Path) -> Browser {
    let bin = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect(
            "this test drives a real browser: install Debian's `chromium` package (`.ci/run` does)",
        );
    let mut child = Command::new(bin)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--window-size=1000,900",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("chromium exited before opening its DevTools port")
            .unwrap();
        if let Some(rest) = line.split("DevTools listening on ").nth(1) {
            break rest.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Browser { child, url }
}

/// A new page, attached to through the browser's WebSocket.
fn new_page(browser: &Browser) -> Cdp {
    let (mut ws, _) = tungstenite::connect(browser.url.as_str()).unwrap();
    if let MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    }
    let mut cdp = Cdp {
        ws,
        next: 0,
        session: None,
    };
    let target = cdp.call("Target.createTarget", json!({"url": "about:blank"}));
    let attached = cdp.call(
        "Target.attachToTarget",
        json!({"targetId": target["targetId"], "flatten": true}),
    );
    cdp.session = Some(attached["sessionId"].as_str().unwrap().to_string());
    cdp
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("an action vector: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Mean column of the pixels that differ between two RGBA images.
fn changed_column(a: &[u8], b: &[u8]) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for (i, (pa, pb)) in a.chunks(4).zip(b.chunks(4)).enumerate() {
        if pa != pb {
            sum += (i % 64) as f64;
            n += 1;
        }
    }
    (n > 0).then(|| sum / n as f64)
}

#[test]
fn the_page_plays_the_model_beside_the_real_env_in_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).to_string_lossy().into_owned();
    common::ok(&[
        "collect",
        "--env",
        "push",
        "--policy",
        "scripted",
        "--episodes",
        "3",
        "--env-opts",
        "max_episode_steps=40",
        "--out",
        &p("push"),
    ]);
    common::ok(&[
        "pretrain",
        "--data",
        &p("push"),
        "--steps",
        "2",
        "--out",
        &p("base"),
    ]);
    common::ok(&[
        "finetune",
        "--base",
        &p("base"),
        "--data",
        &p("push"),
        "--steps",
        "2",
        "--out",
        &p("dws"),
    ]);
    // An action-free model cannot be played.
    assert!(common::fails(&["play", "--ckpt", &p("base"), "--port", "0"]).contains("action-free"));

    let server = Server::start(&["--ckpt", &p("dws")]);

    // The protocol, seen by a plain client: both panes, the step control, a GIF.
    let (mut ws, hello) = server.connect();
    assert_eq!(hello["mode"], "sim+real", "{hello}");
    let (meta, px) = step(&mut ws, json!({"type": "reset", "episode": 0}));
    assert_eq!(
        meta["real_synced"], true,
        "the real env replays the episode's start"
    );
    assert_eq!((px[1], px.len()), (3, 6 + 2 * 64 * 64 * 3));
    send(&mut ws, json!({"type": "steps", "value": 2}));
    assert_eq!(recv_json(&mut ws)["value"], 2);
    send(&mut ws, json!({"type": "record", "on": true}));
    assert_eq!(recv_json(&mut ws)["on"], true);
    for _ in 0..4 {
        let (meta, _) = step(&mut ws, json!({"type": "act", "action": [1.0, 0.0]}));
        assert_eq!(meta["steps"], 2);
        assert!(meta["psnr"].as_f64().is_some(), "{meta}");
    }
    send(&mut ws, json!({"type": "record", "on": false}));
    assert_eq!(recv_json(&mut ws)["frames"], 4);
    match recv(&mut ws) {
        Message::Binary(b) => assert_eq!((b[0], &b[1..7]), (2, &b"GIF89a"[..])),
        other => panic!("expected a GIF, got {other:?}"),
    }
    assert!(
        expect_error(&mut ws, Message::text(r#"{"type":"reset","episode":99}"#))
            .contains("does not exist")
    );
    drop(ws);

    // The page in a real browser.
    let browser = chromium(&tmp.path().join("profile"));
    let mut cdp = new_page(&browser);
    cdp.call("Page.enable", json!({}));
    cdp.call(
        "Page.navigate",
        json!({"url": format!("http://{}/?episode=0&fps=20", server.addr)}),
    );
    cdp.wait("typeof dws === 'object' && dws.frames >= 3", "first frames");
    cdp.call("Page.bringToFront", json!({}));
    let hello = cdp.eval("dws.hello");
    assert_eq!(hello["mode"], "sim+real");
    // Nothing held: the arm stands still.
    assert_eq!(floats(&cdp.eval("dws.meta.action")), [0.0, 0.0]);

    let start_real = cdp.pixels("real");
    let start_sim = cdp.pixels("sim");
    let right = cdp.hold("ArrowRight", 39, 6);
    let right = floats(&right);
    assert!(right[0] > 0.0 && right[1] == 0.0, "{right:?}");
    let after_right = cdp.pixels("real");
    let sim_right = cdp.pixels("sim");
    assert_ne!(start_sim, sim_right, "the model's pane changes");

    // Same start, other key.
    cdp.key("KeyR", 82, true);
    cdp.key("KeyR", 82, false);
    cdp.wait("dws.meta.t === 0", "the reset");
    cdp.wait("dws.meta.t >= 1", "a step after the reset");
    assert_eq!(cdp.pixels("real").len(), start_real.len());
    let left = cdp.hold("ArrowLeft", 37, 6);
    let left = floats(&left);
    assert!(left[0] < 0.0 && left[1] == 0.0, "{left:?}");
    let after_left = cdp.pixels("real");
    assert_ne!(after_right, after_left, "different keys, different frames");
    let (r, l) = (
        changed_column(&start_real, &after_right).expect("right moves the arm"),
        changed_column(&start_real, &after_left).expect("left moves the arm"),
    );
    assert!(
        r > l,
        "the arm moved right of where left took it: {r:.1} vs {l:.1}"
    );

    // Record a GIF through the page's button.
    cdp.eval("document.getElementById('record').click()");
    cdp.wait("dws.recording === true", "recording to start");
    let f = cdp.eval("dws.frames").as_u64().unwrap();
    cdp.wait(&format!("dws.frames >= {}", f + 3), "recorded frames");
    cdp.eval("document.getElementById('record').click()");
    cdp.wait("dws.gifs === 1", "the GIF download");
    assert_eq!(cdp.eval("dws.errors.length"), json!(0));

    let shot = cdp.call("Page.captureScreenshot", json!({"format": "png"}));
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let out = std::env::var_os("DWS_PLAY_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().join("play.png"));
    std::fs::write(&out, png).unwrap();
}

#[test]
fn procgen_keys_and_templates_reach_the_page() {
    let server = Server::start(&["--real-only", "--env", "procgen:coinrun"]);
    let (mut ws, hello) = server.connect();
    assert_eq!(hello["mode"], "real");
    assert_eq!(hello["templates"].as_array().unwrap().len(), 15);
    // Nine directions, with and without fire.
    let keymap = hello["keymap"].as_array().unwrap();
    assert_eq!(keymap.len(), 18);
    assert!(keymap.contains(&json!([1, 0, 0, 7])), "right is action 7");
    let (meta, px) = step(&mut ws, json!({"type": "reset"}));
    assert_eq!(
        (meta["t"].as_u64(), px[1]),
        (Some(0), 2),
        "the real pane only"
    );
    let (meta, _) = step(&mut ws, json!({"type": "act", "action": 7}));
    assert_eq!(meta["template"], "move right");
    assert!(meta["reward"].as_f64().is_some());
    assert!(
        expect_error(&mut ws, Message::text(r#"{"type":"act","action":15}"#))
            .contains("unknown action 15")
    );
    assert!(
        expect_error(&mut ws, Message::text(r#"{"type":"act","action":[1,0]}"#))
            .contains("discrete action")
    );
    // Running right changes what is seen.
    let first = step(&mut ws, json!({"type": "act", "action": 7})).1;
    let mut last = first.clone();
    for _ in 0..20 {
        last = step(&mut ws, json!({"type": "act", "action": 7})).1;
    }
    assert_ne!(first, last);
}
