//! The `ternmq` binary: configuration, logging, signals; `ternmq passwd` manages
//! password files.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use ternmq::config::{Config, ListenerKind, LogFormat};
use ternmq::security::passwd::{self, PasswdArgs, PasswordInput};
use ternmq::Server;
use tracing_subscriber::EnvFilter;

/// ternmq: a lightweight, fast MQTT broker (MQTT 3.1, 3.1.1 and 5.0).
#[derive(Parser, Debug)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Configuration file (TOML). Without it, every setting takes its default (a TCP
    /// listener on 127.0.0.1:1883 for anonymous local clients, as mosquitto 2).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Address of the TCP listener, overriding the first `tcp` listener of the file.
    #[arg(short, long, value_name = "ADDR:PORT")]
    bind: Option<SocketAddr>,

    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides both).
    #[arg(short, long, value_name = "LEVEL", value_parser = ["error", "warn", "info", "debug", "trace"])]
    log_level: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Add, update or delete a user of a password file (docs/security.md). The password
    /// is asked on the terminal, or read as one line from standard input.
    Passwd(PasswdCli),
}

#[derive(Args, Debug)]
struct PasswdCli {
    /// The password file.
    file: PathBuf,
    /// The username.
    user: String,
    /// Delete the user.
    #[arg(short = 'D', conflicts_with_all = ["create", "scram"])]
    delete: bool,
    /// Store a SCRAM-SHA-256 verifier (for MQTT 5 SCRAM) instead of an argon2id hash.
    #[arg(long)]
    scram: bool,
    /// Create the file, replacing an existing one.
    #[arg(short = 'c')]
    create: bool,
}

/// How long connections get to close after SIGINT/SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Passwd(args)) = &cli.command {
        return passwd_command(args);
    }
    let config = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ternmq: {e:#}");
            return ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("ternmq={}", config.log_level)));
    match config.log_format {
        // One JSON object per line; the connection's span (peer, client id) in "span".
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter)
            .init(),
        // Colour only on a terminal: logs written to a file or a pipe stay plain text.
        LogFormat::Text => {
            use std::io::IsTerminal;
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(std::io::stdout().is_terminal())
                .init()
        }
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ternmq: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, error }) => {
            tracing::error!("{error:#}");
            eprintln!("ternmq: {error:#}");
            ExitCode::from(code)
        }
    }
}

/// Why the broker stopped other than by a signal, and its exit code (2: configuration).
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Failure {
        Failure { code: 1, error }
    }
}

fn passwd_command(args: &PasswdCli) -> ExitCode {
    use std::io::IsTerminal;
    let args = PasswdArgs {
        file: args.file.clone(),
        user: args.user.clone(),
        delete: args.delete,
        scram: args.scram,
        create: args.create,
    };
    let stdin = std::io::stdin();
    let result = if stdin.is_terminal() {
        passwd::run(&args, PasswordInput::Terminal)
    } else {
        passwd::run(&args, PasswordInput::Reader(&mut stdin.lock()))
    };
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ternmq passwd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(bind) = cli.bind {
        match config
            .listeners
            .iter_mut()
            .find(|l| l.kind == ListenerKind::Tcp && l.tls.is_none())
        {
            Some(l) => l.bind = bind,
            None => anyhow::bail!("--bind given but the configuration has no plain tcp listener"),
        }
    }
    if let Some(level) = &cli.log_level {
        config.log_level = level.clone();
    }
    Ok(config)
}

async fn run(config: Config) -> Result<(), Failure> {
    // Before the listeners: a SIGTERM as soon as they accept is a clean shutdown too (the
    // store closed), not the signal's default action.
    let signals = Signals::new()?;
    let server = Server::start(config).await.map_err(|e| Failure {
        code: if e.is_config() { 2 } else { 1 },
        error: anyhow::Error::new(e).context("cannot start"),
    })?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "ternmq started");
    serve_signals(&server, signals).await?;
    tracing::info!("shutting down");
    if !server.shutdown(SHUTDOWN_GRACE).await {
        tracing::warn!("some connections did not close within {SHUTDOWN_GRACE:?}");
    }
    Ok(())
}

/// The signals the broker handles, listened for from before it starts.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
            term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            hup: signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?,
        })
    }
}

/// Waits for SIGINT or SIGTERM; on SIGHUP, reloads the password file, the ACL, the
/// token keys and the TLS certificates (what fails to load keeps its old version).
async fn serve_signals(server: &Server, mut signals: Signals) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = signals.int.recv() => return Ok(()),
            _ = signals.term.recv() => return Ok(()),
            // The broker stopped by itself (a cluster node declared dead by the others).
            _ = server.stopped() => return Ok(()),
            _ = signals.hup.recv() => {
                let errors = server.reload();
                if errors.is_empty() {
                    tracing::info!("reloaded the security files and certificates");
                }
                for e in errors {
                    tracing::error!("reload: {e}; the previous version stays in use");
                }
            }
        }
    }
}
