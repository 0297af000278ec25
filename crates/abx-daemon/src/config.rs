//! Daemon configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use abx_api::Limits;

use crate::storage::DataMode;

/// Where the API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket, mode 0600 (root only).
    Unix(PathBuf),
    /// TCP; every request needs an API key.
    Tcp(SocketAddr),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/agentbox/agentbox.sock".into());
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            return a
                .parse()
                .map(Listen::Tcp)
                .map_err(|_| format!("invalid TCP address '{a}', e.g. tcp:127.0.0.1:8080"));
        }
        Err(format!("invalid listen address '{s}': use unix:PATH or tcp:ADDR:PORT"))
    }
}

/// Everything the daemon needs to know.
#[derive(Debug, Clone)]
pub struct Config {
    /// State root: sandboxes, layers, templates, the database.
    pub root: PathBuf,
    pub listen: Vec<Listen>,
    /// Prefix of every host object this daemon creates (starts with `abx`).
    pub prefix: String,
    /// First host uid handed to sandboxes, and how many 65536-uid slots follow it.
    pub uid_start: u32,
    pub uid_slots: u32,
    /// The guest agent binary.
    pub agent: PathBuf,
    /// The agentbox binary (started as the spawner).
    pub exe: PathBuf,
    /// Machine-wide build cache (shared by daemons).
    pub cache_dir: PathBuf,
    /// Seccomp policy file (default: the embedded policy).
    pub seccomp_policy: Option<PathBuf>,
    /// Timeout of sandboxes that do not ask for one (None: no timeout).
    pub default_timeout: Option<Duration>,
    pub default_limits: Limits,
    pub default_template: String,
    /// Where sandbox data (overlay upper and work directories) lives.
    pub data: DataMode,
    /// Size of the data image (None: half the free space, see `storage`).
    pub data_size: Option<u64>,
    /// How many slots keep a prepared shell (namespaces made, waiting for a sandbox).
    pub prewarm: usize,
    /// Networking (None: sandboxes get loopback only).
    pub network: Option<crate::net::NetConfig>,
    /// Pause running sandboxes after this long without a request or an attached exec.
    pub idle_pause: Option<Duration>,
}

/// Size of each sandbox's uid range.
pub const UID_RANGE: u32 = 65536;

impl Config {
    /// Defaults for a root, before command-line overrides.
    pub fn new(root: PathBuf, exe: PathBuf, agent: PathBuf) -> Self {
        Config {
            root,
            listen: vec![Listen::Unix(PathBuf::from("/run/agentbox/agentbox.sock"))],
            prefix: "abx".into(),
            uid_start: 1 << 27,
            uid_slots: 4096,
            agent,
            exe,
            cache_dir: PathBuf::from("/var/cache/agentbox"),
            seccomp_policy: None,
            default_timeout: Some(Duration::from_secs(3600)),
            default_limits: Limits {
                memory_bytes: Some(1 << 30),
                cpus: None,
                pids: Some(1024),
                open_files: Some(4096),
            },
            default_template: "base".into(),
            data: DataMode::Auto,
            data_size: None,
            prewarm: 2,
            network: Some(crate::net::NetConfig::defaults()),
            idle_pause: None,
        }
    }

    /// Checks values that would otherwise fail later and obscurely.
    pub fn validate(&self) -> Result<(), String> {
        let p = &self.prefix;
        if !p.starts_with("abx") || p.len() > 16 || !p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
            return Err(format!("invalid prefix '{p}': must start with 'abx', use a-z and 0-9, at most 16 characters"));
        }
        if self.uid_slots == 0 {
            return Err("--uid-slots must be at least 1".into());
        }
        let end = u64::from(self.uid_start) + u64::from(self.uid_slots) * u64::from(UID_RANGE);
        if self.uid_start < 65536 || end > u64::from(u32::MAX - 1) {
            return Err(format!(
                "uid range {}+{}x{UID_RANGE} must lie between 65536 and 2^32-2",
                self.uid_start, self.uid_slots
            ));
        }
        if !self.root.is_absolute() {
            return Err(format!("state root {} must be an absolute path", self.root.display()));
        }
        if let Some(s) = self.data_size
            && s < 64 << 20
        {
            return Err(format!("--data-size {s} is too small: the data image needs at least 64M"));
        }
        if let Some(n) = &self.network {
            n.validate(&self.prefix, self.uid_slots)?;
        }
        if self.listen.is_empty() {
            return Err("at least one --listen address is needed".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_addresses() {
        assert_eq!("unix:/a/b".parse::<Listen>().unwrap(), Listen::Unix("/a/b".into()));
        assert_eq!("tcp:127.0.0.1:9".parse::<Listen>().unwrap(), Listen::Tcp("127.0.0.1:9".parse().unwrap()));
        assert!("tcp:nope".parse::<Listen>().unwrap_err().contains("nope"));
        assert!("http://x".parse::<Listen>().is_err());
    }

    #[test]
    fn validates_prefix_and_uid_range() {
        let mut c = Config::new("/r".into(), "/e".into(), "/a".into());
        assert!(c.validate().is_ok());
        c.prefix = "box".into();
        assert!(c.validate().unwrap_err().contains("abx"));
        c.prefix = "abxt1".into();
        c.uid_start = u32::MAX - 10;
        assert!(c.validate().unwrap_err().contains("uid range"));
    }

    #[test]
    fn validates_the_network() {
        let mut c = Config::new("/r".into(), "/e".into(), "/a".into());
        let mut n = crate::net::NetConfig::defaults();
        n.subnet = "10.1.0.0/28".parse().unwrap();
        c.network = Some(n.clone());
        assert!(c.validate().unwrap_err().contains("addresses for 13 sandboxes"));
        c.uid_slots = 10;
        assert!(c.validate().is_ok());
        n.subnet = "192.0.2.0/25".parse().unwrap();
        c.network = Some(n.clone());
        assert!(c.validate().unwrap_err().contains("overlaps"));
        n.subnet = "10.1.0.0/16".parse().unwrap();
        c.network = Some(n);
        c.prefix = "abxabcdefghijkl".into();
        assert!(c.validate().unwrap_err().contains("15"));
        c.network = None;
        assert!(c.validate().is_ok());
    }
}
