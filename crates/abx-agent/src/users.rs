//! Users and groups, read from the sandbox's own `/etc/passwd` and `/etc/group` (never
//! through libc's NSS, which a static musl binary does not have and which could load code
//! from the sandbox).
//!
//! A user is named as `name`, `uid`, or `user:group` where either side is a name or a
//! number. Decisions where the protocol leaves room:
//! * no user (or an empty string) means root: uid 0, gid 0, home and shell from the uid 0
//!   passwd entry, or home `/` when there is none;
//! * a numeric uid without a passwd entry is accepted (ids are what the kernel checks):
//!   its gid is the same number unless given, its home `/`, its name the number;
//! * supplementary groups are the primary gid plus every `/etc/group` entry that lists
//!   the user's name.

use std::io::Read;

use crate::error::Error;

/// The files are read whole; anything beyond this is ignored.
const MAX_DB_FILE: u64 = 8 << 20;

/// A resolved user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, the primary gid first.
    pub groups: Vec<u32>,
    pub home: String,
    pub shell: Option<String>,
}

impl User {
    /// Whether this is uid 0 with gid 0, which needs no switching.
    pub fn is_root(&self) -> bool {
        self.uid == 0 && self.gid == 0
    }
}

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// Parses `/etc/passwd` text, skipping comments and malformed lines.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines().filter_map(passwd_line).collect()
}

fn passwd_line(line: &str) -> Option<PasswdEntry> {
    if line.starts_with('#') {
        return None;
    }
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 7 || f[0].is_empty() {
        return None;
    }
    Some(PasswdEntry {
        name: f[0].to_owned(),
        uid: f[2].parse().ok()?,
        gid: f[3].parse().ok()?,
        home: f[5].to_owned(),
        shell: f[6].to_owned(),
    })
}

/// Parses `/etc/group` text, skipping comments and malformed lines.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines().filter_map(group_line).collect()
}

fn group_line(line: &str) -> Option<GroupEntry> {
    if line.starts_with('#') {
        return None;
    }
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 4 || f[0].is_empty() {
        return None;
    }
    let members = f[3].split(',').map(str::trim).filter(|m| !m.is_empty()).map(str::to_owned).collect();
    Some(GroupEntry { name: f[0].to_owned(), gid: f[2].parse().ok()?, members })
}

/// The user and group databases of the sandbox.
#[derive(Debug, Default, Clone)]
pub struct Db {
    passwd: Vec<PasswdEntry>,
    group: Vec<GroupEntry>,
}

impl Db {
    /// Reads `/etc/passwd` and `/etc/group`; a missing or unreadable file is empty.
    pub fn load() -> Db {
        Db::from_text(&read_small("/etc/passwd"), &read_small("/etc/group"))
    }

    pub fn from_text(passwd: &str, group: &str) -> Db {
        Db { passwd: parse_passwd(passwd), group: parse_group(group) }
    }

    /// Resolves a user spec (see the module docs).
    pub fn resolve(&self, spec: Option<&str>) -> Result<User, Error> {
        let spec = spec.unwrap_or("");
        if spec.is_empty() {
            return Ok(self.root());
        }
        let (user_part, group_part) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        let mut user = self.user(user_part)?;
        if let Some(g) = group_part {
            user.gid = self.group_id(g)?;
        }
        // Sandboxes map 65536 ids: only a larger one can be unmapped (then setuid would
        // fail with a bare EINVAL), so only then are the maps read.
        for (what, id, map) in [("uid", user.uid, "/proc/self/uid_map"), ("gid", user.gid, "/proc/self/gid_map")] {
            if id > u16::MAX as u32
                && let Some(highest) = unmapped(map, id)
            {
                return Err(Error::Invalid(format!(
                    "user '{spec}': {what} {id} does not exist in this sandbox (its {what}s are 0 to {highest})"
                )));
            }
        }
        user.groups = self.groups_of(&user.name, user.gid);
        Ok(user)
    }

    fn root(&self) -> User {
        let mut user = match self.passwd.iter().find(|e| e.uid == 0) {
            Some(e) => from_entry(e),
            None => User { name: "root".into(), uid: 0, gid: 0, groups: vec![], home: "/".into(), shell: None },
        };
        user.gid = 0;
        user.groups = self.groups_of(&user.name, 0);
        user
    }

    fn user(&self, part: &str) -> Result<User, Error> {
        if let Ok(uid) = part.parse::<u32>() {
            return Ok(match self.passwd.iter().find(|e| e.uid == uid) {
                Some(e) => from_entry(e),
                None => User { name: part.into(), uid, gid: uid, groups: vec![], home: "/".into(), shell: None },
            });
        }
        match self.passwd.iter().find(|e| e.name == part) {
            Some(e) => Ok(from_entry(e)),
            None => Err(Error::UnknownUser(part.to_owned())),
        }
    }

    fn group_id(&self, part: &str) -> Result<u32, Error> {
        if let Ok(gid) = part.parse::<u32>() {
            return Ok(gid);
        }
        match self.group.iter().find(|g| g.name == part) {
            Some(g) => Ok(g.gid),
            None => Err(Error::UnknownGroup(part.to_owned())),
        }
    }

    fn groups_of(&self, name: &str, primary: u32) -> Vec<u32> {
        let mut groups = vec![primary];
        for g in self.group.iter().filter(|g| g.members.iter().any(|m| m == name)) {
            if !groups.contains(&g.gid) {
                groups.push(g.gid);
            }
        }
        groups
    }
}

fn from_entry(e: &PasswdEntry) -> User {
    let home = if e.home.is_empty() { "/".to_owned() } else { e.home.clone() };
    let shell = (!e.shell.is_empty()).then(|| e.shell.clone());
    User { name: e.name.clone(), uid: e.uid, gid: e.gid, groups: vec![], home, shell }
}

fn read_small(path: &str) -> String {
    let mut text = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        // Room for a usual passwd or group file at once: `Take` gives `read_to_end` no
        // size hint, and from an empty vector it reads 32 bytes, then 32, 64, ... (seven
        // reads for a stock passwd, on every exec).
        let mut bytes = Vec::with_capacity(8192);
        let _ = f.take(MAX_DB_FILE).read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    text
}

/// `Some(highest mapped id)` if `id` is not mapped in the id map file `map` (the user
/// namespace's `uid_map` or `gid_map`); `None` if it is, or the map cannot be read.
fn unmapped(map: &str, id: u32) -> Option<u64> {
    unmapped_in(&std::fs::read_to_string(map).ok()?, id)
}

fn unmapped_in(text: &str, id: u32) -> Option<u64> {
    let mut highest = None;
    for line in text.lines() {
        let mut f = line.split_whitespace().map(str::parse::<u64>);
        let (Some(Ok(inside)), Some(Ok(_)), Some(Ok(len))) = (f.next(), f.next(), f.next()) else { continue };
        if len == 0 {
            continue;
        }
        if (inside..inside + len).contains(&u64::from(id)) {
            return None;
        }
        highest = Some(highest.unwrap_or(0).max(inside + len - 1));
    }
    highest
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/bash
# a comment
broken line
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
alice:x:1000:1000:Alice,,,:/home/alice:/bin/zsh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
";
    const GROUP: &str = "\
root:x:0:
sudo:x:27:alice
staff:x:50:bob, alice
alice:x:1000:
nogroup:x:65534:
";

    fn db() -> Db {
        Db::from_text(PASSWD, GROUP)
    }

    #[test]
    fn parses_passwd_and_skips_junk() {
        let entries = parse_passwd(PASSWD);
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[2].name, "alice");
        assert_eq!(entries[2].home, "/home/alice");
        assert_eq!(entries[2].shell, "/bin/zsh");
    }

    #[test]
    fn parses_group_members() {
        let groups = parse_group(GROUP);
        assert_eq!(groups[2].members, vec!["bob", "alice"]);
        assert!(groups[0].members.is_empty());
    }

    #[test]
    fn resolves_names_with_supplementary_groups() {
        let u = db().resolve(Some("alice")).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.groups, vec![1000, 27, 50]);
        assert_eq!(u.shell.as_deref(), Some("/bin/zsh"));
    }

    #[test]
    fn resolves_uids_and_uid_gid_pairs() {
        let u = db().resolve(Some("65534")).unwrap();
        assert_eq!(u.name, "nobody");
        let u = db().resolve(Some("4242")).unwrap();
        assert_eq!((u.name.as_str(), u.uid, u.gid, u.home.as_str()), ("4242", 4242, 4242, "/"));
        let u = db().resolve(Some("1000:staff")).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 50));
        assert_eq!(u.groups, vec![50, 27]);
        let u = db().resolve(Some("alice:7")).unwrap();
        assert_eq!(u.gid, 7);
    }

    #[test]
    fn defaults_to_root() {
        let u = db().resolve(None).unwrap();
        assert!(u.is_root());
        assert_eq!(u.home, "/root");
        let bare = Db::default().resolve(Some("")).unwrap();
        assert_eq!((bare.name.as_str(), bare.home.as_str()), ("root", "/"));
    }

    #[test]
    fn unknown_names_are_not_found() {
        assert_eq!(db().resolve(Some("mallory")).unwrap_err().to_string(), "user 'mallory' not found");
        assert_eq!(db().resolve(Some("alice:wheel")).unwrap_err().to_string(), "group 'wheel' not found");
    }

    #[test]
    fn ids_outside_the_user_namespace_map_are_found() {
        let sandbox = "         0    1000000      65536\n";
        assert_eq!(unmapped_in(sandbox, 65535), None);
        assert_eq!(unmapped_in(sandbox, 65536), Some(65535));
        assert_eq!(unmapped_in("0 0 4294967295\n", 4_000_000_000), None, "the host's map has every id");
        assert_eq!(unmapped_in("0 100 10\n1000 200 1\n", 1000), None);
        assert_eq!(unmapped_in("0 100 10\n1000 200 1\n", 2000), Some(1000));
    }
}
