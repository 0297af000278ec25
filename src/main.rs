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
    if !matches!(cli.command, cli::Command::Daemon(_)) {
        quiet_broken_pipe();
    }
    std::process::exit(cli::run(cli));
}

/// `agentbox ls -q | head -1`: once the reader has gone, printing to stdout fails, and
/// Rust's `print!` panics. A client command then ends quietly with the status of a command
/// killed by `SIGPIPE`, as other command-line tools do, instead of printing a panic. Any
/// other panic is reported as usual. (Not for the daemon, whose stdout is its log.)
fn quiet_broken_pipe() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg =
            payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied());
        if msg.is_some_and(|m| m.starts_with("failed printing to stdout") && m.contains("os error 32")) {
            std::process::exit(cli::EXIT_BROKEN_PIPE);
        }
        report(info);
    }));
}
