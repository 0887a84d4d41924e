//! `prg-proxy` command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use prg_proxy::{Config, Proxy};

/// XMPP-aware failover proxy in front of a presence redundancy group.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
}

/// `EX_USAGE` from sysexits.h: a bad configuration.
const EX_CONFIG: u8 = 64;
/// `EX_UNAVAILABLE`: could not start (port in use, …).
const EX_UNAVAILABLE: u8 = 69;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; only warnings go to the log.
    prg_proxy::logging::init(if matches!(cli.command, Command::Demo) {
        "error,prg_proxy::group=warn"
    } else {
        "info"
    });
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("prg-proxy: cannot start the runtime: {e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(_) => {
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
    }
}
