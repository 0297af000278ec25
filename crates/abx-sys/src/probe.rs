//! Syscalls an in-sandbox verifier tries, expecting the sandbox to refuse them.
