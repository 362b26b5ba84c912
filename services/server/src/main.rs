//! `tidings`: parse the command line, load the config, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use tidings_server::cli::Cli;
use tidings_server::config::Config;

// The sequencer allocates many small buffers per event from several threads; glibc's malloc
// serialised them on its arena locks. mimalloc raised `bench append` throughput by about a
// third in the same runs (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TIDINGS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    Config::warn_unknown_env();
    let result = Config::load(cli.config.as_deref(), |k| std::env::var(k).ok())
        .map_err(anyhow::Error::from)
        .and_then(|mut config| {
            if let Some(dir) = cli.data_dir {
                config.data_dir = dir;
            }
            tokio::runtime::Runtime::new()?
                .block_on(tidings_server::commands::run(cli.command, config))
        });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("{}", tidings_server::output::failure(&e));
            ExitCode::FAILURE
        }
    }
}
