//! The `cycleserve` command line: one subcommand per file. With no subcommand it serves.

mod healthcheck;
mod import;
mod serve;
mod translate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::logging::{init_logging, init_logging_with_progress, LogArgs};

#[derive(Debug, Parser)]
#[command(
    name = "cycleserve",
    version,
    about = "CycleGAN style transfer: serve, translate, import",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: serve::ServeArgs,
    #[command(flatten)]
    logging: LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the models over HTTP (the default).
    Serve {
        // Boxed: the server's flags outweigh every other subcommand's.
        #[command(flatten)]
        args: Box<serve::ServeArgs>,
        #[command(flatten)]
        logging: LogArgs,
    },
    /// Translate an image file, or several files and folders into --out-dir, with a model file.
    Translate(translate::TranslateArgs),
    /// Convert PyTorch generator checkpoints (.pth) into a cycleserve model file.
    Import(import::ImportArgs),
    /// Exit 0 if the server is ready (GET /readyz answers 200), 1 otherwise.
    Healthcheck(healthcheck::HealthcheckArgs),
}

/// Entry point of the `cycleserve` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::memory::return_large_buffers_to_the_os();
    let result = match cli.command {
        None => serve::run(cli.serve, &cli.logging),
        Some(Command::Serve { args, logging }) => serve::run(*args, &logging),
        Some(Command::Translate(args)) => {
            let progress = init_logging_with_progress(&cli.logging);
            translate::run(args, progress)
        }
        Some(command) => {
            init_logging(&cli.logging);
            match command {
                Command::Import(args) => import::run(args),
                Command::Healthcheck(args) => healthcheck::run(args),
                Command::Serve { .. } | Command::Translate(_) => unreachable!("handled above"),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
