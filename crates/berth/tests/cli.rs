//! The `berth` CLI end to end: the real binary (`CARGO_BIN_EXE_berth`) as a
//! child process against a real server listening on TCP — the application
//! `berth serve` runs, on the simulated engine behind the test kit's fault
//! wrapper, so a test can make a step fail or retry. Every read command's
//! `--output json` parses; names and ids both work; another org's token
//! and names get nothing. One test runs on the real Docker engine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use std::process::Stdio;

use api_support::{ADMIN, CONFIG, DEADLINE, TestApp, spawn_faulty};
use berth_runtime::faulty::{FaultKind, Op};
use serde_json::Value;

/// What one run of the binary did.
#[derive(Debug)]
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    #[track_caller]
    fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "{self:#?}");
        &self.stdout
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(self.ok())
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:#?}"))
    }

    /// Asserts exit 1 and the API's code on stderr.
    #[track_caller]
    fn failed(&self, code: &str) -> &str {
        assert_eq!(self.code, 1, "{self:#?}");
        assert!(
            self.stderr.contains(&format!("error: {code}: ")),
            "no `{code}` in {self:#?}"
        );
        &self.stderr
    }
}

/// A user's shell: the server's URL and a home of its own (where `berth
/// login` writes).
struct Shell {
    url: String,
    home: tempfile::TempDir,
}

impl Shell {
    fn new(t: &TestApp) -> Shell {
        Shell {
            url: t.base.clone(),
            home: tempfile::tempdir().unwrap(),
        }
    }

    fn command(&self, token: Option<&str>, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_berth"));
        c.args(args)
            .env("BERTH_URL", &self.url)
            .env("XDG_CONFIG_HOME", self.home.path())
            .env("HOME", self.home.path())
            .env_remove("BERTH_TOKEN")
            .env_remove("BERTH_CONFIG")
            .env_remove("NO_COLOR")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(t) = token {
            c.env("BERTH_TOKEN", t);
        }
        c
    }

    async fn berth(&self, token: Option<&str>, args: &[&str]) -> Ran {
        let mut c = self.command(token, args);
        c.stdin(Stdio::null());
        finish(c).await
    }
}

async fn finish(mut c: tokio::process::Command) -> Ran {
    let out = tokio::time::timeout(DEADLINE, c.output())
        .await
        .expect("berth did not finish before the deadline")
        .unwrap();
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// An org made with `berth org create`; its token.
async fn org(sh: &Shell, name: &str) -> String {
    let v = sh
        .berth(Some(ADMIN), &["org", "create", name, "--output", "json"])
        .await
        .json();
    assert_eq!(v["name"], name);
    v["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn run_ends_running_and_every_read_command_works_by_name_and_id() {
    let (t, _faulty) = spawn_faulty(CONFIG).await;
    let sh = Shell::new(&t);
    let tok = org(&sh, "acme").await;
    let tok = Some(tok.as_str());

    let ran = sh
        .berth(
            tok,
            &[
                "run",
                "busybox",
                "--name",
                "web",
                "-e",
                "GREETING=hi",
                "--restart",
                "always",
            ],
        )
        .await;
    let out = ran.ok();
    for step in [
        "host.ensure",
        "network.ensure",
        "image.build",
        "container.start",
        "network.attach",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with("✓ ") && l.contains(step)),
            "no finished line for {step}:\n{out}"
        );
    }
    let last = out.lines().last().unwrap();
    assert!(last.starts_with("running web  ip "), "{out}");
    assert!(!out.contains('\x1b'), "colour without a terminal:\n{out}");

    let inst = sh
        .berth(tok, &["inspect", "web", "-o", "json"])
        .await
        .json();
    let id = inst["id"].as_str().unwrap().to_owned();
    assert_eq!(inst["status"], "running");
    assert_eq!(inst["env"]["GREETING"], "***");
    assert_eq!(inst["restart"], "always");
    let by_id = sh
        .berth(tok, &["inspect", &id, "--output", "json"])
        .await
        .json();
    assert_eq!(by_id["id"], id.as_str());
    let text = sh.berth(tok, &["inspect", &id]).await;
    assert!(text.ok().contains("status:     running"), "{text:#?}");

    let ps = sh.berth(tok, &["ps", "-o", "json"]).await.json();
    let names: Vec<&str> = ps["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web"]);
    let table = sh.berth(tok, &["ps"]).await;
    let table = table.ok();
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains(&id) && table.contains("running"), "{table}");
    let none = sh
        .berth(tok, &["ps", "--status", "retrying", "-o", "json"])
        .await
        .json();
    assert_eq!(none["instances"].as_array().unwrap().len(), 0);
    sh.berth(tok, &["ps", "--status", "sleeping"])
        .await
        .failed("invalid_value");

    // The trace: one row per event and one per attempt.
    let flow = sh.berth(tok, &["trace", "web", "-o", "json"]).await.json();
    let mut attempts = 0;
    let mut events = 0;
    fn count(e: &Value, events: &mut usize, attempts: &mut usize) {
        *events += 1;
        *attempts += e["attempts"].as_array().unwrap().len();
        for c in e["children"].as_array().unwrap() {
            count(c, events, attempts);
        }
    }
    for e in flow["events"].as_array().unwrap() {
        count(e, &mut events, &mut attempts);
    }
    let drawn = sh.berth(tok, &["trace", "web"]).await;
    let drawn = drawn.ok();
    let attempt_rows = drawn
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|c| c.starts_with('#'))
        })
        .count();
    assert_eq!(attempt_rows, attempts, "{drawn}");
    assert_eq!(drawn.lines().count(), 2 + events + attempts, "{drawn}");
    assert!(
        drawn.contains("instance.requested") && drawn.contains('█'),
        "{drawn}"
    );
    let by_flow = sh
        .berth(tok, &["trace", inst["flow_id"].as_str().unwrap()])
        .await;
    assert_eq!(by_flow.ok(), drawn);

    sh.berth(tok, &["wait", "web", "--state", "running", "-o", "json"])
        .await
        .json();
    sh.berth(tok, &["logs", "web", "--tail", "10"]).await.ok();
    let logs = sh.berth(tok, &["logs", &id, "-o", "json"]).await.json();
    assert_eq!(logs["name"], "web");
    assert!(logs["lines"].is_array(), "{logs}");
    let evs = sh.berth(tok, &["events", "-o", "json"]).await.json();
    let evs = evs["events"].as_array().unwrap();
    assert!(
        evs.iter()
            .any(|m| m["status"] == "running" && m["instance_id"] == id.as_str()),
        "{evs:#?}"
    );
    let made = sh
        .berth(tok, &["token", "create", "-o", "json"])
        .await
        .json();
    let second = made["token"].as_str().unwrap();
    let listed = sh.berth(tok, &["token", "ls", "-o", "json"]).await.json();
    assert_eq!(listed["tokens"].as_array().unwrap().len(), 2, "{listed}");
    sh.berth(Some(second), &["ps"]).await.ok();
    sh.berth(tok, &["token", "rm", made["id"].as_str().unwrap()])
        .await
        .ok();
    sh.berth(Some(second), &["ps"])
        .await
        .failed("invalid_token");
    let dl = sh
        .berth(tok, &["dead-letters", "ls", "-o", "json"])
        .await
        .json();
    assert!(dl["dead_letters"].as_array().is_some());

    let stopped = sh.berth(tok, &["stop", "web", "-o", "json"]).await.json();
    assert_eq!(stopped["status"], "stopped", "{stopped}");
    let started = sh.berth(tok, &["start", &id]).await;
    assert!(started.ok().contains("web is running"), "{started:#?}");
    sh.berth(tok, &["restart", "web"]).await.ok();

    let rm = sh.berth(tok, &["rm", "web"]).await;
    assert!(rm.ok().contains(&format!("deleted web ({id})")), "{rm:#?}");
    let ps = sh.berth(tok, &["ps", "-o", "json"]).await.json();
    assert_eq!(ps["instances"].as_array().unwrap().len(), 0);
    let all = sh.berth(tok, &["ps", "--all", "-o", "json"]).await.json();
    assert_eq!(all["instances"][0]["status"], "deleted");
    sh.berth(tok, &["rm", "nothing-here"])
        .await
        .failed("not_found");
    t.shutdown().await;
}

#[tokio::test]
async fn a_retry_shows_as_a_line_and_a_failure_prints_its_code_and_step() {
    let (t, faulty) = spawn_faulty(CONFIG).await;
    let sh = Shell::new(&t);
    let tok = org(&sh, "acme").await;
    let tok = Some(tok.as_str());

    faulty.fail_next(Op::ConnectNetwork, 1, FaultKind::Transient);
    let ran = sh.berth(tok, &["run", "busybox", "--name", "flaky"]).await;
    let out = ran.ok();
    let retry = out
        .lines()
        .find(|l| l.contains("network.attach: ") && l.contains(" — retry 2/3 in "))
        .unwrap_or_else(|| panic!("no retry line:\n{out}"));
    assert!(retry.starts_with("↻ "), "{retry}");
    assert_eq!(
        out.lines().filter(|l| l.contains("retry 2/3")).count(),
        1,
        "the retry is shown once:\n{out}"
    );
    assert!(
        out.lines().last().unwrap().starts_with("running flaky"),
        "{out}"
    );
    // The waterfall shows both attempts of the attach, the failed one with
    // its error.
    let drawn = sh.berth(tok, &["trace", "flaky"]).await;
    let drawn = drawn.ok();
    let attach: Vec<&str> = drawn
        .lines()
        .filter(|l| l.trim_start().starts_with("network.attach "))
        .collect();
    assert_eq!(attach.len(), 2, "{drawn}");
    assert!(attach[0].contains("engine_unavailable"), "{drawn}");

    // A permanent failure of the attach: the flow fails at that step.
    faulty.fail_next(Op::ConnectNetwork, 1, FaultKind::Permanent);
    let ran = sh.berth(tok, &["run", "busybox", "--name", "doomed"]).await;
    let inst = sh
        .berth(tok, &["inspect", "doomed", "-o", "json"])
        .await
        .json();
    assert_eq!(inst["status"], "failed");
    let code = inst["error"]["code"].as_str().unwrap();
    let err = ran.failed(code);
    assert!(err.contains("(step network.attach)"), "{ran:#?}");
    assert!(
        ran.stdout
            .lines()
            .any(|l| l.starts_with("✗ network.attach")),
        "{ran:#?}"
    );

    // An image the engine does not have fails at the image step.
    let ran = sh
        .berth(tok, &["run", "no-such-image:1", "--name", "ghost"])
        .await;
    assert!(
        ran.failed("image_not_found").contains("(step image.build)"),
        "{ran:#?}"
    );

    // Its failed step is a dead letter of the org, re-drivable once.
    let dl = sh
        .berth(tok, &["dead-letters", "ls", "-o", "json"])
        .await
        .json();
    let dead = dl["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["worker"] == "image.build")
        .unwrap_or_else(|| panic!("no dead letter of image.build: {dl}"))
        .clone();
    let listed = sh.berth(tok, &["dead-letters", "ls"]).await;
    assert!(listed.ok().contains("image_not_found"), "{listed:#?}");
    let dead_id = dead["id"].as_str().unwrap();
    let again = sh.berth(tok, &["dead-letters", "redrive", dead_id]).await;
    assert!(again.ok().starts_with("re-driven: "), "{again:#?}");
    sh.berth(tok, &["dead-letters", "redrive", dead_id])
        .await
        .failed("already_redriven");

    // --detach prints the id at once.
    let ran = sh
        .berth(tok, &["run", "busybox", "--name", "bg", "--detach"])
        .await;
    let id = ran.ok().trim().to_owned();
    let waited = sh
        .berth(
            tok,
            &["wait", &id, "--state", "running", "--timeout", "20s"],
        )
        .await;
    assert!(waited.ok().contains("bg is running"), "{waited:#?}");
    t.shutdown().await;
}

#[tokio::test]
async fn an_attacker_gets_nothing_without_a_token_or_with_another_orgs() {
    let (t, _faulty) = spawn_faulty(CONFIG).await;
    let sh = Shell::new(&t);
    let a = org(&sh, "acme").await;
    let b = org(&sh, "other").await;
    sh.berth(Some(&a), &["run", "busybox", "--name", "web"])
        .await
        .ok();
    let inst = sh
        .berth(Some(&a), &["inspect", "web", "-o", "json"])
        .await
        .json();
    let id = inst["id"].as_str().unwrap();
    let flow = inst["flow_id"].as_str().unwrap();

    sh.berth(None, &["ps"]).await.failed("missing_token");
    sh.berth(Some("berth_not-a-real-token"), &["ps"])
        .await
        .failed("invalid_token");
    // The admin token creates orgs and reads nothing.
    sh.berth(Some(ADMIN), &["ps"])
        .await
        .failed("org_token_required");
    for x in ["web", id] {
        for args in [
            vec!["inspect", x],
            vec!["logs", x],
            vec!["stop", x],
            vec!["rm", x],
            vec!["wait", x],
        ] {
            sh.berth(Some(&b), &args).await.failed("not_found");
        }
    }
    sh.berth(Some(&b), &["trace", flow])
        .await
        .failed("not_found");
    sh.berth(Some(&b), &["trace", "web"])
        .await
        .failed("not_found");
    let theirs = sh.berth(Some(&b), &["ps", "-o", "json"]).await.json();
    assert_eq!(theirs["instances"].as_array().unwrap().len(), 0);
    sh.berth(Some(&b), &["org", "create", "mine"])
        .await
        .failed("admin_token_required");
    // Still there and running for its org.
    let still = sh
        .berth(Some(&a), &["inspect", id, "-o", "json"])
        .await
        .json();
    assert_eq!(still["status"], "running");
    t.shutdown().await;
}

#[tokio::test]
async fn login_saves_the_token_owner_only_and_usage_errors_exit_2() {
    use std::os::unix::fs::PermissionsExt;
    let (t, _faulty) = spawn_faulty(CONFIG).await;
    let sh = Shell::new(&t);
    let tok = org(&sh, "acme").await;

    let mut c = sh.command(None, &["login", "--url", &t.base]);
    c.stdin(Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(format!("{tok}\n").as_bytes())
            .await
            .unwrap();
    }
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let file = sh.home.path().join("berth/config.toml");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{file:?}");
    let saved = std::fs::read_to_string(&file).unwrap();
    assert!(saved.contains(&tok), "{saved}");
    // Without BERTH_TOKEN, the saved token is used.
    let ps = sh.berth(None, &["ps", "-o", "json"]).await.json();
    assert!(ps["instances"].as_array().unwrap().is_empty());

    // A wrong token is not saved.
    let mut c = sh.command(None, &["login"]);
    c.stdin(Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"berth_wrong\n").await.unwrap();
    }
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), saved);
    // A damaged file is named; the environment alone still works.
    std::fs::write(&file, "url = [").unwrap();
    let ran = sh.berth(None, &["ps"]).await;
    assert!(
        ran.failed("config_unreadable").contains("berth login"),
        "{ran:#?}"
    );
    sh.berth(Some(&tok), &["ps"]).await.ok();

    for args in [
        vec!["run", "busybox"],
        vec!["run", "busybox", "--name", "x", "-e", "NOVALUE"],
        vec!["run", "busybox", "--name", "x", "--restart", "sometimes"],
        vec!["wait", "x", "--timeout", "soon"],
        vec!["frobnicate"],
    ] {
        let ran = sh.berth(None, &args).await;
        assert_eq!(ran.code, 2, "{args:?}: {ran:#?}");
    }
    // The server's own commands still parse.
    let help = sh.berth(None, &["admin", "--help"]).await;
    assert!(help.ok().contains("database directly"), "{help:#?}");
    for shell in ["bash", "zsh", "fish"] {
        let comp = sh.berth(None, &["completion", shell]).await;
        assert!(comp.ok().contains("dead-letters"), "{shell}: {comp:#?}");
    }
    // The server's configuration, read here without a server.
    let file = sh.home.path().join("berth.toml");
    std::fs::write(&file, "[workers.\"image.build\"]\nmax_attempts = 7\n").unwrap();
    let file = file.to_str().unwrap();
    let check = sh.berth(None, &["config", "check", "--config", file]).await;
    assert!(check.ok().contains(": ok"), "{check:#?}");
    let dump = sh
        .berth(None, &["config", "dump", "--config", file, "-o", "json"])
        .await
        .json();
    assert!(dump.get("workers").is_some(), "{dump}");
    let policies = sh
        .berth(
            None,
            &["config", "policies", "--config", file, "-o", "json"],
        )
        .await
        .json();
    let build = policies
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["worker"] == "image.build")
        .unwrap();
    assert_eq!(build["worst_case_attempts"], 7);
    let bad = sh.home.path().join("bad.toml");
    std::fs::write(&bad, "[workers.default]\nmax_attempts = \"many\"\n").unwrap();
    let ran = sh
        .berth(
            None,
            &["config", "check", "--config", bad.to_str().unwrap()],
        )
        .await;
    assert_eq!(ran.code, 1, "{ran:#?}");
    assert!(ran.stderr.contains("max_attempts"), "{ran:#?}");
    // The offline commands need the server's database, and say so.
    let empty = sh.home.path().join("no-data");
    let ran = sh
        .berth(
            None,
            &[
                "admin",
                "dead-letters",
                "--data-dir",
                empty.to_str().unwrap(),
            ],
        )
        .await;
    assert_eq!(ran.code, 1, "{ran:#?}");
    assert!(ran.stderr.contains("no database at"), "{ran:#?}");
    // A bad name is the API's to refuse, with its code and field rule.
    let ran = sh
        .berth(Some(&tok), &["run", "busybox", "--name", "Not_Valid"])
        .await;
    ran.failed("invalid_value");
    t.shutdown().await;
}

#[tokio::test]
async fn on_docker_run_of_a_missing_image_exits_1_with_image_not_found() {
    let Some(docker) = api_support::docker_engine().await else {
        return;
    };
    let t = api_support::spawn_with(&api_support::docker_config(), Vec::new()).await;
    let sh = Shell::new(&t);
    let tok = org(&sh, "acme").await;
    let ran = sh
        .berth(
            Some(&tok),
            &["run", "berth-no-such-image:never", "--name", "ghost"],
        )
        .await;
    ran.failed("image_not_found");
    assert!(ran.stderr.contains("(step image.build)"), "{ran:#?}");
    let install = format!("berth.install={}", t.app.store.install_id());
    t.shutdown().await;
    api_support::sweep_label(&docker, &install).await;
}

#[tokio::test]
async fn ctrl_c_detaches_run_and_the_flow_goes_on() {
    use tokio::io::AsyncBufReadExt;
    let (t, faulty) = spawn_faulty(&api_support::slow_host()).await;
    let sh = Shell::new(&t);
    let tok = org(&sh, "acme").await;
    faulty.fail_next(Op::Ping, 1, FaultKind::Transient);
    let mut c = sh.command(Some(&tok), &["run", "busybox", "--name", "slow"]);
    c.stdin(Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // Read until the retry is shown: the run is then waiting on the
    // back-off.
    let mut seen = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while let Some(l) = lines.next_line().await.unwrap() {
            let retry = l.contains("host.ensure: ") && l.contains("retry 2/20 in ");
            seen.push(l);
            if retry {
                return;
            }
        }
        panic!("stdout ended without a retry line: {seen:#?}");
    })
    .await
    .expect("no retry line before the deadline");
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("berth wait slow --state running"),
        "{stderr}"
    );
    // Not cancelled: still in its flow, backing off, and listed so.
    let inst = sh
        .berth(Some(&tok), &["inspect", "slow", "-o", "json"])
        .await
        .json();
    assert_eq!(inst["status"], "requested", "{inst}");
    assert_eq!(inst["progress"]["step"], "host.ensure", "{inst}");
    let ps = sh.berth(Some(&tok), &["ps", "--status", "retrying"]).await;
    let ps = ps.ok();
    assert!(
        ps.contains("slow") && ps.contains("host.ensure") && ps.contains("2/20"),
        "{ps}"
    );
    assert!(ps.contains("engine_unavailable"), "{ps}");
    t.shutdown().await;
}

/// Lines of a running `berth events -f -o json` until one satisfies `done`.
async fn follow_until(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    done: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let mut seen = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while let Some(l) = lines.next_line().await.unwrap() {
            let v: Value = serde_json::from_str(&l)
                .unwrap_or_else(|e| panic!("not one JSON document per line ({e}): {l}"));
            let stop = done(&v);
            seen.push(v);
            if stop {
                return;
            }
        }
        panic!("the stream ended: {seen:#?}");
    })
    .await
    .expect("nothing matched before the deadline");
    seen
}

#[tokio::test]
async fn events_follow_shows_the_orgs_own_events_only() {
    use tokio::io::AsyncBufReadExt;
    let (t, faulty) = spawn_faulty(CONFIG).await;
    let sh = Shell::new(&t);
    let a = org(&sh, "acme").await;
    let b = org(&sh, "other").await;
    let follow = |tok: &str| {
        let mut c = sh.command(Some(tok), &["events", "-f", "-o", "json"]);
        c.stdin(Stdio::null());
        let mut child = c.spawn().unwrap();
        let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        (child, lines)
    };
    let (mut child_a, mut lines_a) = follow(&a);
    let (mut child_b, mut lines_b) = follow(&b);
    faulty.fail_next(Op::ConnectNetwork, 1, FaultKind::Transient);
    sh.berth(Some(&a), &["run", "busybox", "--name", "web"])
        .await
        .ok();
    let ours = sh
        .berth(Some(&a), &["inspect", "web", "-o", "json"])
        .await
        .json();
    let id = ours["id"].as_str().unwrap().to_owned();
    let seen = follow_until(&mut lines_a, |m| {
        m["instance_id"] == id.as_str() && m["status"] == "running"
    })
    .await;
    assert!(
        seen.iter()
            .any(|m| m["kind"] == "retry" && m["step"] == "network.attach"),
        "{seen:#?}"
    );
    sh.berth(Some(&b), &["run", "busybox", "--name", "web"])
        .await
        .ok();
    let theirs = sh
        .berth(Some(&b), &["inspect", "web", "-o", "json"])
        .await
        .json();
    let bid = theirs["id"].as_str().unwrap().to_owned();
    let seen = follow_until(&mut lines_b, |m| {
        m["instance_id"] == bid.as_str() && m["status"] == "running"
    })
    .await;
    for m in &seen {
        assert_eq!(m["instance_id"], bid.as_str(), "org B saw {m}");
    }
    child_a.kill().await.unwrap();
    child_b.kill().await.unwrap();
    t.shutdown().await;
}

#[tokio::test]
async fn run_without_a_stream_still_ends_running() {
    let config = format!("{CONFIG}\n[api]\nmax_streams_per_org = 1\n");
    let (t, _faulty) = spawn_faulty(&config).await;
    let sh = Shell::new(&t);
    let tok = org(&sh, "acme").await;
    // The org's one stream is taken: `run` cannot open its own.
    let _held = t.ws(&tok, "").await;
    let ran = sh
        .berth(Some(&tok), &["run", "busybox", "--name", "web"])
        .await;
    let out = ran.ok();
    assert!(
        ran.stderr.contains("no live progress (too_many_requests"),
        "{ran:#?}"
    );
    assert!(
        out.lines().last().unwrap().starts_with("running web  ip "),
        "{out}"
    );
    assert!(out.contains("✓ network.attach"), "{out}");
    t.shutdown().await;
}
