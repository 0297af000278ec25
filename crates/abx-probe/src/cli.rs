//! Command-line parsing: one [`Command`] per subcommand.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub const USAGE: &str = "usage: abx-probe report
       abx-probe write PATH
       abx-probe read PATH
       abx-probe connect HOST:PORT
       abx-probe udp HOST:PORT [TEXT]
       abx-probe net-admin
       abx-probe hog MEGABYTES [SECONDS]
       abx-probe sleep SECONDS
       abx-probe dns-bench SERVER:PORT NAME COUNT
       abx-probe tcp-send HOST:PORT MEGABYTES
       abx-probe tcp-sink ADDR:PORT";

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Report identity, namespaces, mounts and the outcome of each syscall attempt.
    Report,
    /// Create (or append to) a file.
    Write(PathBuf),
    /// Read a file.
    Read(PathBuf),
    /// Open a TCP connection to `host:port`.
    Connect(String),
    /// Allocate and touch this much memory in 1 MiB steps, then hold it for `hold`
    /// (forever when `None`).
    Hog { megabytes: u64, hold: Option<Duration> },
    /// Sleep.
    Sleep(Duration),
    /// Send one UDP datagram to `host:port` and wait 1 s for an answer.
    Udp(String, String),
    /// Try to change the network namespace (address, route, nftables) as root would.
    NetAdmin,
    /// Send `count` DNS A queries for `name` to `server` one after another over one UDP
    /// socket and report the latency distribution (a load generator, not a resolver).
    DnsBench { server: String, name: String, count: u32 },
    /// Send `megabytes` MiB over one TCP connection to a `tcp-sink` and report the rate.
    TcpSend { target: String, megabytes: u64 },
    /// Listen on `addr`; for every connection, read to the end, answer the byte count.
    TcpSink(String),
}

/// Bad command-line arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, UsageError> {
    let mut args = args.into_iter();
    let name = args.next().ok_or_else(|| usage("missing command"))?;
    let rest: Vec<OsString> = args.collect();
    let cmd = name.to_str().ok_or_else(|| usage("command is not UTF-8"))?;
    match (cmd, rest.as_slice()) {
        ("report", []) => Ok(Command::Report),
        ("write", [path]) => Ok(Command::Write(path.into())),
        ("read", [path]) => Ok(Command::Read(path.into())),
        ("connect", [target]) => Ok(Command::Connect(utf8(target, "HOST:PORT")?.to_owned())),
        ("hog", [mb]) => Ok(Command::Hog { megabytes: megabytes(mb)?, hold: None }),
        ("hog", [mb, secs]) => Ok(Command::Hog { megabytes: megabytes(mb)?, hold: Some(seconds(secs)?) }),
        ("sleep", [secs]) => Ok(Command::Sleep(seconds(secs)?)),
        ("udp", [target]) => Ok(Command::Udp(utf8(target, "HOST:PORT")?.to_owned(), "probe".into())),
        ("udp", [target, text]) => {
            Ok(Command::Udp(utf8(target, "HOST:PORT")?.to_owned(), utf8(text, "TEXT")?.to_owned()))
        }
        ("net-admin", []) => Ok(Command::NetAdmin),
        ("dns-bench", [server, name, count]) => Ok(Command::DnsBench {
            server: utf8(server, "SERVER:PORT")?.to_owned(),
            name: dns_name(name)?,
            count: query_count(count)?,
        }),
        ("tcp-send", [target, mb]) => {
            Ok(Command::TcpSend { target: utf8(target, "HOST:PORT")?.to_owned(), megabytes: megabytes(mb)? })
        }
        ("tcp-sink", [addr]) => Ok(Command::TcpSink(utf8(addr, "ADDR:PORT")?.to_owned())),
        (
            "report" | "write" | "read" | "connect" | "hog" | "sleep" | "udp" | "net-admin" | "dns-bench" | "tcp-send"
            | "tcp-sink",
            _,
        ) => Err(usage(format!("wrong number of arguments for {cmd}"))),
        _ => Err(usage(format!("unknown command {cmd:?}"))),
    }
}

fn utf8<'a>(arg: &'a OsString, what: &str) -> Result<&'a str, UsageError> {
    arg.to_str().ok_or_else(|| usage(format!("{what} is not UTF-8")))
}

fn megabytes(arg: &OsString) -> Result<u64, UsageError> {
    let text = utf8(arg, "MEGABYTES")?;
    text.parse().map_err(|_| usage(format!("MEGABYTES must be a whole number, not {text:?}")))
}

/// A DNS name for a query: dot-separated labels of 1 to 63 bytes (letters, digits, `-`,
/// `_`), at most 253 characters, an optional trailing dot (dropped).
fn dns_name(arg: &OsString) -> Result<String, UsageError> {
    let text = utf8(arg, "NAME")?;
    let name = text.strip_suffix('.').unwrap_or(text);
    let label_ok =
        |l: &str| (1..=63).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(usage(format!("NAME must be a DNS name such as example.com, not {text:?}")));
    }
    Ok(name.to_owned())
}

fn query_count(arg: &OsString) -> Result<u32, UsageError> {
    let text = utf8(arg, "COUNT")?;
    match text.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(usage(format!("COUNT must be a positive whole number, not {text:?}"))),
    }
}

fn seconds(arg: &OsString) -> Result<Duration, UsageError> {
    let text = utf8(arg, "SECONDS")?;
    text.parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| usage(format!("SECONDS must be a non-negative number, not {text:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(args: &[&str]) -> Result<Command, UsageError> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn parses_every_command() {
        assert_eq!(parse_str(&["report"]), Ok(Command::Report));
        assert_eq!(parse_str(&["write", "/etc/x"]), Ok(Command::Write("/etc/x".into())));
        assert_eq!(parse_str(&["read", "/etc/x"]), Ok(Command::Read("/etc/x".into())));
        assert_eq!(parse_str(&["connect", "1.1.1.1:53"]), Ok(Command::Connect("1.1.1.1:53".into())));
        assert_eq!(parse_str(&["hog", "64"]), Ok(Command::Hog { megabytes: 64, hold: None }));
        assert_eq!(
            parse_str(&["hog", "64", "0.5"]),
            Ok(Command::Hog { megabytes: 64, hold: Some(Duration::from_millis(500)) })
        );
        assert_eq!(parse_str(&["sleep", "2"]), Ok(Command::Sleep(Duration::from_secs(2))));
    }

    #[test]
    fn rejects_bad_arguments() {
        assert!(parse_str(&[]).is_err());
        assert!(parse_str(&["frobnicate"]).is_err());
        assert!(parse_str(&["report", "extra"]).is_err());
        assert!(parse_str(&["write"]).is_err());
        assert!(parse_str(&["hog", "-1"]).is_err());
        assert!(parse_str(&["hog", "lots"]).is_err());
        assert!(parse_str(&["sleep", "-1"]).is_err());
        assert!(parse_str(&["sleep", "NaN"]).is_err());
    }

    #[test]
    fn parses_benchmark_commands() {
        assert_eq!(
            parse_str(&["dns-bench", "10.0.0.1:53", "Allowed.test.", "100"]),
            Ok(Command::DnsBench { server: "10.0.0.1:53".into(), name: "Allowed.test".into(), count: 100 })
        );
        assert_eq!(
            parse_str(&["tcp-send", "198.51.100.80:5001", "1024"]),
            Ok(Command::TcpSend { target: "198.51.100.80:5001".into(), megabytes: 1024 })
        );
        assert_eq!(parse_str(&["tcp-sink", "0.0.0.0:5001"]), Ok(Command::TcpSink("0.0.0.0:5001".into())));
    }

    #[test]
    fn rejects_bad_benchmark_arguments() {
        assert!(parse_str(&["dns-bench", "10.0.0.1:53", "allowed.test"]).is_err());
        assert!(parse_str(&["dns-bench", "10.0.0.1:53", "allowed.test", "0"]).is_err());
        assert!(parse_str(&["dns-bench", "10.0.0.1:53", "allowed.test", "-3"]).is_err());
        assert!(parse_str(&["dns-bench", "10.0.0.1:53", "", "10"]).is_err());
        assert!(parse_str(&["dns-bench", "10.0.0.1:53", "a..test", "10"]).is_err());
        assert!(parse_str(&["dns-bench", "10.0.0.1:53", "sp ace.test", "10"]).is_err());
        assert!(parse_str(&["dns-bench", "10.0.0.1:53", &format!("{}.test", "x".repeat(64)), "10"]).is_err());
        assert!(parse_str(&["tcp-send", "198.51.100.80:5001"]).is_err());
        assert!(parse_str(&["tcp-send", "198.51.100.80:5001", "lots"]).is_err());
        assert!(parse_str(&["tcp-sink"]).is_err());
        assert!(parse_str(&["tcp-sink", "a", "b"]).is_err());
    }
}
