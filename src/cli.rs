//! The command line: argument parsing, subcommands and exit codes.
//!
//! Exit codes: 0 success; 1 the command failed (the message says why);
//! 2 bad usage or an invalid config (clap uses 2 for usage errors too).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogConfig};
use crate::repo::publish::{PublishOptions, publish};
use crate::repo::sign::SecretKey;
use crate::server::{self, StartOptions};
use crate::telemetry;

#[derive(Parser, Debug)]
#[command(name = "patchrelay", version, about = "Update relay for antivirus, EDR and patch agents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new Ed25519 signing key; prints the public key (base64).
    Keygen {
        /// Where to write the secret key (created with mode 0600; never overwritten).
        #[arg(long)]
        secret: PathBuf,
    },
    /// Build a repository from an input tree, or add new versions to one.
    Publish {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// The secret key file from `keygen`.
        #[arg(long)]
        key: PathBuf,
        /// Block size for chunk lists, e.g. "1MiB".
        #[arg(long, default_value = "1MiB", value_parser = parse_size)]
        chunk_size: u64,
    },
    /// Run an origin or a relay.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a config file; errors name the key and its line.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a demo: an origin and a relay on loopback over a generated repository.
    Demo {
        /// Keep the demo's files here instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Relay port (the origin takes the next one); 0 picks free ports.
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>().map(|b| b.0).map_err(|e| format!("{s:?} is not a size: {e}"))
}

/// Entry point for the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Keygen { secret } => {
            let key = match SecretKey::generate().and_then(|k| k.save_new(&secret).map(|()| k)) {
                Ok(k) => k,
                Err(e) => return fail(e),
            };
            println!("{}", key.public().to_base64());
            eprintln!(
                "secret key written to {} (keep it off relays); put the line above in relays' [trust] public_key",
                secret.display()
            );
            ExitCode::SUCCESS
        }
        Command::Publish { input, output, key, chunk_size } => {
            let key = match SecretKey::load(&key) {
                Ok(k) => k,
                Err(e) => return fail(e),
            };
            match publish(&input, &output, &key, &PublishOptions { chunk_size }) {
                Ok(r) if r.wrote_manifest => {
                    for (c, v) in &r.added {
                        println!("added {c} {v}");
                    }
                    println!(
                        "published serial {} ({} new, {} unchanged) to {}",
                        r.serial,
                        r.added.len(),
                        r.unchanged,
                        output.display()
                    );
                    ExitCode::SUCCESS
                }
                Ok(r) => {
                    println!("nothing new: repository stays at serial {}", r.serial);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                println!("{}: ok ({:?} role)", config.display(), c.role());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            telemetry::init_logging(&config.log);
            let result = actix_rt::System::new().block_on(async {
                let server =
                    server::start(&config, StartOptions { handle_signals: true }).await.map_err(|e| e.to_string())?;
                server.wait().await.map_err(|e| e.to_string())
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Demo { dir, port } => {
            telemetry::init_logging(&LogConfig::default());
            match crate::demo::run(dir, port) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::FAILURE
}
