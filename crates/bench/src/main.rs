//! berth-bench: benchmarks that print a human table on stderr and, as the
//! last line on stdout, one JSON object with the numbers.

mod bus;
mod chaos;
mod flows;
mod report;
mod scratch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "berth-bench", about = "Berth benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The embedded bus: publish → dispatch → no-op handler → acknowledge,
    /// on a real SQLite file in WAL mode or a PostgreSQL database.
    Bus(bus::Args),
    /// The instance creation flow, event-driven vs a synchronous baseline.
    Flows(flows::Args),
    /// Seeded chaos: user actions, engine faults and events, crashes; then
    /// the invariants.
    Chaos(chaos::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Quiet by default (the table and the JSON line are the output); with
    // BERTH_LOG, the workers' and reconciler's logs go to stderr.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
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
    let result = runtime.block_on(async {
        match cli.command {
            Command::Bus(args) => bus::run(args).await,
            Command::Flows(args) => flows::run(args).await,
            Command::Chaos(args) => chaos::run(args).await,
        }
    });
    match result {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
