//! `prg-proxy` command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use prg_proxy::admin::cli::{Options as AdminOptions, Request as AdminRequest};
use prg_proxy::{Config, Proxy};

/// XMPP-aware failover proxy in front of a presence redundancy group.
#[derive(Parser)]
#[command(
    version,
    about,
    after_help = "Admin commands (status, failover, fallback, recover, user, add-user, \
                  move-user) exit 0 on success, 2 when the API refused the request (4xx: \
                  unknown node, refused by the state machine, missing or wrong token) and 3 \
                  when the API is unreachable or failed (5xx)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Admin API base URL (for status, failover, … ).
    #[arg(long, global = true, default_value = prg_proxy::admin::cli::DEFAULT_ADMIN)]
    admin: String,
    /// Bearer token for mutating admin calls (default: $PRG_PROXY_TOKEN).
    #[arg(long, global = true)]
    token: Option<String>,
    /// Print the admin API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Log format: `human` (default) or `json` (one object per line, with
    /// the connection span's fields).
    #[arg(long, global = true, value_enum, default_value_t = prg_proxy::logging::Format::Human)]
    log_format: prg_proxy::logging::Format,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a configuration file (SIGHUP reloads it,
    /// SIGTERM/SIGINT drain and stop, SIGUSR1/SIGUSR2 are ignored).
    Run {
        /// The TOML configuration.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a configuration file and exit (64 if it is bad).
    Check {
        /// The TOML configuration.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Run the built-in demo: a simulated node pair behind the proxy and a
    /// few simulated clients.
    Demo,
    /// Write a development CA and a certificate for the given names.
    GenCert {
        /// Output folder.
        #[arg(short, long, default_value = "certs")]
        out: PathBuf,
        /// DNS names or IP addresses for the certificate.
        #[arg(default_values_t = ["example.com".to_string(), "localhost".to_string()])]
        names: Vec<String>,
    },
    /// Show the group, both nodes and the counters (admin API).
    Status,
    /// Manual failover of NODE (name or 1/2): its users move to the peer.
    Failover {
        /// Node name or number.
        node: String,
    },
    /// Manual fallback to NODE: its users come back from the peer.
    Fallback {
        /// Node name or number.
        node: String,
    },
    /// Manual recovery when both nodes are in a failed state.
    Recover,
    /// Show a user's home node and sessions.
    User {
        /// Bare JID.
        jid: String,
    },
    /// Add a user to the assignment with NODE as home.
    AddUser {
        /// Bare JID.
        jid: String,
        /// Node name or number.
        node: String,
    },
    /// Pin a user's home to NODE and move the user's sessions there.
    MoveUser {
        /// Bare JID.
        jid: String,
        /// Node name or number.
        node: String,
    },
}

/// The admin request a command stands for, if it is one.
fn admin_request(c: &Command) -> Option<AdminRequest> {
    Some(match c {
        Command::Status => AdminRequest::Status,
        Command::Failover { node } => AdminRequest::Failover(node.clone()),
        Command::Fallback { node } => AdminRequest::Fallback(node.clone()),
        Command::Recover => AdminRequest::Recover,
        Command::User { jid } => AdminRequest::User(jid.clone()),
        Command::AddUser { jid, node } => AdminRequest::AddUser {
            jid: jid.clone(),
            node: node.clone(),
        },
        Command::MoveUser { jid, node } => AdminRequest::MoveUser {
            jid: jid.clone(),
            node: node.clone(),
        },
        _ => return None,
    })
}

/// `EX_USAGE` from sysexits.h: a bad configuration.
const EX_CONFIG: u8 = 64;
/// `EX_UNAVAILABLE`: could not start (port in use, …).
const EX_UNAVAILABLE: u8 = 69;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let admin = admin_request(&cli.command);
    // The demo and the admin commands print their own output; only
    // warnings go to the log.
    prg_proxy::logging::init(
        if admin.is_some() {
            "warn"
        } else if matches!(cli.command, Command::Demo) {
            "error,prg_proxy::group=warn"
        } else {
            "info"
        },
        cli.log_format,
    );
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("prg-proxy: cannot start the runtime: {e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    let opts = AdminOptions {
        admin: cli.admin.clone(),
        token: cli.token.clone().or_else(|| {
            std::env::var("PRG_PROXY_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
        }),
        json: cli.json,
    };
    match cli.command {
        Command::Check { config } => match Config::load(&config)
            .and_then(|c| rt.block_on(async { prg_proxy::preflight::load(&c).map(drop) }))
        {
            Ok(()) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("prg-proxy: {}: {e}", config.display());
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::Run { config } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("prg-proxy: {}: {e}", config.display());
                    return ExitCode::from(EX_CONFIG);
                }
            };
            rt.block_on(async {
                let proxy = match Proxy::bind_with_path(cfg, Some(config.clone())).await {
                    Ok(p) => p,
                    Err(prg_proxy::proxy::StartError::Config(e)) => {
                        eprintln!("prg-proxy: {}: {e}", config.display());
                        return ExitCode::from(EX_CONFIG);
                    }
                    Err(e) => {
                        eprintln!("prg-proxy: {e}");
                        return ExitCode::from(EX_UNAVAILABLE);
                    }
                };
                let view = proxy.view();
                let reload = move || match view.reload() {
                    Ok(report) => tracing::info!(%report, "configuration reloaded"),
                    Err(e) => tracing::error!(
                        error = %e,
                        "configuration reload refused; the running configuration stays in force"
                    ),
                };
                if let Err(e) = prg_proxy::signals::handle_reload_signals(reload) {
                    tracing::warn!(error = %e, "cannot handle SIGHUP: reload by signal is off");
                }
                proxy.run(prg_proxy::signals::terminated()).await;
                ExitCode::SUCCESS
            })
        }
        #[cfg(feature = "sim")]
        Command::Demo => rt.block_on(async {
            match prg_proxy::demo::run(prg_proxy::signals::terminated()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("prg-proxy demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }),
        #[cfg(not(feature = "sim"))]
        Command::Demo => {
            eprintln!("prg-proxy demo: this build has no simulated nodes (built without the `sim` feature)");
            ExitCode::FAILURE
        }
        Command::GenCert { out, names } => {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            match prg_proxy::tls::dev_certs(&refs) {
                Ok(d) => {
                    let write = || -> std::io::Result<()> {
                        std::fs::create_dir_all(&out)?;
                        std::fs::write(out.join("dev-ca.pem"), &d.ca_pem)?;
                        std::fs::write(out.join("dev-cert.pem"), &d.chain_pem)?;
                        std::fs::write(out.join("dev-key.pem"), &d.key_pem)?;
                        Ok(())
                    };
                    match write() {
                        Ok(()) => {
                            println!(
                                "wrote {0}/dev-ca.pem, {0}/dev-cert.pem, {0}/dev-key.pem for {names:?}",
                                out.display()
                            );
                            ExitCode::SUCCESS
                        }
                        Err(e) => {
                            eprintln!("prg-proxy: {}: {e}", out.display());
                            ExitCode::FAILURE
                        }
                    }
                }
                Err(e) => {
                    eprintln!("prg-proxy: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status
        | Command::Failover { .. }
        | Command::Fallback { .. }
        | Command::Recover
        | Command::User { .. }
        | Command::AddUser { .. }
        | Command::MoveUser { .. } => match admin {
            Some(req) => ExitCode::from(rt.block_on(prg_proxy::admin::cli::run(&req, &opts))),
            None => ExitCode::FAILURE,
        },
    }
}
