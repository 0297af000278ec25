//! Classic BPF generation for a [`Policy`].

use super::{Action, Condition, Op, Policy, Rule, Width, invalid};
use crate::Result;

/// One `struct sock_filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

pub const LD_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
pub const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
pub const JGE: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
pub const AND: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
pub const RET: u16 = 0x06; // BPF_RET | BPF_K

pub const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
pub const RET_ALLOW: u32 = 0x7fff_0000;
pub const RET_ERRNO: u32 = 0x0005_0000;
pub const RET_KILL_PROCESS: u32 = 0x8000_0000;
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;

fn stmt(code: u16, k: u32) -> Insn {
    Insn { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: usize, jf: usize) -> Result<Insn> {
    let (Ok(jt), Ok(jf)) = (u8::try_from(jt), u8::try_from(jf)) else {
        return Err(invalid("seccomp program too large for BPF jumps".into()));
    };
    Ok(Insn { code, jt, jf, k })
}

pub fn ret(a: Action) -> Insn {
    stmt(
        RET,
        match a {
            Action::Allow => RET_ALLOW,
            Action::Errno(e) => RET_ERRNO | u32::from(e),
            Action::KillProcess => RET_KILL_PROCESS,
        },
    )
}

/// The outcome class of one syscall number.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Class {
    Fixed(Action),
    /// Decided by argument conditions (the rules of this syscall number).
    Args(u32),
}

/// Consecutive syscall numbers with one outcome: `[lo, next.lo)`.
struct Span {
    lo: u32,
    class: Class,
}

type Rules<'a> = std::collections::BTreeMap<u32, Vec<&'a Rule>>;

fn spans(policy: &Policy, rules: &Rules<'_>) -> Vec<Span> {
    let max = rules.keys().last().copied().unwrap_or(0);
    let mut out: Vec<Span> = Vec::new();
    for nr in 0..=max + 1 {
        let class = match rules.get(&nr) {
            None => Class::Fixed(policy.default),
            Some(rs) if rs.len() == 1 && rs[0].args.is_empty() => Class::Fixed(rs[0].action),
            Some(_) => Class::Args(nr),
        };
        if out.last().is_some_and(|s| s.class == class && matches!(class, Class::Fixed(_))) {
            continue;
        }
        out.push(Span { lo: nr, class });
    }
    out
}

/// The whole program.
pub fn program(policy: &Policy) -> Result<Vec<Insn>> {
    let mut p = vec![
        stmt(LD_ABS, OFF_ARCH),
        jump(JEQ, AUDIT_ARCH_X86_64, 1, 0)?,
        ret(Action::KillProcess),
        stmt(LD_ABS, OFF_NR),
        // x32 syscalls (same arch, number with bit 30 set) get the default answer.
        jump(JGE, X32_SYSCALL_BIT, 0, 1)?,
        ret(policy.default),
    ];
    let rules = policy.by_number();
    let spans = spans(policy, &rules);
    p.extend(tree(&spans, &rules, policy.default)?);
    if p.len() > 4096 {
        return Err(invalid(format!("seccomp program of {} instructions exceeds the kernel's 4096", p.len())));
    }
    Ok(p)
}

/// Binary search over spans; the accumulator holds the syscall number on entry.
fn tree(spans: &[Span], rules: &Rules<'_>, default: Action) -> Result<Vec<Insn>> {
    if let [only] = spans {
        return leaf(only.class, rules, default);
    }
    let mid = spans.len() / 2;
    let left = tree(&spans[..mid], rules, default)?;
    let right = tree(&spans[mid..], rules, default)?;
    let mut out = vec![jump(JGE, spans[mid].lo, left.len(), 0)?];
    out.extend(left);
    out.extend(right);
    Ok(out)
}

fn leaf(class: Class, rules: &Rules<'_>, default: Action) -> Result<Vec<Insn>> {
    match class {
        Class::Fixed(a) => Ok(vec![ret(a)]),
        Class::Args(nr) => {
            let mut out = Vec::new();
            for r in rules.get(&nr).map(Vec::as_slice).unwrap_or_default() {
                out.extend(rule_block(r)?);
            }
            out.push(ret(default));
            Ok(out)
        }
    }
}

/// Checks of one rule; every failed check jumps past the block (to the next rule).
fn rule_block(rule: &Rule) -> Result<Vec<Insn>> {
    let mut checks: Vec<Vec<(Insn, bool)>> = Vec::new();
    for c in &rule.args {
        checks.push(condition(c));
    }
    let total: usize = checks.iter().map(Vec::len).sum::<usize>() + 1;
    let mut out = Vec::with_capacity(total);
    for (insn, can_fail) in checks.into_iter().flatten() {
        if can_fail {
            // Jump to the first instruction after the block's final ret.
            let to_end = total - out.len() - 1;
            let mut i = insn;
            if i.jt == u8::MAX {
                // "fail when equal" (op ne)
                i.jt = u8::try_from(to_end).map_err(|_| invalid("rule too long".into()))?;
                i.jf = 0;
            } else {
                i.jf = u8::try_from(to_end).map_err(|_| invalid("rule too long".into()))?;
            }
            out.push(i);
        } else {
            out.push(insn);
        }
    }
    out.push(ret(rule.action));
    Ok(out)
}

/// Instructions for one condition; `true` marks a check that jumps away on failure.
fn condition(c: &Condition) -> Vec<(Insn, bool)> {
    let base = OFF_ARGS + 8 * u32::from(c.index);
    let mask = c.mask.unwrap_or(u64::MAX);
    let mut halves = vec![(base, c.value as u32, mask as u32)];
    if c.width == Width::Qword {
        halves.push((base + 4, (c.value >> 32) as u32, (mask >> 32) as u32));
    }
    let mut out = Vec::new();
    match c.op {
        Op::Eq | Op::MaskedEq => {
            for (off, val, m) in halves {
                out.push((stmt(LD_ABS, off), false));
                if c.op == Op::MaskedEq {
                    out.push((stmt(AND, m), false));
                }
                out.push((Insn { code: JEQ, jt: 0, jf: 0, k: val & m }, true));
            }
        }
        Op::Ne => {
            // Only the dword form exists (the parser refuses a qword `ne`).
            let (off, val, _) = halves[0];
            out.push((stmt(LD_ABS, off), false));
            out.push((Insn { code: JEQ, jt: u8::MAX, jf: 0, k: val }, true));
        }
    }
    out
}

pub fn to_bytes(prog: &[Insn]) -> Vec<u8> {
    let mut v = Vec::with_capacity(prog.len() * 8);
    for i in prog {
        v.extend_from_slice(&i.code.to_ne_bytes());
        v.push(i.jt);
        v.push(i.jf);
        v.extend_from_slice(&i.k.to_ne_bytes());
    }
    v
}
