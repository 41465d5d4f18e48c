//! The client commands of `berth` (login, org, token, run, ps, inspect,
//! logs, rm, stop/start/restart, wait, events, trace, dead-letters): each is
//! a client of the HTTP API, never of the database. `X` is an instance's
//! name or id everywhere; `--output json` prints one JSON document; errors
//! print the API's code and message. Exit codes: 0 done, 1 the operation
//! failed, 2 a usage error, 130 `run` detached on Ctrl-C.

pub mod client;
pub mod creds;
pub mod output;
pub mod run;
pub mod trace;

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use clap::Subcommand;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use client::{Api, enc, next_message};
use output::{Out, cut, s, table};

/// A command that did not do what it was asked: the API's code and
/// message (and step, for a flow's failure), or the CLI's own.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: String,
    pub message: String,
    pub step: Option<String>,
    /// The HTTP status, when the API answered.
    pub status: Option<u16>,
    /// The process's exit code.
    pub exit: u8,
}

impl Failure {
    /// A failure found by the CLI itself (exit 1).
    pub fn local(code: &str, message: impl Into<String>) -> Failure {
        Failure {
            code: code.to_owned(),
            message: message.into(),
            step: None,
            status: None,
            exit: 1,
        }
    }

    /// A command used wrongly (exit 2).
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            exit: 2,
            ..Failure::local("usage", message)
        }
    }

    /// An error answer of the API: `{"error": {"code", "message", "step"?}}`.
    pub fn from_answer(status: u16, json: &Value, text: &str) -> Failure {
        let e = &json["error"];
        let code = e["code"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("http_{status}"));
        let message = e["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| cut(text, 200));
        Failure {
            code,
            message,
            step: e["step"].as_str().map(str::to_owned),
            status: Some(status),
            exit: 1,
        }
    }

    /// Prints the failure on stderr (nothing for a detach, which said its
    /// piece).
    pub fn report(&self, color: bool) {
        if self.code == "detached" {
            return;
        }
        let head = if color {
            "\x1b[31merror\x1b[0m"
        } else {
            "error"
        };
        match &self.step {
            Some(step) => eprintln!("{head}: {}: {} (step {step})", self.code, self.message),
            None => eprintln!("{head}: {}: {}", self.code, self.message),
        }
    }
}

/// The commands that talk to a berth server.
#[derive(Debug, Subcommand)]
pub enum Client {
    /// Save the server's URL and a token for the other commands (in
    /// $XDG_CONFIG_HOME/berth/config.toml, mode 0600). The token is read
    /// from stdin, or asked for on a terminal. BERTH_URL and BERTH_TOKEN,
    /// when set, win over the saved ones.
    Login {
        /// The server (default: BERTH_URL, else http://127.0.0.1:7077).
        #[arg(long, value_name = "URL")]
        url: Option<String>,
    },
    /// Orgs (with the admin token).
    #[command(subcommand)]
    Org(OrgCmd),
    /// The org's tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Create an instance and follow its flow until it runs or fails.
    Run(run::RunArgs),
    /// List the org's instances: status, the step in progress, its attempt
    /// and last error.
    Ps {
        /// Deleted instances too.
        #[arg(long, short = 'a')]
        all: bool,
        /// Only those in this status, or `retrying` (a step backing off).
        #[arg(long, value_name = "STATUS")]
        status: Option<String>,
    },
    /// Show one instance.
    Inspect {
        /// Name or id.
        x: String,
    },
    /// Print an instance's output.
    Logs {
        /// Name or id.
        x: String,
        /// Keep printing new lines as they come.
        #[arg(long, short = 'f')]
        follow: bool,
        /// How many of the last lines to print first (at most 10000).
        #[arg(long, value_name = "N")]
        tail: Option<u32>,
    },
    /// Delete instances (waits until each is deleted).
    Rm {
        /// Names or ids.
        #[arg(required = true)]
        xs: Vec<String>,
    },
    /// Stop an instance (waits until it is stopped).
    Stop { x: String },
    /// Start a stopped or exited instance (waits until it runs).
    Start { x: String },
    /// Restart an instance (waits until it runs again).
    Restart { x: String },
    /// Wait until an instance is in a state.
    Wait {
        /// Name or id.
        x: String,
        /// running, stopped, exited, failed or deleted.
        #[arg(long, default_value = "running")]
        state: String,
        /// How long to wait, e.g. 30s, 5m, 1h.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Print the org's events (status changes, errors, retries). Without
    /// -f, those in the log so far, until the stream goes quiet for half a
    /// second; with -f, then every new one until Ctrl-C.
    Events {
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Draw a flow as a waterfall: an instance's latest flow (by name or
    /// id), or a flow by its id.
    Trace {
        /// Instance name or id, or flow id.
        x: String,
    },
    /// The org's dead letters.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLetterCmd),
}

#[derive(Debug, Subcommand)]
pub enum OrgCmd {
    /// Create an org and print its first token (shown only now).
    Create { name: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a token of the org (shown only now).
    Create,
    /// List the org's tokens (without their secrets).
    Ls,
    /// Revoke a token.
    Rm { id: String },
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterCmd {
    /// List dead letters, newest first.
    Ls {
        /// Those already re-driven too.
        #[arg(long, short = 'a')]
        all: bool,
    },
    /// Re-drive a dead letter: a new round of attempts.
    Redrive { id: String },
}

/// Runs a client command.
pub async fn main(cmd: Client, out: Out) -> Result<(), Failure> {
    if let Client::Login { url } = cmd {
        return login(url, out).await;
    }
    let api = Api::from_env()?;
    match cmd {
        Client::Login { .. } => Ok(()),
        Client::Org(OrgCmd::Create { name }) => {
            let v = api
                .call(
                    Method::POST,
                    "/v1/orgs",
                    Some(&json!({ "name": name })),
                    None,
                )
                .await?;
            if out.json {
                out.print_json(&v);
            } else {
                println!("created org {} (id {})", s(&v, "name"), s(&v, "id"));
                println!("its token (shown only now):\n\n    {}\n", s(&v, "token"));
                println!("log in with it: berth login --url {}", api.base);
            }
            Ok(())
        }
        Client::Token(t) => token(&api, out, t).await,
        Client::Run(args) => run::run(&api, out, args).await,
        Client::Ps { all, status } => ps(&api, out, all, status).await,
        Client::Inspect { x } => {
            let v = resolve(&api, &x).await?;
            if out.json {
                out.print_json(&v);
            } else {
                print_inspect(&v, &out);
            }
            Ok(())
        }
        Client::Logs { x, follow, tail } => logs(&api, out, &x, follow, tail).await,
        Client::Rm { xs } => {
            let mut failed = None;
            let mut done = Vec::new();
            for x in &xs {
                let r = async {
                    let inst = resolve(&api, x).await?;
                    let path =
                        format!("/v1/instances/{}?wait=true&timeout=2m", enc(s(&inst, "id")));
                    api.call(Method::DELETE, &path, None, Some(Duration::from_secs(150)))
                        .await?;
                    Ok::<_, Failure>(inst)
                }
                .await;
                match r {
                    Ok(inst) => {
                        if !out.json {
                            println!("deleted {} ({})", s(&inst, "name"), s(&inst, "id"));
                        }
                        done.push(json!({ "id": s(&inst, "id"), "name": s(&inst, "name") }));
                    }
                    Err(f) => {
                        // The others are still tried; the first failure is
                        // the command's.
                        eprintln!("{x}: {}: {}", f.code, f.message);
                        failed.get_or_insert(f);
                    }
                }
            }
            if out.json {
                out.print_json(&json!({ "deleted": done }));
            }
            match failed {
                Some(f) => Err(Failure {
                    code: f.code,
                    message: format!("not every instance was deleted ({})", f.message),
                    ..f
                }),
                None => Ok(()),
            }
        }
        Client::Stop { x } => act(&api, out, &x, "stop").await,
        Client::Start { x } => act(&api, out, &x, "start").await,
        Client::Restart { x } => act(&api, out, &x, "restart").await,
        Client::Wait { x, state, timeout } => wait(&api, out, &x, &state, timeout).await,
        Client::Events { follow } => events(&api, out, follow).await,
        Client::Trace { x } => {
            let flow = match resolve(&api, &x).await {
                Ok(inst) => s(&inst, "flow_id").to_owned(),
                // Not an instance of the org: maybe a flow id.
                Err(f) if f.code == "not_found" => x.clone(),
                Err(f) => return Err(f),
            };
            let v = api
                .get(&format!("/v1/flows/{}", enc(&flow)))
                .await
                .map_err(|f| {
                    if f.code == "not_found" {
                        Failure::local(
                            "not_found",
                            format!("no instance and no flow of this org is called {x:?}"),
                        )
                    } else {
                        f
                    }
                })?;
            if out.json {
                out.print_json(&v);
            } else {
                for line in trace::render(&v, &out) {
                    println!("{line}");
                }
            }
            Ok(())
        }
        Client::DeadLetters(DeadLetterCmd::Ls { all }) => {
            let v = api
                .get(&format!("/v1/dead-letters?all={all}&limit=1000"))
                .await?;
            if out.json {
                out.print_json(&v);
                return Ok(());
            }
            let list = v["dead_letters"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no dead letters");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|d| {
                    vec![
                        s(d, "id").to_owned(),
                        s(d, "worker").to_owned(),
                        d["attempts"].to_string(),
                        s(d, "reason").to_owned(),
                        if d["redriven_at"].is_null() {
                            "-".to_owned()
                        } else {
                            "yes".to_owned()
                        },
                        out.red(&cut(
                            &format!("{}: {}", s(&d["error"], "code"), s(&d["error"], "message")),
                            80,
                        )),
                    ]
                })
                .collect();
            table(
                &["ID", "STEP", "ATTEMPTS", "REASON", "REDRIVEN", "ERROR"],
                &rows,
            );
            Ok(())
        }
        Client::DeadLetters(DeadLetterCmd::Redrive { id }) => {
            let v = api
                .call(
                    Method::POST,
                    &format!("/v1/dead-letters/{}/redrive", enc(&id)),
                    None,
                    None,
                )
                .await?;
            if out.json {
                out.print_json(&v);
            } else {
                println!(
                    "re-driven: {} for step {} (round {}, flow {})",
                    s(&v, "event_id"),
                    s(&v, "worker"),
                    v["round"],
                    s(&v, "flow_id")
                );
            }
            Ok(())
        }
    }
}

/// An instance of the org by id, else by name (live ones first, then
/// deleted ones).
pub async fn resolve(api: &Api, x: &str) -> Result<Value, Failure> {
    match api.get(&format!("/v1/instances/{}", enc(x))).await {
        Ok(v) => return Ok(v),
        Err(f) if f.code == "not_found" => {}
        Err(f) => return Err(f),
    }
    let valid_name = berth_core::domain::InstanceName::parse(x).is_ok();
    if valid_name {
        for all in [false, true] {
            let v = api
                .get(&format!("/v1/instances?name={}&all={all}", enc(x)))
                .await?;
            // The newest of that name (a deleted one's name may be reused).
            if let Some(i) = v["instances"].as_array().and_then(|l| l.last()) {
                return api.get(&format!("/v1/instances/{}", enc(s(i, "id")))).await;
            }
        }
    }
    Err(Failure::local(
        "not_found",
        format!("no instance of this org has the name or id {x:?}"),
    ))
}

async fn login(url: Option<String>, out: Out) -> Result<(), Failure> {
    let url = url
        .or_else(|| std::env::var("BERTH_URL").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| client::DEFAULT_URL.to_owned());
    let token = read_token()?;
    let api = Api::new(&url, Some(token.clone()))?;
    // An org token lists its tokens; the admin token is told it is one.
    let kind = match api.get("/v1/tokens").await {
        Ok(_) => "an org token",
        Err(f) if f.code == "org_token_required" => "the admin token (it only creates orgs)",
        Err(f) => return Err(f),
    };
    let path = creds::Credentials {
        url: api.base.clone(),
        token: Some(token),
    }
    .save()?;
    if out.json {
        out.print_json(&json!({ "url": api.base, "config": path.display().to_string() }));
    } else {
        println!(
            "logged in to {} with {kind}; saved in {}",
            api.base,
            path.display()
        );
    }
    Ok(())
}

/// The token from stdin: a prompt without echo on a terminal, else the
/// first line.
fn read_token() -> Result<String, Failure> {
    let stdin = std::io::stdin();
    let mut line = String::new();
    if stdin.is_terminal() {
        eprint!("Token: ");
        let _ = std::io::stderr().flush();
        let echo = no_echo(&stdin);
        let r = stdin.lock().read_line(&mut line);
        if let Some(old) = echo {
            let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &old);
            eprintln!();
        }
        r.map_err(|e| Failure::local("no_token", format!("cannot read the token: {e}")))?;
    } else {
        stdin.lock().read_line(&mut line).map_err(|e| {
            Failure::local("no_token", format!("cannot read the token from stdin: {e}"))
        })?;
    }
    let token = line.trim().to_owned();
    if token.is_empty() {
        return Err(Failure::usage(
            "no token given: pipe it on stdin or type it at the prompt",
        ));
    }
    Ok(token)
}

/// Turns the terminal's echo off; the settings to put back.
fn no_echo(stdin: &std::io::Stdin) -> Option<rustix::termios::Termios> {
    use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
    let old = tcgetattr(stdin).ok()?;
    let mut t = old.clone();
    t.local_modes.remove(LocalModes::ECHO);
    tcsetattr(stdin, OptionalActions::Now, &t).ok()?;
    Some(old)
}

async fn token(api: &Api, out: Out, t: TokenCmd) -> Result<(), Failure> {
    match t {
        TokenCmd::Create => {
            let v = api.call(Method::POST, "/v1/tokens", None, None).await?;
            if out.json {
                out.print_json(&v);
            } else {
                println!(
                    "token {} (shown only now):\n\n    {}\n",
                    s(&v, "id"),
                    s(&v, "token")
                );
            }
        }
        TokenCmd::Ls => {
            let v = api.get("/v1/tokens").await?;
            if out.json {
                out.print_json(&v);
            } else {
                let rows: Vec<Vec<String>> = v["tokens"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        vec![
                            s(t, "id").to_owned(),
                            s(t, "created_at").to_owned(),
                            t["revoked_at"].as_str().unwrap_or("-").to_owned(),
                        ]
                    })
                    .collect();
                table(&["ID", "CREATED", "REVOKED"], &rows);
            }
        }
        TokenCmd::Rm { id } => {
            api.call(
                Method::DELETE,
                &format!("/v1/tokens/{}", enc(&id)),
                None,
                None,
            )
            .await?;
            if out.json {
                out.print_json(&json!({ "revoked": id }));
            } else {
                println!("revoked {id}");
            }
        }
    }
    Ok(())
}

async fn ps(api: &Api, out: Out, all: bool, status: Option<String>) -> Result<(), Failure> {
    let mut list: Vec<Value> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut q = format!("/v1/instances?limit=1000&all={all}");
        if let Some(st) = &status {
            q.push_str(&format!("&status={}", enc(st)));
        }
        if let Some(a) = &after {
            q.push_str(&format!("&after={}", enc(a)));
        }
        let v = api.get(&q).await?;
        list.extend(v["instances"].as_array().cloned().unwrap_or_default());
        match v["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => break,
        }
    }
    if out.json {
        out.print_json(&json!({ "instances": list }));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            let p = &i["progress"];
            let (step, attempt) = if p.is_null() {
                ("-".to_owned(), "-".to_owned())
            } else {
                (
                    s(p, "step").to_owned(),
                    format!("{}/{}", p["attempt"], p["max_attempts"]),
                )
            };
            let err = if !p.is_null() && !p["last_error"].is_null() {
                out.yellow(&cut(
                    &format!(
                        "{}: {}",
                        s(&p["last_error"], "code"),
                        s(&p["last_error"], "message")
                    ),
                    60,
                ))
            } else if !i["error"].is_null() {
                out.red(&cut(
                    &format!("{}: {}", s(&i["error"], "code"), s(&i["error"], "message")),
                    60,
                ))
            } else {
                String::new()
            };
            let st = s(i, "status");
            let st = match st {
                "running" => out.green(st),
                "failed" => out.red(st),
                _ => st.to_owned(),
            };
            vec![
                s(i, "name").to_owned(),
                s(i, "id").to_owned(),
                st,
                step,
                attempt,
                i["ip"].as_str().unwrap_or("-").to_owned(),
                err,
            ]
        })
        .collect();
    table(
        &["NAME", "ID", "STATUS", "STEP", "ATTEMPT", "IP", "ERROR"],
        &rows,
    );
    Ok(())
}

fn print_inspect(v: &Value, out: &Out) {
    let line = |k: &str, val: String| println!("{:<11} {val}", format!("{k}:"));
    line("name", s(v, "name").to_owned());
    line("id", s(v, "id").to_owned());
    line("status", s(v, "status").to_owned());
    if !s(v, "image").is_empty() {
        line("image", s(v, "image").to_owned());
    }
    if let Some(b) = v["build"].as_str() {
        line("build", b.to_owned());
    }
    line("ip", v["ip"].as_str().unwrap_or("-").to_owned());
    line("host", v["host"].as_str().unwrap_or("-").to_owned());
    line("restart", s(v, "restart").to_owned());
    line("restarts", v["restarts"].to_string());
    line("flow", s(v, "flow_id").to_owned());
    line("created", s(v, "created_at").to_owned());
    let p = &v["progress"];
    if !p.is_null() {
        line(
            "progress",
            format!(
                "{} attempt {}/{}",
                s(p, "step"),
                p["attempt"],
                p["max_attempts"]
            ),
        );
        if !p["last_error"].is_null() {
            line(
                "last error",
                out.yellow(&format!(
                    "{}: {}",
                    s(&p["last_error"], "code"),
                    s(&p["last_error"], "message")
                )),
            );
        }
    }
    if !v["error"].is_null() {
        let e = &v["error"];
        line(
            "error",
            out.red(&format!(
                "{}: {} (step {})",
                s(e, "code"),
                s(e, "message"),
                s(e, "step")
            )),
        );
    }
    if let Some(conds) = v["conditions"].as_array()
        && !conds.is_empty()
    {
        println!("conditions:");
        for c in conds {
            let mark = if c["status"].as_bool() == Some(true) {
                out.green("✓")
            } else {
                out.red("✗")
            };
            println!("  {mark} {:<18} {}", s(c, "type"), s(c, "message"));
        }
    }
}

/// The output, as it comes; with `--output json`, one document with the
/// lines (or, following, one JSON string per line).
async fn logs(
    api: &Api,
    out: Out,
    x: &str,
    follow: bool,
    tail: Option<u32>,
) -> Result<(), Failure> {
    let inst = resolve(api, x).await?;
    let mut path = format!("/v1/instances/{}/logs?follow={follow}", enc(s(&inst, "id")));
    if let Some(n) = tail {
        path.push_str(&format!("&tail={n}"));
    }
    let resp = api.stream(&path).await?;
    if out.json && !follow {
        let text = resp.text().await.map_err(|e| {
            Failure::local("stream_closed", format!("the logs were cut short: {e}"))
        })?;
        out.print_json(&json!({
            "id": s(&inst, "id"),
            "name": s(&inst, "name"),
            "lines": text.lines().collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    let mut body = resp.bytes_stream();
    // Following as JSON: whole lines only, each a JSON string.
    let mut partial: Vec<u8> = Vec::new();
    let mut stdout = std::io::stdout();
    loop {
        tokio::select! {
            chunk = body.next() => match chunk {
                Some(Ok(b)) => {
                    let bytes: Vec<u8> = if out.json {
                        partial.extend_from_slice(&b);
                        let Some(end) = partial.iter().rposition(|c| *c == b'\n') else {
                            continue;
                        };
                        let whole: Vec<u8> = partial.drain(..=end).collect();
                        String::from_utf8_lossy(&whole)
                            .lines()
                            .map(|l| format!("{}\n", Value::String(l.to_owned())))
                            .collect::<String>()
                            .into_bytes()
                    } else {
                        b.to_vec()
                    };
                    if stdout.write_all(&bytes).and_then(|()| stdout.flush()).is_err() {
                        // The reader went away (a closed pipe): done.
                        return Ok(());
                    }
                }
                Some(Err(e)) => {
                    return Err(Failure::local("stream_closed", format!("the logs were cut short: {e}")));
                }
                None => return Ok(()),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

async fn act(api: &Api, out: Out, x: &str, action: &str) -> Result<(), Failure> {
    let inst = resolve(api, x).await?;
    let path = format!(
        "/v1/instances/{}/{action}?wait=true&timeout=2m",
        enc(s(&inst, "id"))
    );
    let v = api
        .call(Method::POST, &path, None, Some(Duration::from_secs(150)))
        .await?;
    if out.json {
        out.print_json(&v);
    } else {
        println!("{} is {}", s(&inst, "name"), s(&v, "status"));
    }
    Ok(())
}

async fn wait(api: &Api, out: Out, x: &str, state: &str, timeout: Duration) -> Result<(), Failure> {
    let inst = resolve(api, x).await?;
    let id = s(&inst, "id").to_owned();
    let deadline = tokio::time::Instant::now() + timeout;
    // The server waits at most 5 minutes per request: longer waits are
    // several requests.
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let chunk = left
            .min(Duration::from_secs(300))
            .max(Duration::from_secs(1));
        let path = format!(
            "/v1/instances/{}/wait?state={}&timeout={}s",
            enc(&id),
            enc(state),
            chunk.as_secs()
        );
        match api
            .call(
                Method::GET,
                &path,
                None,
                Some(chunk + Duration::from_secs(30)),
            )
            .await
        {
            Ok(v) => {
                if out.json {
                    out.print_json(&v);
                } else {
                    println!("{} is {}", s(&v, "name"), s(&v, "status"));
                }
                return Ok(());
            }
            Err(f) if f.code == "wait_timeout" && left > chunk => continue,
            Err(f) => return Err(f),
        }
    }
}

async fn events(api: &Api, out: Out, follow: bool) -> Result<(), Failure> {
    let mut socket = api.events("from=start").await?;
    let mut all = Vec::new();
    let quiet = Duration::from_millis(500);
    loop {
        let next = async {
            if follow {
                Some(next_message(&mut socket).await)
            } else {
                tokio::time::timeout(quiet, next_message(&mut socket))
                    .await
                    .ok()
            }
        };
        let m = tokio::select! {
            m = next => m,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(Some(m)) = m else {
            break;
        };
        let m = m?;
        if out.json {
            if follow {
                // A stream has no end to close a document with: one JSON
                // document per line.
                println!("{m}");
            } else {
                all.push(m);
            }
            continue;
        }
        let what = match s(&m, "kind") {
            "status" => s(&m, "status").to_owned(),
            "retry" => format!(
                "{} attempt {}/{} failed: {} — retry at {}",
                s(&m, "step"),
                m["attempt"],
                m["max_attempts"],
                s(&m["error"], "message"),
                s(&m, "next_attempt_at")
            ),
            _ => format!(
                "{} {}: {}",
                s(&m["error"], "step"),
                s(&m["error"], "code"),
                s(&m["error"], "message")
            ),
        };
        println!(
            "{}  {:<7} {:<26} {:<28} {what}",
            s(&m, "at"),
            s(&m, "kind"),
            m["instance_id"].as_str().unwrap_or("-"),
            s(&m, "type"),
        );
    }
    if out.json && !follow {
        out.print_json(&json!({ "events": all }));
    }
    Ok(())
}
