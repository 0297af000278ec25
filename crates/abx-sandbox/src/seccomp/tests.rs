use super::bpf::{self, AUDIT_ARCH_X86_64, Insn, RET_ALLOW, RET_ERRNO, RET_KILL_PROCESS};
use super::*;

/// A classic-BPF interpreter for the instructions the compiler emits.
fn run(prog: &[Insn], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
    let mut data = Vec::new();
    data.extend_from_slice(&nr.to_ne_bytes());
    data.extend_from_slice(&arch.to_ne_bytes());
    data.extend_from_slice(&0u64.to_ne_bytes());
    for a in args {
        data.extend_from_slice(&a.to_ne_bytes());
    }
    let (mut pc, mut acc) = (0usize, 0u32);
    loop {
        let i = prog[pc];
        pc += 1;
        match i.code {
            bpf::LD_ABS => {
                let k = i.k as usize;
                acc = u32::from_ne_bytes(data[k..k + 4].try_into().unwrap());
            }
            bpf::AND => acc &= i.k,
            bpf::JEQ => pc += usize::from(if acc == i.k { i.jt } else { i.jf }),
            bpf::JGE => pc += usize::from(if acc >= i.k { i.jt } else { i.jf }),
            bpf::RET => return i.k,
            c => panic!("unexpected opcode {c:#x}"),
        }
    }
}

fn default_program() -> (Policy, Vec<Insn>) {
    let p = Policy::parse(DEFAULT_POLICY).unwrap();
    let prog = bpf::program(&p).unwrap();
    (p, prog)
}

fn nr(name: &str) -> u32 {
    number(name).unwrap()
}

const EPERM: u32 = RET_ERRNO | 1;

#[test]
fn program_is_compact() {
    let (_, prog) = default_program();
    assert!(prog.len() < 200, "program has {} instructions", prog.len());
}

#[test]
fn every_syscall_number_gets_the_policy_answer() {
    let (policy, prog) = default_program();
    let rules = policy.by_number();
    for n in 0..600u32 {
        let got = run(&prog, n, AUDIT_ARCH_X86_64, [0; 6]);
        let want = match rules.get(&n) {
            None => bpf::ret(policy.default).k,
            Some(rs) => rs
                .iter()
                .find(|r| {
                    r.args.iter().all(|c| match c.op {
                        Op::Eq => c.value == 0,
                        Op::Ne => c.value != 0,
                        Op::MaskedEq => c.value & c.mask.unwrap() == 0,
                    })
                })
                .map(|r| bpf::ret(r.action).k)
                .unwrap_or(bpf::ret(policy.default).k),
        };
        assert_eq!(got, want, "syscall {n}");
    }
}

#[test]
fn dangerous_syscalls_are_refused_and_common_ones_allowed() {
    let (_, prog) = default_program();
    for name in [
        "io_uring_setup",
        "bpf",
        "userfaultfd",
        "perf_event_open",
        "keyctl",
        "mount",
        "unshare",
        "setns",
        "kexec_load",
        "init_module",
        "open_tree",
        "fsopen",
        "pivot_root",
        "reboot",
        "open_by_handle_at",
    ] {
        assert_eq!(run(&prog, nr(name), AUDIT_ARCH_X86_64, [0; 6]), EPERM, "{name}");
    }
    for name in ["read", "write", "openat", "execve", "mmap", "futex", "exit_group", "socket", "wait4"] {
        assert_eq!(run(&prog, nr(name), AUDIT_ARCH_X86_64, [0; 6]), RET_ALLOW, "{name}");
    }
    assert_eq!(run(&prog, nr("clone3"), AUDIT_ARCH_X86_64, [0; 6]), RET_ERRNO | 38);
}

#[test]
fn clone_may_not_create_namespaces() {
    let (_, prog) = default_program();
    let thread_flags = 0x3d0f00u64; // CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|CHILD_CLEARTID
    assert_eq!(run(&prog, nr("clone"), AUDIT_ARCH_X86_64, [thread_flags, 0, 0, 0, 0, 0]), RET_ALLOW);
    for ns in [0x1000_0000u64, 0x2_0000, 0x4000_0000, 0x2000_0000, 0x0800_0000, 0x0400_0000, 0x0200_0000] {
        assert_eq!(run(&prog, nr("clone"), AUDIT_ARCH_X86_64, [0x11 | ns, 0, 0, 0, 0, 0]), EPERM, "flag {ns:#x}");
    }
}

#[test]
fn personality_only_harmless_values() {
    let (_, prog) = default_program();
    for ok in [0u64, 8, 0x20000, 0xffff_ffff] {
        assert_eq!(run(&prog, nr("personality"), AUDIT_ARCH_X86_64, [ok, 0, 0, 0, 0, 0]), RET_ALLOW, "{ok:#x}");
    }
    assert_eq!(run(&prog, nr("personality"), AUDIT_ARCH_X86_64, [0x0040_0000, 0, 0, 0, 0, 0]), EPERM);
}

#[test]
fn foreign_architecture_is_killed_and_x32_refused() {
    let (_, prog) = default_program();
    assert_eq!(run(&prog, 0, 0x4000_0003, [0; 6]), RET_KILL_PROCESS);
    assert_eq!(run(&prog, 0x4000_0000, AUDIT_ARCH_X86_64, [0; 6]), EPERM);
}

#[test]
fn policy_errors_name_the_problem() {
    let bad = |json: &str| compile(json).unwrap_err().to_string() + &format!("{:?}", compile(json).unwrap_err());
    assert!(
        bad(r#"{"default": {"errno": 1}, "rules": [{"syscall": "nosuch", "action": "allow", "comment": "x"}]}"#)
            .contains("nosuch")
    );
    assert!(
        bad(r#"{"default": {"errno": 1}, "rules": [{"syscall": "read", "action": "allow", "comment": " "}]}"#)
            .contains("comment")
    );
    assert!(
        bad(r#"{"default": {"errno": 1}, "rules": [{"syscall": "read", "action": "allow", "comment": "x",
        "args": [{"index": 7, "type": "dword", "op": "eq", "value": 0}]}]}"#)
        .contains("index")
    );
}

#[test]
fn every_rule_of_the_default_policy_has_a_comment() {
    let v: serde_json::Value = serde_json::from_str(DEFAULT_POLICY).unwrap();
    for r in v["rules"].as_array().unwrap() {
        assert!(r["comment"].as_str().is_some_and(|c| !c.trim().is_empty()), "{r}");
    }
}
