//! `abx-probe`: see the library docs for the commands and the output contract.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use abx_probe::cli::{self, USAGE};

fn main() -> ExitCode {
    let cmd = match cli::parse(std::env::args_os().skip(1)) {
        Ok(cmd) => cmd,
        Err(e) => {
            eprintln!("abx-probe: {e}\n\n{USAGE}");
            return ExitCode::from(abx_probe::EXIT_USAGE);
        }
    };
    match abx_probe::run(&cmd, &mut std::io::stdout().lock()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(abx_probe::EXIT_REFUSED),
        Err(e) => {
            eprintln!("abx-probe: cannot write the result to stdout: {e}");
            ExitCode::from(abx_probe::EXIT_OUTPUT)
        }
    }
}
