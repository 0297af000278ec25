//! The seccomp policy is data: a JSON file in seccompiler's format with one comment per
//! rule (`policy/seccomp-default.json`). It holds two filters, loaded in this order:
//! `allow` (an allowlist answering EPERM to everything else) and `enosys` (answers ENOSYS
//! for clone3 so libc falls back to clone, whose flags the allowlist can inspect). When two
//! filters both answer with an errno, the kernel takes the most recently loaded one.

use crate::{Error, Result};

/// The default policy, embedded.
pub const DEFAULT_POLICY: &str = include_str!("../policy/seccomp-default.json");

/// Filter names in load order.
const ORDER: [&str; 2] = ["allow", "enosys"];

/// Compiles a policy into raw BPF programs (8-byte `sock_filter`s), in load order.
pub fn compile(policy_json: &str) -> Result<Vec<Vec<u8>>> {
    let mut value: serde_json::Value =
        serde_json::from_str(policy_json).map_err(|e| Error::Seccomp(Box::new(e)))?;
    let map = value.as_object_mut().ok_or_else(|| Error::Seccomp("policy must be a JSON object".into()))?;
    map.retain(|k, _| !k.starts_with('_'));
    for name in map.keys() {
        if !ORDER.contains(&name.as_str()) {
            return Err(Error::Seccomp(format!("unknown filter '{name}' (expected {ORDER:?})").into()));
        }
    }
    let arch = seccompiler::TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| Error::Seccomp(Box::new(e)))?;
    let text = serde_json::to_vec(&value).map_err(|e| Error::Seccomp(Box::new(e)))?;
    let mut programs = seccompiler::compile_from_json(text.as_slice(), arch).map_err(|e| Error::Seccomp(Box::new(e)))?;
    let mut out = Vec::new();
    for name in ORDER {
        if let Some(prog) = programs.remove(name) {
            out.push(to_bytes(&prog));
        }
    }
    if out.is_empty() {
        return Err(Error::Seccomp("policy defines no filter".into()));
    }
    Ok(out)
}

fn to_bytes(prog: &[seccompiler::sock_filter]) -> Vec<u8> {
    let mut v = Vec::with_capacity(prog.len() * 8);
    for f in prog {
        v.extend_from_slice(&f.code.to_ne_bytes());
        v.push(f.jt);
        v.push(f.jf);
        v.extend_from_slice(&f.k.to_ne_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_compiles_to_two_programs() {
        let progs = compile(DEFAULT_POLICY).unwrap();
        assert_eq!(progs.len(), 2);
        assert!(progs.iter().all(|p| !p.is_empty() && p.len() % 8 == 0));
    }

    #[test]
    fn default_policy_refuses_dangerous_syscalls() {
        let v: serde_json::Value = serde_json::from_str(DEFAULT_POLICY).unwrap();
        let allowed: Vec<&str> =
            v["allow"]["filter"].as_array().unwrap().iter().map(|r| r["syscall"].as_str().unwrap()).collect();
        for denied in [
            "io_uring_setup", "io_uring_enter", "bpf", "userfaultfd", "perf_event_open", "keyctl", "add_key",
            "kexec_load", "init_module", "finit_module", "mount", "umount2", "pivot_root", "unshare", "setns",
            "open_tree", "move_mount", "fsopen", "mount_setattr", "clone3", "open_by_handle_at", "reboot",
        ] {
            assert!(!allowed.contains(&denied), "{denied} must not be allowed");
        }
        for rule in v["allow"]["filter"].as_array().unwrap() {
            assert!(rule["comment"].as_str().is_some_and(|c| !c.is_empty()), "rule without comment: {rule}");
        }
    }

    #[test]
    fn unknown_syscall_and_filter_names_are_errors() {
        let bad = r#"{"allow": {"mismatch_action": {"errno": 1}, "match_action": "allow", "filter": [{"syscall": "nosuchcall"}]}}"#;
        assert!(compile(bad).is_err());
        let bad = r#"{"other": {"mismatch_action": "allow", "match_action": {"errno": 1}, "filter": []}}"#;
        assert!(compile(bad).unwrap_err().to_string().contains("invalid"));
    }
}
