//! agentbox integration tests: real daemons, real namespaces, cgroups, mounts and seccomp.
//! Run as root (scripts/test builds the static agent and verifier first).

mod api;
mod builds;
mod cli;
mod e2b;
mod e2b_js;
mod exec;
mod fakenet;
mod files;
mod harness;
mod isolation;
mod lifecycle;
mod mcp;
mod network;
mod pools;
mod registry;
mod restart;
mod snapshots;
mod storage;
mod templates;
