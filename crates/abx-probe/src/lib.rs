//! `abx-probe`, the verifier that integration tests copy into a sandbox and run there (like
//! youki's in-container verifier), so that they assert on what a process can and cannot do
//! *from the inside*.
//!
//! Every command prints exactly one JSON object on one line of stdout (progress, if any,
//! goes to stderr):
//!
//! | command                       | prints                                                    |
//! |-------------------------------|-----------------------------------------------------------|
//! | `report`                      | identity, namespaces, mounts, ... and [`syscalls`] tried  |
//! | `write PATH`                  | `{"ok":true,"bytes":N}` or `{"ok":false,"errno":"EROFS"}` |
//! | `read PATH`                   | `{"ok":true,"size":N,"truncated":false}` or an errno       |
//! | `connect HOST:PORT`           | `{"ok":true,"addr":"…"}` or an errno (1 s timeout)         |
//! | `udp HOST:PORT [TEXT]`        | `{"ok":true,"reply":"…"}` or an errno (1 s timeout)        |
//! | `net-admin`                   | `{"ok":false,"address":"EPERM","nft":"EPERM",…}` (ok if any change worked) |
//! | `hog MEGABYTES [SECONDS]`     | `{"ok":true,"megabytes":N}` once all is touched, then holds it |
//! | `sleep SECONDS`               | `{"ok":true}` after sleeping                               |
//! | `dns-bench SERVER:PORT NAME COUNT` | `{"ok":true,"count":N,"median_us":…,"p95_us":…,…}`: COUNT A queries, one after another |
//! | `tcp-send HOST:PORT MEGABYTES` | `{"ok":true,"bytes":N,"seconds":S,"mbytes_per_s":R}` (MiB) to a `tcp-sink` |
//! | `tcp-sink ADDR:PORT`          | `{"ok":true,"addr":"…"}` once listening, then serves until killed |
//!
//! Exit status: 0 when `ok` is true (always for `report`), [`EXIT_REFUSED`] when the JSON
//! says `"ok":false`, [`EXIT_USAGE`] for bad arguments, [`EXIT_OUTPUT`] when stdout failed.
#![forbid(unsafe_code)]

pub mod cli;
pub mod commands;
pub mod procfs;
pub mod report;
pub mod syscalls;

use std::io::{self, Write};

use cli::Command;

/// Exit status when the command ran and reports `"ok":false`.
pub const EXIT_REFUSED: u8 = 1;
/// Exit status for bad arguments.
pub const EXIT_USAGE: u8 = 2;
/// Exit status when the JSON could not be written to stdout.
pub const EXIT_OUTPUT: u8 = 3;

/// Runs `cmd`, writes its JSON line to `out`, and returns its `ok`.
///
/// `hog` keeps its memory and sleeps after printing, so a caller sees the line before the
/// process is (possibly) killed; `tcp-sink` serves after printing, until it is killed.
pub fn run(cmd: &Command, out: &mut impl Write) -> io::Result<bool> {
    let mut held = Vec::new();
    let mut sink = None;
    let result = match cmd {
        Command::Report => commands::Outcome { json: report::report(), ok: true },
        Command::Write(path) => commands::write(path),
        Command::Read(path) => commands::read(path),
        Command::Connect(target) => commands::connect(target),
        Command::Udp(target, text) => commands::udp(target, text.as_bytes()),
        Command::NetAdmin => commands::net_admin(),
        Command::Sleep(duration) => commands::sleep(*duration),
        Command::Hog { megabytes, .. } => {
            let (outcome, memory) = commands::hog(*megabytes);
            held = memory;
            outcome
        }
        Command::DnsBench { server, name, count } => commands::dns_bench(server, name, *count),
        Command::TcpSend { target, megabytes } => commands::tcp_send(target, *megabytes),
        Command::TcpSink(addr) => {
            let (outcome, listener) = commands::tcp_listen(addr);
            sink = listener;
            outcome
        }
    };
    writeln!(out, "{}", result.json)?;
    out.flush()?;
    if let Command::Hog { hold, .. } = cmd {
        commands::hold(std::hint::black_box(held), *hold);
    }
    if let Some(listener) = sink {
        commands::serve_sink(listener);
    }
    Ok(result.ok)
}
