//! Acting as a sandbox user for file operations.
//!
//! The agent switches the *calling thread's* filesystem uid/gid and supplementary groups
//! (raw per-thread syscalls, see `abx_sys::process`) around synchronous file system calls,
//! and switches back when the [`Guard`] drops. The guard is `!Send`, so holding it across
//! an `.await` in a spawned task does not compile: no other request can ever run with a
//! borrowed identity. With a non-zero fsuid the kernel also masks the file capabilities
//! (`CAP_DAC_OVERRIDE`, `CAP_CHOWN`, `CAP_FOWNER`, ...), so permission checks are those of
//! the user, and files and directories created meanwhile belong to the user.

use std::marker::PhantomData;

use abx_sys::agent::thread_fs_ids;
use abx_sys::process::{set_thread_fs_ids, set_thread_groups};

use crate::error::Error;
use crate::users::User;

/// The identity the agent started with, restored after every switch.
#[derive(Debug, Clone)]
pub struct Base {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

impl Base {
    /// Records the calling thread's filesystem ids and supplementary groups.
    pub fn capture() -> Base {
        let (uid, gid) = thread_fs_ids();
        let groups =
            rustix::process::getgroups().map(|g| g.into_iter().map(|g| g.as_raw()).collect()).unwrap_or_default();
        Base { uid, gid, groups }
    }

    /// Acts as `user` until the guard drops. Root (uid 0, gid 0) keeps the agent's own
    /// identity.
    pub fn enter(&self, user: &User) -> Result<Guard<'_>, Error> {
        let guard = Guard { base: self, switched: false, _not_send: PhantomData };
        if user.is_root() {
            return Ok(guard);
        }
        let guard = Guard { switched: true, ..guard };
        set_thread_groups(&user.groups).map_err(|source| Error::SwitchUser { user: user.name.clone(), source })?;
        set_thread_fs_ids(user.uid, user.gid);
        if thread_fs_ids() != (user.uid, user.gid) {
            let source = std::io::Error::from_raw_os_error(rustix::io::Errno::PERM.raw_os_error());
            return Err(Error::SwitchUser { user: user.name.clone(), source });
        }
        Ok(guard)
    }
}

/// Restores the agent's identity on drop.
#[derive(Debug)]
pub struct Guard<'a> {
    base: &'a Base,
    switched: bool,
    /// Keeps the guard on the thread whose identity it changed.
    _not_send: PhantomData<*const ()>,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if self.switched {
            set_thread_fs_ids(self.base.uid, self.base.gid);
            let _ = set_thread_groups(&self.base.groups);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(uid: u32) -> User {
        User { name: format!("u{uid}"), uid, gid: uid, groups: vec![uid], home: "/".into(), shell: None }
    }

    #[test]
    fn root_is_a_no_op() {
        let base = Base::capture();
        let before = thread_fs_ids();
        drop(base.enter(&user(0)).unwrap());
        assert_eq!(thread_fs_ids(), before);
    }

    #[test]
    fn switches_and_restores_when_privileged() {
        let base = Base::capture();
        if base.uid != 0 {
            return; // needs CAP_SETUID; the integration tests cover this as root
        }
        // Run on a fresh thread so no other test on this thread sees the switch.
        std::thread::spawn(move || {
            let before = thread_fs_ids();
            {
                let _g = base.enter(&user(65534)).unwrap();
                assert_eq!(thread_fs_ids(), (65534, 65534));
            }
            assert_eq!(thread_fs_ids(), before);
        })
        .join()
        .unwrap();
    }
}
