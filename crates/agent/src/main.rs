use clap::Parser;
use soda_syncer::cli::{Cli, Command};

/// `serve`'s exit codes: 0 stopped cleanly, 1 failed, 2 bad configuration,
/// and this: another agent holds the state directory (EX_TEMPFAIL of
/// sysexits.h: try again later, or pass --wait-for-state-lock).
const EXIT_STATE_DIR_LOCKED: i32 = 75;

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Maintain(args) => maintain(*args),
        other => soda_syncer::cli::run_client(&cli.client, other),
    };
    std::process::exit(code);
}

fn serve(args: soda_syncer::config::ServeArgs) -> i32 {
    init_logging(args.log_json);
    // SAFETY: prctl(PR_SET_DUMPABLE) only changes this process's dumpable flag:
    // no core dumps and no ptrace/proc access by other users to memory holding secrets.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let config = match soda_syncer::Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("soda-syncer: {e}");
            return 2;
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    rt.block_on(async move {
        let shutdown = shutdown_on_signal();
        match soda_syncer::run(config, shutdown).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!("{e:#}");
                eprintln!("soda-syncer: {e:#}");
                match e.downcast_ref() {
                    Some(soda_syncer::state_lock::StateLockError::Held { .. }) => EXIT_STATE_DIR_LOCKED,
                    _ => 1,
                }
            }
        }
    })
}

fn maintain(args: soda_syncer::maintainer::MaintainArgs) -> i32 {
    init_logging(args.log_json);
    // SAFETY: as in `serve`: no core dumps of memory that holds the delete credentials.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    rt.block_on(async move {
        let shutdown = shutdown_on_signal();
        soda_syncer::maintainer::run(args, shutdown).await
    })
}

/// Cancelled at SIGTERM or SIGINT. Needs a Tokio runtime.
fn shutdown_on_signal() -> tokio_util::sync::CancellationToken {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let s2 = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("signal received");
        s2.cancel();
    });
    shutdown
}

fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SODA_SYNCER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
