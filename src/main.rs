//! `agentbox`: the daemon (`agentbox daemon`) and its command-line client (every other
//! subcommand talks to a daemon over its API).
#![forbid(unsafe_code)]

mod cli;

use clap::Parser;

fn main() {
    // The spawner must start before any thread exists (it forks).
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("__spawner") {
        std::process::exit(cli::spawner::main(&args[2..]));
    }
    let cli = cli::Cli::parse();
    std::process::exit(cli::run(cli));
}
