//! The command line: argument parsing, subcommands and exit codes.
//!
//! Exit codes: 0 success; 1 the command failed (the message says why);
//! 2 bad usage or an invalid config (clap uses 2 for usage errors too).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::airgap;
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
    /// Ask a running server (the one this config describes) to sync now.
    Sync {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a config file; errors name the key and its line.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Write an air-gap bundle (a plain tar) of a relay or a published
    /// repository: everything, or what a site at `--since` lacks.
    Export {
        /// A relay's config: exports what it serves (objects it lacks are
        /// fetched from its upstreams first).
        #[arg(long, conflicts_with = "repository", required_unless_present = "repository")]
        config: Option<PathBuf>,
        /// A published repository (as `publish` writes it).
        #[arg(long)]
        repository: Option<PathBuf>,
        /// The bundle to write (with --max-part: FILE.001, FILE.002, ...).
        #[arg(long)]
        output: PathBuf,
        /// Only what manifest serial SINCE did not list (this side keeps the
        /// manifests it served, in state/manifests/).
        #[arg(long, conflicts_with = "since_manifest")]
        since: Option<u64>,
        /// Only what this manifest does not list: the other side's, from
        /// `patchrelay import --status --write-manifest FILE` there.
        #[arg(long)]
        since_manifest: Option<PathBuf>,
        /// Only these components (comma-separated).
        #[arg(long, value_delimiter = ',')]
        components: Option<Vec<String>>,
        /// Split into parts no larger than this, e.g. "4000MiB" for FAT32.
        #[arg(long, value_parser = parse_size)]
        max_part: Option<u64>,
        /// Print the summary as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// No progress bars and no summary (errors still go to stderr).
        #[arg(long)]
        quiet: bool,
    },
    /// Adopt an air-gap bundle into a relay, stopped or running; or, with
    /// --status, say what the relay holds. Exit codes: 0 imported (or
    /// already); 3 rollback or equivocation; 5 verification failed; 6 gap.
    Import {
        #[arg(long)]
        config: PathBuf,
        /// The bundle, or the first part of a split one (FILE.001).
        #[arg(required_unless_present = "status", conflicts_with = "status")]
        bundle: Option<PathBuf>,
        /// Import an incremental bundle into a relay that lacks what it
        /// assumes; the versions it cannot bring answer 404 until a later
        /// bundle brings them.
        #[arg(long)]
        force_gap: bool,
        /// Print the relay's serial and what it lacks.
        #[arg(long)]
        status: bool,
        /// With --status: write the relay's manifest to FILE, for `export
        /// --since-manifest FILE` on the connected side.
        #[arg(long, requires = "status")]
        write_manifest: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        quiet: bool,
    },
    /// The reference agent.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Run a demo: an origin and a relay on loopback over a generated repository.
    Demo {
        /// Keep the demo's files here instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Relay port (the origin takes the next one); 0 picks free ports.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Serve the relay over HTTPS with a throwaway CA (its ca.pem is
        /// printed in the curl lines).
        #[arg(long)]
        tls: bool,
    },
}

#[derive(Subcommand, Debug)]
enum AgentCommand {
    /// Bring a local file to the latest version: delta chain when cheaper,
    /// else the full file; resumes; verifies the manifest signature and the
    /// result. Exit 0 only when the file is the latest; 3 untrusted manifest or
    /// unknown component; 4 server unreachable or failing; 5 bad bytes; 1 other.
    Update {
        /// The relay or origin, e.g. http://relay.site.example:8080
        #[arg(long)]
        server: String,
        #[arg(long)]
        component: String,
        /// The file to update (created if missing).
        #[arg(long)]
        file: PathBuf,
        /// The origin's Ed25519 public key (base64), as printed by keygen.
        #[arg(long)]
        public_key: String,
        /// A specific version instead of the latest.
        #[arg(long)]
        to: Option<String>,
        /// PEM: the CA that issued an https:// server's certificate (a
        /// private CA); instead of the public web's CAs.
        #[arg(long)]
        cacert: Option<PathBuf>,
        /// PEM: a client certificate to show the server (mTLS), with --key.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// PEM: the key of --cert.
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
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
                // The TLS files are loaded as `serve` would: a certificate
                // that does not go with its key fails here, not at start.
                if let Some(tls) = &c.server.tls
                    && let Err(e) = crate::tls::ServerTls::load(tls)
                {
                    eprintln!("error: {}: [server.tls]: {e}", config.display());
                    return ExitCode::from(2);
                }
                if let Err(e) = crate::upstream::Upstreams::new(&c.upstream) {
                    eprintln!("error: {}: {e}", config.display());
                    return ExitCode::from(2);
                }
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
                // systemd Type=notify: ready once listening (no-op elsewhere).
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                let result = server.wait().await.map_err(|e| e.to_string());
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                tracing::info!("patchrelay stopped");
                result
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Sync { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            match admin_sync(&config) {
                Ok(body) => {
                    println!("{body}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Export { config, repository, output, since, since_manifest, components, max_part, json, quiet } => {
            if max_part.is_some_and(|m| m < (1 << 20)) {
                eprintln!("error: --max-part must be at least 1MiB");
                return ExitCode::from(2);
            }
            let loaded = match config.as_deref().map(Config::load).transpose() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            init_command_logging(loaded.as_ref());
            let from = match (&loaded, &repository) {
                (Some(c), _) => airgap::export::ExportFrom::Relay(c),
                (None, Some(r)) => airgap::export::ExportFrom::Repository(r),
                (None, None) => {
                    eprintln!("error: give --config or --repository");
                    return ExitCode::from(2);
                }
            };
            let since = match (since, since_manifest) {
                (Some(n), _) => Some(airgap::export::SinceArg::Serial(n)),
                (None, Some(p)) => Some(airgap::export::SinceArg::Manifest(p)),
                (None, None) => None,
            };
            let opts = airgap::export::ExportOptions {
                since,
                components,
                max_part,
                show: airgap::progress::Show { quiet: quiet || json },
            };
            match airgap::export::export(from, &output, &opts) {
                Ok(report) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
                    } else if !quiet {
                        print_export(&report);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Import { config, bundle, force_gap, status, write_manifest, json, quiet } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            init_command_logging(Some(&config));
            if status {
                return match airgap::import::status(&config, write_manifest.as_deref()) {
                    Ok(s) => {
                        if json {
                            let mut shown = s.clone();
                            (shown.manifest, shown.signature) = (None, None);
                            println!("{}", serde_json::to_string_pretty(&shown).unwrap_or_default());
                        } else if !quiet {
                            print_status(&s, write_manifest.as_deref());
                        }
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(e.exit_code())
                    }
                };
            }
            let Some(bundle) = bundle else {
                eprintln!("error: give the bundle to import, or --status");
                return ExitCode::from(2);
            };
            let opts =
                airgap::import::ImportOptions { force_gap, show: airgap::progress::Show { quiet: quiet || json } };
            match airgap::import::import(&config, &bundle, &opts) {
                Ok(report) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
                    } else if !quiet {
                        print_import(&report);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Agent {
            command: AgentCommand::Update { server, component, file, public_key, to, cacert, cert, key },
        } => {
            let client_cert = cert.zip(key);
            let args = crate::agent::UpdateArgs { server, component, file, public_key, to, cacert, client_cert };
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return fail(e),
            };
            match rt.block_on(crate::agent::update(args)) {
                Ok(report) => {
                    match report.result {
                        "updated" => eprintln!(
                            "{} updated {} -> {}: {} bytes downloaded ({} for the full file)",
                            report.component,
                            report.from.as_deref().unwrap_or("(none)"),
                            report.to,
                            report.downloaded_bytes,
                            report.full_bytes
                        ),
                        _ => eprintln!("{} is already at {}", report.component, report.to),
                    }
                    println!("{}", serde_json::to_string(&report).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Demo { dir, port, tls } => {
            telemetry::init_logging(&LogConfig::default());
            match crate::demo::run(dir, port, tls) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
    }
}

/// `POST /admin/sync` to the server `config` describes; the response body.
///
/// A dozen lines of HTTP/1.1 over a socket: the one request this command makes
/// does not justify starting an async runtime and a client.
fn admin_sync(config: &Config) -> Result<String, String> {
    use std::io::{Read, Write};
    let token = config
        .admin_token
        .as_ref()
        .ok_or("the config has no [admin] token (nor is PATCHRELAY_ADMIN_TOKEN set); the admin API is off")?
        .0
        .clone();
    let mut addr = config.server.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    let timeout = std::time::Duration::from_secs(120);
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
        .map_err(|e| format!("cannot reach the server at {addr}: {e} (is it running?)"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let req = format!(
        "POST /admin/sync HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).map_err(|e| format!("{addr}: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| format!("{addr}: {e}"))?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    if status == "200" {
        Ok(body.trim().to_string())
    } else {
        Err(format!("sync answered HTTP {status}: {}", body.trim()))
    }
}

/// Logs of a one-shot command: warnings only, on stderr (the summary is
/// the command's output), unless `PATCHRELAY_LOG` asks for more.
fn init_command_logging(config: Option<&Config>) {
    let mut log = config.map(|c| c.log.clone()).unwrap_or_default();
    log.level = "warn".into();
    telemetry::init_logging(&log);
}

fn human(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

/// `component version (how)` lines, a few per component.
fn brought_lines(brings: &[airgap::Brought]) -> Vec<String> {
    let mut by: std::collections::BTreeMap<&str, Vec<String>> = std::collections::BTreeMap::new();
    for b in brings {
        let how = match b.carried {
            airgap::Carried::Object => "",
            airgap::Carried::Delta => " (delta)",
        };
        by.entry(&b.component).or_default().push(format!("{}{how}", b.version));
    }
    by.into_iter().map(|(c, v)| format!("  {c}: {}", v.join(", "))).collect()
}

fn print_export(r: &airgap::export::ExportReport) {
    let range = match r.since {
        Some(s) => format!("serial {s} -> {}", r.serial),
        None => format!("serial {} (full)", r.serial),
    };
    println!("bundle: {range}, {} version(s) of {} component(s)", r.brings.len(), r.components.len());
    for line in brought_lines(&r.brings) {
        println!("{line}");
    }
    println!(
        "{} in {} object(s) and {} delta(s) ({} as whole objects), {} fetched from upstream first, {:.1} s",
        human(r.bundle_bytes),
        r.objects,
        r.deltas,
        human(r.full_bytes),
        r.fetched,
        r.seconds
    );
    for f in &r.files {
        println!("wrote {}", f.display());
    }
}

fn print_import(r: &airgap::import::ImportReport) {
    match (r.result.as_str(), r.previous_serial) {
        ("unchanged", _) => println!("already imported: this relay holds serial {} (nothing to do)", r.serial),
        ("repaired", _) => println!(
            "this relay holds serial {} already; took in {} file(s) of it that it lacked",
            r.serial, r.files_written
        ),
        (_, Some(p)) => println!("imported serial {p} -> {} ({} relay)", r.serial, r.relay),
        (_, None) => println!("imported serial {} ({} relay)", r.serial, r.relay),
    }
    if r.result != "unchanged" {
        for line in brought_lines(&r.brings) {
            println!("{line}");
        }
        println!(
            "{} read, {} file(s) written, {} already here, {:.1} s",
            human(r.bundle_bytes),
            r.files_written,
            r.files_already_held,
            r.seconds
        );
    }
    print_lacks(&r.lacks);
}

fn print_lacks(lacks: &[airgap::Lack]) {
    if lacks.is_empty() {
        return;
    }
    println!("this relay lacks {} listed version(s) (answered 404 until a bundle brings them):", lacks.len());
    for l in lacks.iter().take(20) {
        println!("  {} {}", l.component, l.version);
    }
    if lacks.len() > 20 {
        println!("  ... and {} more", lacks.len() - 20);
    }
}

fn print_status(s: &airgap::import::Status, written: Option<&std::path::Path>) {
    match s.serial {
        Some(n) => println!(
            "serial {n} (generated {}), manifest {}",
            s.generated_at.as_deref().unwrap_or("?"),
            s.manifest_sha256.map(|d| d.to_string()).unwrap_or_default()
        ),
        None => println!("no manifest yet: import a full bundle"),
    }
    if s.import_pending {
        println!("an import waits for the running relay to adopt it");
    }
    print_lacks(&s.lacks);
    if let Some(p) = written {
        println!("wrote {}: carry it to the connected side for `patchrelay export --since-manifest`", p.display());
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::FAILURE
}
