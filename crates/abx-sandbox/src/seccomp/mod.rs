//! The seccomp policy is data: a JSON file with one comment per rule
//! (`policy/seccomp-default.json`), compiled here into one compact classic-BPF program.
//!
//! The program checks the architecture, then finds the syscall number with a binary search
//! over ranges of numbers that share an outcome, so it stays a few dozen instructions long.
//! That matters twice: the kernel emulates a filter once per syscall number when it is
//! loaded (to build its allow cache), so a linear allowlist of ~300 rules cost ~650 µs per
//! sandbox; and syscalls whose answer depends on arguments run the filter at every call.
//!
//! Policy format:
//! ```json
//! { "default": {"errno": 1},
//!   "rules": [ {"syscall": "read", "action": "allow", "comment": "..."},
//!              {"syscall": "clone", "action": "allow", "comment": "...",
//!               "args": [{"index": 0, "type": "qword", "op": "masked_eq", "mask": 2114060288, "value": 0}]},
//!              {"syscall": "clone3", "action": {"errno": 38}, "comment": "..."} ] }
//! ```
//! Several rules for one syscall are alternatives, tried in order; the conditions of one
//! rule must all hold. Every rule needs a non-empty comment. Only x86_64 is supported.

mod bpf;
#[cfg(target_arch = "x86_64")]
mod x86_64;

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::{Error, Result};

/// The default policy, embedded.
pub const DEFAULT_POLICY: &str = include_str!("../../policy/seccomp-default.json");

/// What a rule (or the default) answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Errno(u16),
    KillProcess,
}

/// How an argument is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Eq,
    Ne,
    MaskedEq,
}

/// Width of the compared argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Width {
    /// The low 32 bits.
    Dword,
    Qword,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub index: u8,
    #[serde(rename = "type")]
    pub width: Width,
    pub op: Op,
    #[serde(default)]
    pub mask: Option<u64>,
    pub value: u64,
    #[serde(default)]
    pub comment: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub syscall: String,
    pub action: Action,
    #[serde(default)]
    pub args: Vec<Condition>,
    pub comment: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Policy {
    pub default: Action,
    pub rules: Vec<Rule>,
}

fn invalid(msg: String) -> Error {
    Error::Seccomp(msg.into())
}

impl Policy {
    /// Parses and checks a policy (keys starting with `_` are comments).
    pub fn parse(json: &str) -> Result<Policy> {
        let mut v: serde_json::Value = serde_json::from_str(json).map_err(|e| Error::Seccomp(Box::new(e)))?;
        if let Some(m) = v.as_object_mut() {
            m.retain(|k, _| !k.starts_with('_'));
        }
        let p: Policy = serde_json::from_value(v).map_err(|e| Error::Seccomp(Box::new(e)))?;
        for r in &p.rules {
            if r.comment.trim().is_empty() {
                return Err(invalid(format!("rule for '{}' has no comment", r.syscall)));
            }
            if number(&r.syscall).is_none() {
                return Err(invalid(format!("unknown syscall '{}'", r.syscall)));
            }
            for c in &r.args {
                if c.index > 5 {
                    return Err(invalid(format!("rule for '{}': argument index {} is not 0-5", r.syscall, c.index)));
                }
                if c.op == Op::Ne && c.width == Width::Qword {
                    return Err(invalid(format!("rule for '{}': op ne is only supported with type dword", r.syscall)));
                }
                if (c.op == Op::MaskedEq) != c.mask.is_some() {
                    return Err(invalid(format!(
                        "rule for '{}': a mask goes with op masked_eq, and only with it",
                        r.syscall
                    )));
                }
            }
        }
        Ok(p)
    }

    /// Rules grouped by syscall number, in file order.
    fn by_number(&self) -> BTreeMap<u32, Vec<&Rule>> {
        let mut m: BTreeMap<u32, Vec<&Rule>> = BTreeMap::new();
        for r in &self.rules {
            if let Some(nr) = number(&r.syscall) {
                m.entry(nr).or_default().push(r);
            }
        }
        m
    }
}

/// The number of a syscall on this architecture.
pub fn number(name: &str) -> Option<u32> {
    #[cfg(target_arch = "x86_64")]
    {
        x86_64::SYSCALLS.iter().find(|(n, _)| *n == name).map(|(_, nr)| *nr)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = name;
        None
    }
}

/// Compiles a policy into raw BPF programs (8-byte `sock_filter`s) in load order (one).
pub fn compile(policy_json: &str) -> Result<Vec<Vec<u8>>> {
    if !cfg!(target_arch = "x86_64") {
        return Err(invalid(format!("seccomp policies are only supported on x86_64, not {}", std::env::consts::ARCH)));
    }
    let policy = Policy::parse(policy_json)?;
    let prog = bpf::program(&policy)?;
    Ok(vec![bpf::to_bytes(&prog)])
}

#[cfg(test)]
mod tests;
