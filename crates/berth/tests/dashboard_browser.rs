//! The dashboard in a real browser (issue 11): `berth serve --runtime sim`
//! as a child process, headless Chromium driven through chromedriver
//! (WebDriver, with fantoccini). It logs in, creates an instance from the
//! page and sees it turn `running` without a reload, sees the API's
//! validation message inline, opens the flow waterfall of a running and of
//! a failed instance, re-drives the failed step's dead letter, and saves
//! screenshots at 1280×800 and at 390 px wide under `target/screenshots/`.
//! Assertions are on the DOM, never on pixels; every wait polls the DOM
//! until a deadline.
//!
//! Without `chromium` and `chromedriver` on PATH the test says so and
//! passes, except under `CI=true`, where it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api_support::{ADMIN, DEADLINE};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// A child process, killed when dropped (also when an assertion fails).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `name` on PATH.
fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for n in names {
            let p = dir.join(n);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `berth serve --runtime sim` on a free port and a fresh data dir.
fn serve(dir: &Path) -> (Killed, String) {
    let log = dir.join("berth.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["serve", "--runtime", "sim", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("BERTH_ADMIN_TOKEN", ADMIN)
        .env("BERTH_LOG", "warn")
        .env_remove("BERTH_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let rx = api_support::listening_address(child.stdout.take().unwrap());
    let child = Killed(child);
    match rx.recv_timeout(DEADLINE) {
        Ok(addr) => (child, format!("http://{addr}")),
        Err(_) => panic!(
            "berth serve did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ),
    }
}

/// chromedriver on a free loopback port, once it answers `/status`.
async fn chromedriver(bin: &Path, dir: &Path) -> (Killed, String) {
    let port = free_port();
    let log = dir.join("chromedriver.log");
    let child = Command::new(bin)
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .arg(format!("--log-path={}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = Killed(child);
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(r) = http.get(format!("{url}/status")).send().await
            && r.status().is_success()
        {
            return (child, url);
        }
        assert!(
            Instant::now() < deadline,
            "chromedriver did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `script` (a function body returning a value) in the page until it
/// returns something other than `null`/`false`, or fails at the deadline
/// with `what` and the page's text.
async fn until(c: &Client, what: &str, script: &str) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let v = c.execute(script, vec![]).await.unwrap();
        if !(v.is_null() || v == Value::Bool(false)) {
            return v;
        }
        if Instant::now() > deadline {
            let text = c
                .execute("return document.body.innerText", vec![])
                .await
                .unwrap_or_default();
            panic!("timed out waiting for {what}; the page shows:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fill(c: &Client, css: &str, text: &str) {
    let e = c.find(Locator::Css(css)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(text).await.unwrap();
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn screenshot(c: &Client, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, c.screenshot().await.unwrap()).unwrap();
    eprintln!("screenshot: {}", path.display());
    path
}

/// Scrolls the instance page's flow panel to the top of the window (for
/// its screenshot).
async fn show_flow(c: &Client) {
    c.execute(
        "document.getElementById('flow-title').scrollIntoView(); return null",
        vec![],
    )
    .await
    .unwrap();
}

/// Sizes the window so that the page's viewport is `width`×`height` (the
/// window's own frame, if any, added on).
async fn viewport(c: &Client, width: u32, height: u32) {
    c.set_window_size(width, height).await.unwrap();
    let v = c
        .execute("return [window.innerWidth, window.innerHeight]", vec![])
        .await
        .unwrap();
    let (w, h) = (v[0].as_u64().unwrap(), v[1].as_u64().unwrap());
    let grow =
        |want: u32, got: u64| want + u32::try_from(u64::from(want).saturating_sub(got)).unwrap();
    c.set_window_size(grow(width, w), grow(height, h))
        .await
        .unwrap();
}

/// The viewport's width and whether the page fits in it (no sideways
/// scrolling), at the window size last set.
async fn fits(c: &Client) -> (i64, bool) {
    let v = c
        .execute(
            "return [window.innerWidth, document.documentElement.scrollWidth <= window.innerWidth + 1]",
            vec![],
        )
        .await
        .unwrap();
    (v[0].as_i64().unwrap(), v[1].as_bool().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_logs_in_creates_watches_traces_and_redrives() {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let (Some(chromium), Some(driver)) = (
        on_path(&["chromium", "chromium-browser", "google-chrome"]),
        on_path(&["chromedriver"]),
    ) else {
        assert!(
            !ci,
            "CI=true: chromium and chromedriver must be on PATH (apt-get install chromium chromium-driver)"
        );
        eprintln!("skipped: chromium or chromedriver is not on PATH");
        return;
    };

    let dir = tempfile::tempdir().unwrap();
    let (_server, base) = serve(dir.path());
    let http = reqwest::Client::new();

    // The page and its assets: embedded, cached by hash, under a strict CSP;
    // the API's answer for an unknown route is unchanged.
    let page = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let h = page.headers().clone();
    assert_eq!(h["cache-control"], "no-cache");
    let csp = h["content-security-policy"].to_str().unwrap().to_owned();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    let html = page.text().await.unwrap();
    let js = html
        .split('"')
        .find(|s| s.starts_with("/ui/app.") && s.ends_with(".js"))
        .expect("the page names its script by hash")
        .to_owned();
    let asset = http.get(format!("{base}{js}")).send().await.unwrap();
    assert_eq!(asset.status(), 200);
    assert_eq!(
        asset.headers()["cache-control"],
        "public, max-age=31536000, immutable"
    );
    assert!(asset.text().await.unwrap().contains("sessionStorage"));
    let stale = http
        .get(format!("{base}/ui/app.000000.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 404);
    let unknown = http.get(format!("{base}/v1/nothing")).send().await.unwrap();
    assert_eq!(unknown.status(), 404);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["code"], "route_not_found");

    // An org and its token, with the admin token.
    let org: Value = http
        .post(format!("{base}/v1/orgs"))
        .bearer_auth(ADMIN)
        .json(&json!({ "name": "dash" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = org["token"].as_str().unwrap().to_owned();

    let (_driver, driver_url) = chromedriver(&driver, dir.path()).await;
    let profile = dir.path().join("chromium-profile");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium.to_string_lossy(),
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,800", "--hide-scrollbars",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver_url)
        .await
        .unwrap();

    c.goto(&format!("{base}/")).await.unwrap();
    viewport(&c, 1280, 800).await;

    // Log in: a wrong token is refused with the API's words; the right one
    // is kept in the tab's session storage, never in the URL.
    until(
        &c,
        "the login form",
        "return !!document.getElementById('token')",
    )
    .await;
    fill(&c, "#token", "berth_not-a-token").await;
    click(&c, "#login-submit").await;
    let refused = until(
        &c,
        "the login error",
        "const e = document.getElementById('login-error'); return e && !e.hidden && e.textContent",
    )
    .await;
    assert!(
        refused.as_str().unwrap().contains("invalid_token"),
        "{refused}"
    );
    fill(&c, "#token", &token).await;
    click(&c, "#login-submit").await;
    until(
        &c,
        "the create form",
        "return !!document.getElementById('create-form')",
    )
    .await;
    let kept = c
        .execute("return sessionStorage.getItem('berth.token')", vec![])
        .await
        .unwrap();
    assert_eq!(kept, json!(token));
    assert!(!c.current_url().await.unwrap().as_str().contains(&token));
    until(
        &c,
        "the event stream",
        "return document.getElementById('conn').textContent === 'Live'",
    )
    .await;
    // Set once: still there at the end means the page never reloaded.
    c.execute("window.__berthNoReload = 42; return null", vec![])
        .await
        .unwrap();

    // The API's validation message shows next to its field.
    fill(&c, "#f-name", "Not_A_Name").await;
    fill(&c, "#f-image", "busybox").await;
    click(&c, "#create-submit").await;
    let msg = until(
        &c,
        "the name's validation message",
        "const e = document.getElementById('err-name'); return e && !e.hidden && e.textContent",
    )
    .await;
    assert!(msg.as_str().unwrap().contains("a-z0-9"), "{msg}");
    let invalid = c
        .find(Locator::Css("#f-name"))
        .await
        .unwrap()
        .attr("aria-invalid")
        .await
        .unwrap();
    assert_eq!(invalid.as_deref(), Some("true"));

    // Markup in what the API echoes back stays text.
    fill(&c, "#f-name", "inject").await;
    fill(&c, "#f-image", "x<img src=x id=pwned>").await;
    click(&c, "#create-submit").await;
    let msg = until(
        &c,
        "the image's validation message",
        "const e = document.getElementById('err-image'); return e && !e.hidden && e.textContent",
    )
    .await;
    assert!(msg.as_str().unwrap().contains("<img"), "{msg}");
    let pwned = c
        .execute("return !!document.getElementById('pwned')", vec![])
        .await
        .unwrap();
    assert_eq!(pwned, json!(false));

    // Create from the page; the row turns running from the event stream.
    fill(&c, "#f-name", "web-1").await;
    fill(&c, "#f-image", "busybox").await;
    fill(&c, "#f-env", "GREETING=<b>hello</b>\nMODE=demo").await;
    fill(&c, "#f-cmd", "sleep 3600").await;
    c.find(Locator::Css("#f-restart"))
        .await
        .unwrap()
        .select_by_value("on-failure")
        .await
        .unwrap();
    click(&c, "#create-submit").await;
    until(
        &c,
        "web-1 to run",
        "const r = document.querySelector('tr[data-name=\"web-1\"]'); \
         return r && r.querySelector('.badge').textContent === 'running'",
    )
    .await;
    // And one that fails for good: its image is on no host (a permanent
    // fault of the simulated engine), so its step is dead-lettered.
    fill(&c, "#f-name", "broken").await;
    fill(&c, "#f-image", "missing/base").await;
    click(&c, "#create-submit").await;
    until(
        &c,
        "broken to fail",
        "const r = document.querySelector('tr[data-name=\"broken\"]'); \
         return r && r.querySelector('.badge').textContent === 'failed' \
           && r.querySelector('.step').textContent.includes('image_not_found')",
    )
    .await;
    let same_page = c
        .execute("return window.__berthNoReload", vec![])
        .await
        .unwrap();
    assert_eq!(same_page, json!(42), "the page was reloaded");
    let (w, ok) = fits(&c).await;
    assert_eq!(w, 1280);
    assert!(ok, "the list scrolls sideways at 1280 px");
    let desktop = screenshot(&c, "dashboard-desktop.png").await;

    // The running instance's page: details, conditions, logs, waterfall
    // with a row per step.
    click(&c, "tr[data-name=\"web-1\"] a").await;
    let steps = until(
        &c,
        "the waterfall of web-1",
        "const rows = [...document.querySelectorAll('svg#waterfall g.wf-row[data-kind=attempt]')]; \
         const steps = rows.map(r => r.dataset.step); \
         return steps.includes('instance.finish') && steps",
    )
    .await;
    for step in [
        "host.ensure",
        "network.ensure",
        "image.build",
        "container.start",
        "network.attach",
        "instance.finish",
    ] {
        assert!(
            steps.as_array().unwrap().iter().any(|s| s == step),
            "no waterfall row for {step}: {steps}"
        );
    }
    let facts = c
        .find(Locator::Css("#instance-facts"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(facts.contains("GREETING=***"), "{facts}");
    assert!(!facts.contains("hello"), "env values are masked: {facts}");
    until(
        &c,
        "web-1's conditions",
        "return document.querySelectorAll('#conditions tr[data-condition]').length >= 5",
    )
    .await;
    until(
        &c,
        "web-1's logs",
        "const t = document.getElementById('logs').textContent; return t.length > 0 && t",
    )
    .await;
    show_flow(&c).await;
    let waterfall_desktop = screenshot(&c, "dashboard-waterfall-desktop.png").await;

    // The failed instance: its error, a failed attempt in red with its
    // error, and the compensation under the failure.
    c.goto(&format!("{base}/#/")).await.unwrap();
    until(
        &c,
        "the list",
        "return !!document.querySelector('tr[data-name=\"broken\"] a')",
    )
    .await;
    click(&c, "tr[data-name=\"broken\"] a").await;
    let failed = until(
        &c,
        "the failed attempt of broken",
        "const r = document.querySelector('svg#waterfall g.wf-row[data-step=\"image.build\"][data-outcome=fatal]'); \
         return r && r.querySelector('text.err') && r.querySelector('text.err').textContent",
    )
    .await;
    assert!(
        failed.as_str().unwrap().contains("image_not_found"),
        "{failed}"
    );
    let comp = c
        .execute(
            "return document.querySelectorAll('svg#waterfall g.wf-row[data-compensation=true][data-kind=attempt]').length",
            vec![],
        )
        .await
        .unwrap();
    assert!(comp.as_u64().unwrap() >= 1, "no compensation row");
    // Nested under the failure that caused it: the row right after it.
    let nested = c
        .execute(
            "const rows = [...document.querySelectorAll('svg#waterfall g.wf-row')]; \
             const f = rows.findIndex(r => r.dataset.outcome === 'fatal'); \
             const k = rows.findIndex(r => r.dataset.compensation === 'true'); \
             return [f, k, rows[k].dataset.step]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        nested[1].as_i64().unwrap(),
        nested[0].as_i64().unwrap() + 1,
        "{nested}"
    );
    assert_eq!(nested[2], "compensate.image", "{nested}");
    let error = c
        .find(Locator::Css("#instance-error"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        error.contains("image_not_found") && error.contains("image.build"),
        "{error}"
    );
    show_flow(&c).await;
    let failed_desktop = screenshot(&c, "dashboard-failed-desktop.png").await;

    // Dead letters: the failed step, re-driven from the page.
    click(&c, "#nav-dead").await;
    until(
        &c,
        "the dead letter of image.build",
        "return !!document.querySelector('tr[data-worker=\"image.build\"] button[data-redrive]')",
    )
    .await;
    click(&c, "tr[data-worker=\"image.build\"] button[data-redrive]").await;
    until(
        &c,
        "the re-drive",
        "const r = document.querySelector('tr[data-worker=\"image.build\"] td.redrive'); \
         return r && r.textContent.includes('re-driven (round 1)')",
    )
    .await;
    let all: Value = http
        .get(format!("{base}/v1/dead-letters?all=true"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        all["dead_letters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["worker"] == "image.build" && !d["redriven_at"].is_null()),
        "{all}"
    );

    // The re-driven step's new round is a row of its own in the failed
    // instance's waterfall, its long wait (until the re-drive) drawn apart
    // from its run. (It finds its instance failed and does nothing, so it
    // succeeds.)
    let list: Value = http
        .get(format!("{base}/v1/instances"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let broken = list["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "broken")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    c.goto(&format!("{base}/#/instances/{broken}"))
        .await
        .unwrap();
    until(
        &c,
        "the re-driven round in the waterfall",
        "const r = document.querySelector('svg#waterfall g.wf-row[data-step=\"image.build\"][data-round=\"1\"]'); \
         return r && !!r.querySelector('rect.bar-wait') && !!r.querySelector('rect.bar-run')",
    )
    .await;

    // A phone's width: the list and the waterfall fit without scrolling
    // sideways.
    viewport(&c, 390, 844).await;
    c.goto(&format!("{base}/#/")).await.unwrap();
    until(
        &c,
        "the list at 390 px",
        "const r = document.querySelector('tr[data-name=\"web-1\"]'); return r && r.dataset.status === 'running'",
    )
    .await;
    let (w, ok) = fits(&c).await;
    assert_eq!(w, 390, "the window could not be made 390 px wide");
    assert!(ok, "the list scrolls sideways at 390 px");
    let phone = screenshot(&c, "dashboard-phone.png").await;
    click(&c, "tr[data-name=\"web-1\"] a").await;
    until(
        &c,
        "the waterfall at 390 px",
        "return document.querySelectorAll('svg#waterfall g.wf-row[data-kind=attempt]').length >= 6",
    )
    .await;
    let (_, ok) = fits(&c).await;
    assert!(ok, "the instance page scrolls sideways at 390 px");
    show_flow(&c).await;
    let waterfall_phone = screenshot(&c, "dashboard-waterfall-phone.png").await;

    // The actions, by keyboard-reachable buttons; the status follows live.
    click(&c, "button[data-action=stop]").await;
    until(
        &c,
        "web-1 to stop",
        "const b = document.querySelector('#instance-status .badge'); return b && b.textContent === 'stopped'",
    )
    .await;
    let delete = c
        .find(Locator::Css("button[data-action=delete]"))
        .await
        .unwrap();
    delete.click().await.unwrap();
    assert_eq!(delete.text().await.unwrap(), "Confirm delete");
    delete.click().await.unwrap();
    until(
        &c,
        "web-1 to be deleted",
        "const b = document.querySelector('#instance-status .badge'); return b && b.textContent === 'deleted'",
    )
    .await;
    let same_page = c
        .execute("return window.__berthNoReload", vec![])
        .await
        .unwrap();
    assert_eq!(same_page, json!(42), "the page was reloaded");

    for p in [
        desktop,
        waterfall_desktop,
        failed_desktop,
        phone,
        waterfall_phone,
    ] {
        assert!(
            std::fs::metadata(&p).unwrap().len() > 1000,
            "{}",
            p.display()
        );
    }
    c.close().await.unwrap();
}
