//! The status page in a real browser: headless Chromium loads `/` from the
//! admin listener of an in-process proxy that has just refused something,
//! runs the page's script, and the rendered DOM (`--dump-dom` with a
//! virtual-time budget) must show the denied host in the live table and the
//! explain form's answer. Then, at 375 px (and 320, 600, 900, 901, 1024 px),
//! the page must not overflow horizontally, and a 375 px screenshot is taken.
//! Headless Chromium will not make a window narrower than 500 px
//! (`--window-size=375,900` lays the page out at 500 px and crops the
//! screenshot), so the widths are set with the DevTools protocol's
//! `Emulation.setDeviceMetricsOverride`, over `--remote-debugging-pipe`.
//!
//! With `server.admin_token` set, Chromium signs in: it gets the sign-in
//! form on `/`, submits a wrong token (the form again), then the right one,
//! and the page shows the data; the session cookie is not visible to the
//! page's script; "Sign out" brings the form back.
//!
//! Without Chromium the test prints `SKIP: chromium not installed` and
//! passes, unless `CI=true`, where a missing Chromium fails it (`.ci/run`
//! installs Debian's `chromium`). `CHROMIUM=/path` picks another binary;
//! `STATUS_SCREENSHOT_DIR=dir` keeps the screenshots there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "it/support.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// Chromium, from `CHROMIUM` or the `PATH`.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Run headless Chromium on `url` with `extra` flags; returns standard output.
fn browse(bin: &Path, url: &str, extra: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out_path = out_dir.path().join("stdout");
    let err_path = out_dir.path().join("stderr");
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--no-proxy-server",
        "--hide-scrollbars",
        "--virtual-time-budget=5000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(extra)
    .arg(url)
    .stdin(Stdio::null())
    .stdout(std::fs::File::create(&out_path).unwrap())
    .stderr(std::fs::File::create(&err_path).unwrap());
    let mut child = cmd.spawn().expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish in 120 s:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(
        status.success(),
        "chromium failed ({status}):\n{}",
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    stdout
}

async fn browse_async(bin: &Path, url: String, extra: Vec<String>) -> String {
    let bin = bin.to_path_buf();
    tokio::task::spawn_blocking(move || browse(&bin, &url, &extra))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_denials_in_chromium() {
    let Some(bin) = chromium() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "chromium not installed, and CI=true: .ci/run installs Debian's chromium"
        );
        println!("SKIP: chromium not installed");
        eprintln!("SKIP: chromium not installed");
        return;
    };

    let origin = HttpOrigin::start().await;
    let port = origin.port();
    let catalog = format!(
        "[[rule]]\nname = \"Clearswift Update Server\"\nhosts = [\"repo.clearswift.net\"]\nports = [{port}]\naction = \"allow\"\n"
    );
    let proxy = TestProxy::start(&config(&["repo.clearswift.net"], ""), &catalog).await;
    let client = proxy.client();
    let r = client
        .get(format!("http://repo.clearswift.net:{port}/bytes/20000"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // The vendor's new host, and a very long name that must wrap, not overflow.
    // (One 63-byte label: no hyphen to break at.)
    let long = "telemetryendpointforcloudlookupsinthevendorsfrankfurtregion0123.vendor-example.com";
    for _ in 0..3 {
        let (status, _) = connect(proxy.addr, "ksn2.kaspersky-labs.com:443").await;
        assert_eq!(status, 403);
    }
    let (status, _) = connect(proxy.addr, &format!("{long}:443")).await;
    assert_eq!(status, 403);
    let r = client
        .get("http://repo.clearswift.net:8080/mirrorlist")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    proxy.records(6).await;
    // The status table is fed on the writer thread, just after the records.
    let deadline = Instant::now() + WAIT;
    loop {
        let body = support::admin_client()
            .get(format!("http://{}/api/denials", proxy.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if body.contains("\"distinct\":3") {
            break;
        }
        assert!(Instant::now() < deadline, "denials never showed: {body}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let url = format!("http://{}/", proxy.admin);

    // Desktop width: the live table lists the denied host.
    // (The fragment also runs the explain form for that target.)
    let explain_url = format!("{url}#explain=ksn2.kaspersky-labs.com%3A443");
    let dom = browse_async(
        &bin,
        explain_url,
        vec!["--window-size=1280,900".into(), "--dump-dom".into()],
    )
    .await;
    let table = dom
        .split("id=\"denials-body\"")
        .nth(1)
        .and_then(|rest| rest.split("</tbody>").next())
        .unwrap_or_else(|| panic!("no denial table in the DOM:\n{dom}"));
    assert!(
        table.contains("data-host=\"ksn2.kaspersky-labs.com\""),
        "the denied host is not in the live table:\n{table}"
    );
    assert!(table.contains("ksn2.kaspersky-labs.com:443"), "{table}");
    assert!(
        table.contains("not_in_catalog") && table.contains("port_not_allowed"),
        "{table}"
    );
    // The script ran and filled the rest from the API too.
    assert!(dom.contains("1 rule from"), "catalog not rendered:\n{dom}");
    assert!(
        dom.contains("suggested: kaspersky-labs.com port 443"),
        "suggestion not rendered:\n{dom}"
    );
    assert!(
        dom.contains("<span id=\"state\" class=\"muted\">updated "),
        "the page did not update:\n{dom}"
    );
    let explained = dom
        .split("id=\"explain-result\"")
        .nth(1)
        .and_then(|rest| rest.split("</section>").next())
        .unwrap_or_default();
    assert!(
        explained.contains("CONNECT ksn2.kaspersky-labs.com:443")
            && explained.contains("not_in_catalog"),
        "the explain form did not run:\n{explained}"
    );

    // Phone width. Headless Chromium will not make a window narrower than
    // 500 px (`--window-size=375,900` lays out at 500 and crops), so the
    // 375 px viewport is set over the DevTools protocol instead, as a
    // phone's would be: no horizontal overflow, and a screenshot.
    let url2 = url.clone();
    let bin2 = bin.clone();
    // Also the widths around the layout's breakpoints (cards below 900 px,
    // two columns from 900 px).
    let (phone, others) = tokio::task::spawn_blocking(move || {
        let mut b = Cdp::launch(&bin2);
        let phone = b.viewport_check(&url2, 375, 900);
        let others: Vec<Shot> = [320, 600, 900, 901, 1024]
            .into_iter()
            .map(|w| b.viewport_check(&url2, w, 900))
            .collect();
        b.close();
        (phone, others)
    })
    .await
    .unwrap();
    for shot in &others {
        assert_eq!(
            shot.overflow, "false",
            "the page overflows at {} px: {shot:?}",
            shot.width
        );
    }
    assert_eq!(phone.width, 375, "{phone:?}");
    assert_eq!(
        phone.overflow, "false",
        "the page overflows at 375 px: {phone:?}"
    );
    assert!(phone.scroll_width <= 375, "{phone:?}");
    assert!(
        phone.hosts.iter().any(|h| h == "ksn2.kaspersky-labs.com"),
        "{phone:?}"
    );
    assert!(phone.png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    // The IHDR width.
    assert_eq!(
        u32::from_be_bytes([phone.png[16], phone.png[17], phone.png[18], phone.png[19]]),
        375
    );

    if let Some(dir) = std::env::var_os("STATUS_SCREENSHOT_DIR") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("status-375.png"), &phone.png).unwrap();
        let wide = tokio::task::spawn_blocking(move || {
            let mut b = Cdp::launch(&bin);
            let shot = b.viewport_check(&url, 1200, 1400);
            b.close();
            shot
        })
        .await
        .unwrap();
        std::fs::write(dir.join("status.png"), &wide.png).unwrap();
    }
}

/// With `server.admin_token` set, Chromium gets the sign-in form on `/`,
/// submits the token, and the page then shows the data; the session cookie
/// is invisible to the page's script (HttpOnly); "Sign out" brings the form
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_signs_in_to_the_status_page_with_the_token() {
    let Some(bin) = chromium() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "chromium not installed, and CI=true: .ci/run installs Debian's chromium"
        );
        println!("SKIP: chromium not installed");
        eprintln!("SKIP: chromium not installed");
        return;
    };
    let cfg = config(&[], "").replacen(
        "[server]\n",
        "[server]\nadmin_token = \"browser-s3cret\"\n",
        1,
    );
    let catalog = "[[rule]]\nname = \"Clearswift Update Server\"\nhosts = [\"repo.clearswift.net\"]\nports = [443]\naction = \"allow\"\n";
    let proxy = TestProxy::start(&cfg, catalog).await;
    let (status, _) = connect(proxy.addr, "ksn2.kaspersky-labs.com:443").await;
    assert_eq!(status, 403);
    proxy.records(1).await;
    let url = format!("http://{}/", proxy.admin);
    let seen = tokio::task::spawn_blocking(move || {
        let mut b = Cdp::launch(&bin);
        let s = b.open(&url);
        let s = Some(s.as_str());
        b.wait_for(s, "document.querySelector('form[action=\"/signin\"] input[name=token]') ? 'form' : null");
        // A wrong token first: the form again, with a note.
        b.eval(s, "(function () { var f = document.querySelector('form[action=\"/signin\"]'); f.token.value = 'wrong'; f.requestSubmit(); return 'sent'; })()");
        let note = b.wait_for(s, "document.getElementById('note') ? document.getElementById('note').textContent : null");
        b.eval(s, "(function () { var f = document.querySelector('form[action=\"/signin\"]'); f.token.value = 'browser-s3cret'; f.requestSubmit(); return 'sent'; })()");
        let hosts = b.wait_for(
            s,
            "document.body && document.body.dataset.updated ? Array.from(document.querySelectorAll('#denials-body tr.denial')).map(function (r) { return r.dataset.host; }).join(',') || null : null",
        );
        let script_cookie = b.eval(s, "'[' + document.cookie + ']'");
        b.eval(s, "(function () { document.querySelector('#signout button').click(); return 'out'; })()");
        let after = b.wait_for(s, "document.querySelector('form[action=\"/signin\"]') ? 'form' : null");
        b.close();
        (note, hosts, script_cookie, after)
    })
    .await
    .unwrap();
    let (note, hosts, script_cookie, after) = seen;
    assert!(note.contains("not the admin token"), "{note}");
    assert!(
        hosts.split(',').any(|h| h == "ksn2.kaspersky-labs.com"),
        "{hosts}"
    );
    assert_eq!(script_cookie, "[]", "the session cookie is HttpOnly");
    assert_eq!(after, "form", "signed out");
}

/// What the page looked like in one viewport.
struct Shot {
    width: u64,
    scroll_width: u64,
    overflow: String,
    hosts: Vec<String>,
    png: Vec<u8>,
}

impl std::fmt::Debug for Shot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shot")
            .field("width", &self.width)
            .field("scroll_width", &self.scroll_width)
            .field("overflow", &self.overflow)
            .field("hosts", &self.hosts)
            .field("png_bytes", &self.png.len())
            .finish()
    }
}

/// A minimal DevTools-protocol driver over `--remote-debugging-pipe`
/// (JSON messages separated by NUL bytes on file descriptors 3 and 4,
/// which `sh` maps onto our pipes: no WebSocket, no extra crate).
struct Cdp {
    child: std::process::Child,
    tx: std::process::ChildStdin,
    rx: std::io::BufReader<std::process::ChildStdout>,
    next: u64,
    /// Take an error answer as no result (evaluating while a page navigates).
    lenient: bool,
    /// Set when the browser is done; until then a watchdog kills it after
    /// [`BROWSER_LIMIT`] (a read on the pipe has no time-out of its own).
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    _profile: tempfile::TempDir,
}

/// How long one browser may run before the watchdog kills it.
const BROWSER_LIMIT: Duration = Duration::from_secs(180);

impl Cdp {
    fn launch(bin: &Path) -> Cdp {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null"#)
            .arg(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--no-proxy-server",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        let tx = child.stdin.take().unwrap();
        let rx = std::io::BufReader::new(child.stdout.take().unwrap());
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (pid, flag) = (child.id(), std::sync::Arc::clone(&done));
        std::thread::spawn(move || {
            let deadline = Instant::now() + BROWSER_LIMIT;
            while Instant::now() < deadline {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            if !flag.load(std::sync::atomic::Ordering::Relaxed) {
                eprintln!("chromium (pid {pid}) ran over {BROWSER_LIMIT:?}; killing it");
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        });
        Cdp {
            child,
            tx,
            rx,
            next: 0,
            lenient: false,
            done,
            _profile: profile,
        }
    }

    /// Send one command and return its result (events in between are skipped).
    fn call(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: serde_json::Value,
    ) -> serde_json::Value {
        use std::io::{BufRead, Write};
        self.next += 1;
        let id = self.next;
        let mut msg = serde_json::json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = s.into();
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.tx.write_all(&bytes).unwrap();
        self.tx.flush().unwrap();
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = self.rx.read_until(0, &mut buf).unwrap();
            assert!(n > 0, "chromium closed the DevTools pipe during {method}");
            buf.pop();
            let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
            if v["id"] == id {
                if self.lenient {
                    return v.get("result").cloned().unwrap_or_default();
                }
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Load `url` in a `width` x `height` viewport, wait for the page's first
    /// update, and look at it.
    fn viewport_check(&mut self, url: &str, width: u64, height: u64) -> Shot {
        let t = self.call(
            None,
            "Target.createTarget",
            serde_json::json!({"url": "about:blank"}),
        );
        let target = t["targetId"].as_str().unwrap().to_string();
        let a = self.call(
            None,
            "Target.attachToTarget",
            serde_json::json!({"targetId": target, "flatten": true}),
        );
        let s = a["sessionId"].as_str().unwrap().to_string();
        let s = Some(s.as_str());
        self.call(
            s,
            "Emulation.setDeviceMetricsOverride",
            serde_json::json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        self.call(s, "Page.enable", serde_json::json!({}));
        self.call(s, "Page.navigate", serde_json::json!({"url": url}));
        let probe = "JSON.stringify(document.body && document.body.dataset.updated ? {\
            width: window.innerWidth, scroll: document.documentElement.scrollWidth,\
            overflow: document.body.dataset.overflow,\
            hosts: Array.from(document.querySelectorAll('#denials-body tr.denial')).map(function (r) { return r.dataset.host; })\
            } : null)";
        let deadline = Instant::now() + Duration::from_secs(60);
        let seen = loop {
            let r = self.call(
                s,
                "Runtime.evaluate",
                serde_json::json!({"expression": probe, "returnByValue": true}),
            );
            let text = r["result"]["value"].as_str().unwrap_or("null").to_string();
            let v: serde_json::Value =
                serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
            if !v.is_null() {
                break v;
            }
            assert!(
                Instant::now() < deadline,
                "the page never rendered its data"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let shot = self.call(
            s,
            "Page.captureScreenshot",
            serde_json::json!({"format": "png"}),
        );
        use base64::Engine as _;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        Shot {
            width: seen["width"].as_u64().unwrap(),
            scroll_width: seen["scroll"].as_u64().unwrap(),
            overflow: seen["overflow"].as_str().unwrap_or("").to_string(),
            hosts: seen["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h.as_str().unwrap_or("").to_string())
                .collect(),
            png,
        }
    }

    /// A new tab on `url`; its session id.
    fn open(&mut self, url: &str) -> String {
        let t = self.call(
            None,
            "Target.createTarget",
            serde_json::json!({"url": "about:blank"}),
        );
        let target = t["targetId"].as_str().unwrap().to_string();
        let a = self.call(
            None,
            "Target.attachToTarget",
            serde_json::json!({"targetId": target, "flatten": true}),
        );
        let s = a["sessionId"].as_str().unwrap().to_string();
        self.call(Some(&s), "Page.enable", serde_json::json!({}));
        self.call(Some(&s), "Page.navigate", serde_json::json!({"url": url}));
        s
    }

    /// Evaluate `expr` in the page; its value as text ("null" for none).
    fn eval(&mut self, s: Option<&str>, expr: &str) -> String {
        self.lenient = true;
        let r = self.call(
            s,
            "Runtime.evaluate",
            serde_json::json!({"expression": expr, "returnByValue": true}),
        );
        self.lenient = false;
        match &r["result"]["value"] {
            serde_json::Value::String(t) => t.clone(),
            serde_json::Value::Null => "null".into(),
            v => v.to_string(),
        }
    }

    /// Evaluate `expr` until it is not null (the page may be navigating).
    fn wait_for(&mut self, s: Option<&str>, expr: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.eval(s, expr);
            if v != "null" {
                return v;
            }
            assert!(Instant::now() < deadline, "never true: {expr}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ask the browser to close; [`Drop`] makes sure it is gone.
    fn close(mut self) {
        self.call(None, "Browser.close", serde_json::json!({}));
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Cdp {
    fn drop(&mut self) {
        // From here on this side ends the browser (before it is reaped and
        // its pid can be reused).
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
