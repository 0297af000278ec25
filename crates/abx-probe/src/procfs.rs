//! Parsers for the `/proc` and `/sys` texts the report reads; pure, so unit-tested.

use serde_json::{Value, json};

/// The value of `key` in `/proc/<pid>/status` text (`"CapEff:\t000001ff…"` → `"000001ff…"`).
pub fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k == key).then(|| v.trim())
    })
}

/// One line of `/proc/<pid>/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: String,
    pub fstype: String,
    pub source: String,
    /// Per-mount options (`rw,nosuid,relatime`).
    pub options: String,
}

impl Mount {
    pub fn to_json(&self) -> Value {
        json!({
            "mount_point": self.mount_point,
            "fstype": self.fstype,
            "source": self.source,
            "options": self.options,
        })
    }
}

/// Parses `/proc/<pid>/mountinfo`:
/// `36 35 98:0 /root /mnt rw,noatime master:1 - ext3 /dev/root rw,errors=continue`.
/// Malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields.iter().skip(6).position(|f| *f == "-")? + 6;
    Some(Mount {
        mount_point: unescape(fields.get(4)?),
        options: (*fields.get(5)?).to_owned(),
        fstype: unescape(fields.get(sep + 1)?),
        source: unescape(fields.get(sep + 2)?),
    })
}

/// Undoes the kernel's octal escapes in mountinfo (`\040` for a space, `\134` for `\`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal =
            bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |acc, c| acc.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Interface names from `/proc/net/dev` (two header lines, then `  eth0: 123 …`).
pub fn parse_net_dev(text: &str) -> Vec<String> {
    text.lines()
        .skip(2)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, _)| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .collect()
}

/// The entries of `names` that are process ids, sorted.
pub fn pids<I: IntoIterator<Item = String>>(names: I) -> Vec<u32> {
    let mut pids: Vec<u32> = names.into_iter().filter_map(|n| n.parse().ok()).collect();
    pids.sort_unstable();
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_fields() {
        let status = "Name:\tabx-probe\nCapEff:\t000001ffffffffff\nNoNewPrivs:\t1\nSeccomp:\t2\n";
        assert_eq!(status_field(status, "CapEff"), Some("000001ffffffffff"));
        assert_eq!(status_field(status, "Seccomp"), Some("2"));
        assert_eq!(status_field(status, "CapBnd"), None);
    }

    #[test]
    fn parses_mountinfo_with_optional_fields_and_escapes() {
        let text = "\
22 1 0:21 / / rw,relatime shared:1 - overlay overlay rw,lowerdir=/l
23 22 0:22 / /proc rw,nosuid,nodev,noexec - proc proc rw
24 22 0:23 / /tmp/with\\040space rw master:3 shared:4 - tmpfs my\\134src rw
bad line
";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[0].mount_point, "/");
        assert_eq!(mounts[0].fstype, "overlay");
        assert_eq!(mounts[1].options, "rw,nosuid,nodev,noexec");
        assert_eq!(mounts[2].mount_point, "/tmp/with space");
        assert_eq!(mounts[2].fstype, "tmpfs");
        assert_eq!(mounts[2].source, "my\\src");
    }

    #[test]
    fn parses_net_dev() {
        let text = "Inter-|   Receive\n face |bytes\n    lo: 1 2 3\n  eth0: 4 5 6\n";
        assert_eq!(parse_net_dev(text), vec!["lo", "eth0"]);
    }

    #[test]
    fn keeps_only_numeric_names_sorted() {
        let names = ["self", "12", "1", "sys", "3"].map(String::from);
        assert_eq!(pids(names), vec![1, 3, 12]);
    }
}
