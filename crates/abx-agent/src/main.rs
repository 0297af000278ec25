//! `agentbox-agent`: the guest agent binary (see the `abx_agent` library docs).
//!
//! ```text
//! agentbox-agent                 serve on the listening socket at fd 3 (inside a sandbox)
//! agentbox-agent --listen PATH   bind PATH and serve (development and tests)
//! agentbox-agent --version
//! ```
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use abx_agent::Listen;

const USAGE: &str = "usage: agentbox-agent [--listen PATH]";

fn main() -> ExitCode {
    let listen = match parse(std::env::args().skip(1)) {
        Ok(Some(listen)) => listen,
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("agentbox-agent: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match abx_agent::run(listen) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentbox-agent: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Parses the arguments; `None` when the request was informational and is answered.
fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Listen>, String> {
    let Some(first) = args.next() else { return Ok(Some(Listen::Inherited)) };
    let listen = match first.as_str() {
        "--listen" => Listen::Path(PathBuf::from(args.next().ok_or("--listen needs a path")?)),
        "--version" | "-V" => {
            println!("agentbox-agent {}", env!("CARGO_PKG_VERSION"));
            return Ok(None);
        }
        "--help" | "-h" => {
            println!("{USAGE}");
            return Ok(None);
        }
        other => return Err(format!("unexpected argument '{other}'")),
    };
    match args.next() {
        Some(extra) => Err(format!("unexpected argument '{extra}'")),
        None => Ok(Some(listen)),
    }
}

/// The error and its causes, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}
