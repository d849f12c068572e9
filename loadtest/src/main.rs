//! `patchrelay-load`: simulated agents against a patchrelay (or nginx).
//!
//! - `storm`: N agents ask for one URL at the same moment (the top-of-the-hour
//!   wave, or a cache miss everyone hits at once); reports first-byte and total
//!   time percentiles, errors, and deliveries that fail their SHA-256.
//! - `fleet`: agents that poll the manifest, plan, download deltas or full
//!   files with random drops and resumes, and verify every step (closed or
//!   open loop, over several processes).
//! - `slow`: thousands of agents reading slowly; server memory per connection.
//! - `chaos-proxy`: the relay's upstream path, cutting, stalling, flipping
//!   bytes and answering 503 at random (for `chaos.sh`).
//!
//! Every run is bounded in time and count and prints one JSON object.

mod chaos;
mod fleet;
mod http;
mod slow;
mod storm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "patchrelay-load", about = "Simulated update agents for patchrelay")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// N agents GET one URL at once.
    Storm(storm::Args),
    /// Agents that poll, plan, download (with drops and resumes) and verify.
    Fleet(fleet::Args),
    /// Many agents on slow links: errors and server memory per connection.
    Slow(slow::Args),
    /// A proxy that cuts, stalls, flips bytes and answers 503 at random.
    ChaosProxy(chaos::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start a runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Storm(a) => storm::run(a).await,
            Command::Fleet(a) => fleet::run(a).await,
            Command::Slow(a) => slow::run(a).await,
            Command::ChaosProxy(a) => chaos::run(a).await,
        }
    });
    match result {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
