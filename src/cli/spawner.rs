//! `agentbox __spawner --root DIR --agent PATH` (started by the daemon; not for users).

pub fn main(args: &[String]) -> i32 {
    let mut root = None;
    let mut agent = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--root" => root = it.next().cloned(),
            "--agent" => agent = it.next().cloned(),
            other => {
                eprintln!("agentbox __spawner: unexpected argument '{other}'");
                return 2;
            }
        }
    }
    let (Some(root), Some(agent)) = (root, agent) else {
        eprintln!("agentbox __spawner: needs --root DIR --agent PATH");
        return 2;
    };
    let opts = abx_sandbox::spawner::Options { root: root.into(), agent: agent.into() };
    match abx_sandbox::spawner::run(&opts) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("agentbox __spawner: {e}");
            1
        }
    }
}
