//! The `berth` command: run the platform and inspect it.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use berth::{App, Config};
use berth_core::FlowId;
use berth_store::Redrive;
use clap::{CommandFactory, Parser, Subcommand};

use cli::output::{Format, Out};

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "Berth: a self-hosted container platform",
    after_help = "The client commands talk to a server at BERTH_URL (default http://127.0.0.1:7077) \
                  with BERTH_TOKEN, or with what `berth login` saved. Exit codes: 0 done, 1 the \
                  operation failed (the API's code and message are printed), 2 a usage error."
)]
struct Cli {
    /// Server configuration file (TOML; for serve, config and admin); see
    /// berth.example.toml for every key.
    #[arg(long, global = true, env = "BERTH_CONFIG")]
    config: Option<PathBuf>,
    /// Directory of the server's state (overrides `data_dir`; for serve and
    /// admin).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// `json`: one JSON document on stdout instead of text.
    #[arg(long, short = 'o', global = true, value_enum, default_value = "text")]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run Berth: the workers on the embedded bus and the HTTP API, until
    /// SIGINT or SIGTERM.
    Serve {
        /// Address of the HTTP API (overrides `listen`; default
        /// 127.0.0.1:7077).
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// Container runtime: docker or sim (overrides `runtime.kind`).
        #[arg(long, value_name = "docker|sim")]
        runtime: Option<berth::config::RuntimeKind>,
        /// What this process runs: all (default), api (the HTTP API only)
        /// or worker (workers, listeners and reconciler; no API). Overrides
        /// `role`.
        #[arg(long, value_name = "all|api|worker")]
        role: Option<berth::config::Role>,
        /// The database: a postgres:// URL (overrides `store.url`; default:
        /// SQLite in the data dir).
        #[arg(long, value_name = "URL")]
        store: Option<String>,
    },
    #[command(flatten)]
    Client(cli::Client),
    /// The server's configuration (defaults, file, environment, flags),
    /// read here without a server.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Offline commands for the operator: they read the server's database
    /// directly (on this machine, with its data dir), not the API.
    #[command(subcommand)]
    Admin(AdminCmd),
    /// Print a shell completion script: `berth completion bash > /etc/bash_completion.d/berth`.
    Completion { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Load the configuration and resolve every worker's policy; say what
    /// is wrong, if anything (exit 1).
    Check,
    /// Print the effective configuration as TOML.
    Dump,
    /// Print each worker's effective retry policy with its worst cases.
    Policies,
}

#[derive(Subcommand)]
enum AdminCmd {
    /// List dead letters of every org, newest first (reads the database).
    DeadLetters {
        /// Include those already re-driven.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Re-drive a dead letter of any org: a new round of attempts for the
    /// same worker (writes the database).
    Redrive { id: String },
    /// Print a flow: its events by causation, with every attempt (reads the
    /// database).
    Flow { flow_id: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = Out::new(cli.output);
    if let Command::Completion { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "berth", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let client = matches!(cli.command, Command::Client(_));
    if !client {
        berth::telemetry::init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Client(cmd) = cli.command {
        return match runtime.block_on(cli::main(cmd, out)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(f) => {
                f.report(out.color && std::io::IsTerminal::is_terminal(&std::io::stderr()));
                ExitCode::from(f.exit)
            }
        };
    }
    match runtime.block_on(run(cli, out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(cli: &Cli) -> anyhow::Result<(Config, String)> {
    let mut config = Config::load(cli.config.as_deref(), std::env::vars())?;
    if let Some(dir) = &cli.data_dir {
        config.data_dir = dir.clone();
    }
    if let Command::Serve {
        listen,
        runtime,
        role,
        store,
    } = &cli.command
    {
        if let Some(url) = store {
            config.store.url = Some(url.clone());
            if let Some((_, rule)) = config.store.check() {
                anyhow::bail!("--store: {rule}");
            }
        }
        if let Some(role) = role {
            config.role = *role;
        }
        if let Some(addr) = listen {
            config.listen = *addr;
        }
        if let Some(kind) = runtime {
            config.runtime.kind = *kind;
        }
    }
    let source = cli
        .config
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "configuration".to_owned());
    Ok((config, source))
}

async fn run(cli: Cli, out: Out) -> anyhow::Result<()> {
    let (config, source) = load(&cli)?;
    if let Command::Serve { .. } = cli.command {
        let mut app = App::build(config, &source).await?;
        if let Some(token) = app.generated_admin_token.take() {
            // Printed once, to the terminal and not the log: only its hash
            // is kept.
            println!(
                "Generated the admin token (shown only now; set BERTH_ADMIN_TOKEN to replace it):\n\n    {token}\n"
            );
        }
        match app.api_addr() {
            Some(addr) => println!("berth API listening on http://{addr}"),
            None => println!("berth workers started (role worker: no API)"),
        }
        wait_for_signal().await?;
        return app.shutdown().await;
    }
    // The other commands need the workers' names and policies, not an
    // engine: resolve them on the simulated runtime, so that `berth config`
    // works where no engine answers.
    let mut offline = config.clone();
    offline.runtime.kind = berth::config::RuntimeKind::Sim;
    let (deps, _) = berth::deps(&offline).await?;
    let registry = berth::registry(&config, deps)?;
    let policies = config.policies(registry.names(), &source)?;
    match cli.command {
        Command::Serve { .. } | Command::Client(_) | Command::Completion { .. } => {
            anyhow::bail!("handled above")
        }
        Command::Config(ConfigCmd::Check) => {
            if out.json {
                out.print_json(&serde_json::json!({ "ok": true, "source": source }));
            } else {
                println!(
                    "{source}: ok ({} workers, each with a valid policy)",
                    registry.workers().len()
                );
            }
            Ok(())
        }
        Command::Config(ConfigCmd::Dump) => {
            if out.json {
                out.print_json(&serde_json::to_value(&config)?);
            } else {
                print!("{}", config.to_toml());
            }
            Ok(())
        }
        Command::Config(ConfigCmd::Policies) => {
            print_policies(&registry, &policies, out.json);
            Ok(())
        }
        Command::Admin(AdminCmd::DeadLetters { all, limit }) => {
            let store = open_store(&config).await?;
            let list = store.dead_letters(None, !all, limit).await?;
            if out.json {
                out.print_json(&serde_json::to_value(&list)?);
            } else if list.is_empty() {
                println!("no dead letters");
            } else {
                println!(
                    "{:<26}  {:<22}  {:<24}  {:>8}  {:<10}  ERROR",
                    "ID", "WORKER", "EVENT", "ATTEMPTS", "REASON"
                );
                for d in &list {
                    println!(
                        "{:<26}  {:<22}  {:<24}  {:>8}  {:<10}  {}: {}",
                        d.id,
                        d.worker,
                        d.event_type,
                        d.attempts,
                        d.reason.as_str(),
                        d.error.code,
                        d.error.message
                    );
                }
            }
            Ok(())
        }
        Command::Admin(AdminCmd::Redrive { id }) => {
            let store = open_store(&config).await?;
            if let Some(dl) = store.dead_letter(&id).await?
                && !registry.names().any(|n| n == dl.worker)
            {
                anyhow::bail!(
                    "dead letter {id} belongs to worker '{}', which this berth does not run",
                    dl.worker
                );
            }
            match store.redrive(&id).await? {
                Redrive::Redriven(dl) => {
                    println!(
                        "re-driven: {} for worker {} (round {})",
                        dl.event_id,
                        dl.worker,
                        dl.round + 1
                    );
                    Ok(())
                }
                Redrive::AlreadyRedriven(_) => {
                    anyhow::bail!("dead letter {id} was already re-driven")
                }
                Redrive::NotFound => anyhow::bail!("no dead letter with id {id}"),
            }
        }
        Command::Admin(AdminCmd::Flow { flow_id }) => {
            let flow: FlowId = flow_id.parse()?;
            let store = open_store(&config).await?;
            print_flow(&store, flow).await
        }
    }
}

async fn open_store(config: &Config) -> anyhow::Result<berth_store::Store> {
    use std::sync::Arc;
    let clock: Arc<dyn berth_core::Clock> = Arc::new(berth_core::SystemClock);
    let ids = Arc::new(berth_core::IdGen::new(
        clock.clone(),
        Arc::new(berth_core::SeededRng::from_entropy()),
    ));
    let location = config.database_location();
    if let berth_store::Location::File(path) = &location
        && !path.exists()
    {
        anyhow::bail!(
            "no database at {} (has `berth serve` run with this data dir?)",
            path.display()
        );
    }
    berth_store::Store::open_at(
        &location,
        berth_store::StoreOptions {
            synchronous: config.store.synchronous,
            max_connections: 2,
            busy_timeout: config.store.busy_timeout,
            // An offline reader: it caches nothing.
            instance_cache: false,
        },
        clock,
        ids,
    )
    .await
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot listen for SIGINT")?,
        _ = term.recv() => {}
    }
    tracing::info!("signal received; shutting down");
    Ok(())
}

fn human(d: std::time::Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn print_policies(
    registry: &berth_worker::Registry,
    policies: &berth_worker::Policies,
    json: bool,
) {
    let rows: Vec<_> = registry
        .workers()
        .iter()
        .filter_map(|w| policies.get(&w.name).map(|p| (w, p)))
        .collect();
    if json {
        let list: Vec<_> = rows
            .iter()
            .map(|(w, p)| {
                serde_json::json!({
                    "worker": &*w.name,
                    "events": w.subscribes,
                    "policy": p,
                    "worst_case_attempts": p.max_attempts,
                    "worst_case_delay": human(p.worst_case_delay()),
                    "worst_case_total": human(p.worst_case_total()),
                })
            })
            .collect();
        match serde_json::to_string_pretty(&list) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot encode the policies: {e}"),
        }
        return;
    }
    if rows.is_empty() {
        println!("no workers registered");
        return;
    }
    println!(
        "{:<24} {:<28} {:>8} {:>8} {:<30} {:>5} {:<28} {:>12} {:>12}",
        "WORKER",
        "EVENTS",
        "ATTEMPTS",
        "TIMEOUT",
        "BACKOFF",
        "CONC",
        "ON EXHAUSTED",
        "WORST DELAY",
        "WORST TOTAL"
    );
    for (w, p) in rows {
        let b = &p.backoff;
        println!(
            "{:<24} {:<28} {:>8} {:>8} {:<30} {:>5} {:<28} {:>12} {:>12}",
            w.name,
            w.subscribes.join(","),
            p.max_attempts,
            human(p.timeout),
            format!(
                "{} ×{} ≤{} {}",
                human(b.initial),
                b.multiplier,
                human(b.max),
                b.jitter
            ),
            p.concurrency,
            p.on_exhausted.as_deref().unwrap_or("-"),
            human(p.worst_case_delay()),
            human(p.worst_case_total()),
        );
    }
}

async fn print_flow(store: &berth_store::Store, flow: FlowId) -> anyhow::Result<()> {
    let events = store.events_of_flow(flow).await?;
    if events.is_empty() {
        anyhow::bail!("no flow with id {flow}");
    }
    let attempts = store.attempts_of_flow(flow).await?;
    let depth = |e: &berth_core::Envelope| {
        let mut d = 0;
        let mut cur = e.causation_id;
        while let Some(c) = cur {
            d += 1;
            cur = events
                .iter()
                .find(|x| x.id == c)
                .and_then(|x| x.causation_id);
            if d > 64 {
                break;
            }
        }
        d
    };
    let t0 = events[0].created_at;
    println!("flow {flow}");
    for e in &events {
        let indent = "  ".repeat(depth(e));
        println!(
            "{indent}{:>9} {}  {}",
            format!("+{}ms", e.created_at.since(t0).as_millis()),
            e.event_type,
            e.id
        );
        for a in attempts.iter().filter(|a| a.event_id == e.id) {
            println!(
                "{indent}          └ {} #{}{} {} {}{}",
                a.worker,
                a.attempt,
                if a.round > 0 {
                    format!(" (round {})", a.round)
                } else {
                    String::new()
                },
                a.outcome,
                a.duration.map(human).unwrap_or_else(|| "?".into()),
                a.error
                    .as_ref()
                    .map(|er| format!(" — {}: {}", er.code, er.one_line()))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}
