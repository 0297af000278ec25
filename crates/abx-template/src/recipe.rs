//! Recipes: what a template is built from, and the defaults each gives its template.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::meta::TemplateConfig;

/// Debian mirror of the `base` recipe.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Debian suite of the `base` recipe (Debian 12).
pub const DEFAULT_SUITE: &str = "bookworm";
/// Packages the `base` recipe adds to debootstrap's minbase variant. Besides the required
/// bash, coreutils, python3, nodejs, git, curl and ca-certificates it adds a few small
/// essentials agents reach for: procps (ps, top), less, iproute2 (ip, ss) and netbase
/// (/etc/services and /etc/protocols, which Python's socket module reads).
pub const BASE_PACKAGES: [&str; 11] = [
    "bash",
    "coreutils",
    "python3",
    "nodejs",
    "git",
    "curl",
    "ca-certificates",
    "procps",
    "less",
    "iproute2",
    "netbase",
];

/// The fixed time (2023-06-10T00:00:00Z, the Debian 12 release) that built trees are clamped
/// to and that `SOURCE_DATE_EPOCH` is set to while building.
pub const SOURCE_DATE_EPOCH: i64 = 1_686_355_200;

/// `PATH` given to sandboxes of the Debian-based templates.
const DEBIAN_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How to build a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recipe {
    /// Debian via `debootstrap --variant=minbase`, plus `packages` and a user `user`
    /// (uid/gid 1000). Cached machine-wide by its inputs.
    Base { mirror: String, suite: String, packages: Vec<String> },
    /// A tiny busybox rootfs, for fast tests.
    Mini,
    /// An existing directory tree, imported as one layer (hardlinked when on the same
    /// filesystem, copied otherwise).
    Dir(PathBuf),
}

/// The embedded recipes by name: `base` and `mini`.
pub fn recipe_for(name: &str) -> Option<Recipe> {
    match name {
        "base" => Some(Recipe::base()),
        "mini" => Some(Recipe::Mini),
        _ => None,
    }
}

impl Recipe {
    /// The default `base` recipe: Debian 12 from deb.debian.org with [`BASE_PACKAGES`].
    pub fn base() -> Recipe {
        Recipe::Base {
            mirror: DEFAULT_MIRROR.to_string(),
            suite: DEFAULT_SUITE.to_string(),
            packages: BASE_PACKAGES.iter().map(|p| p.to_string()).collect(),
        }
    }

    /// What [`crate::Template::recipe`] records: `base`, `mini` or `dir:<path>`.
    pub fn label(&self) -> String {
        match self {
            Recipe::Base { .. } => "base".to_string(),
            Recipe::Mini => "mini".to_string(),
            Recipe::Dir(path) => format!("dir:{}", path.display()),
        }
    }

    /// The default sandbox configuration of templates built from this recipe.
    pub fn config(&self) -> TemplateConfig {
        match self {
            Recipe::Base { suite, packages, .. } => TemplateConfig {
                env: env(&[("PATH", DEBIAN_PATH), ("LANG", "C.UTF-8")]),
                workdir: Some("/home/user".to_string()),
                user: Some("user".to_string()),
                description: format!("Debian {suite} (minbase) with {}", packages.join(", ")),
                ..Default::default()
            },
            Recipe::Mini => TemplateConfig {
                env: env(&[("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")]),
                workdir: Some("/home/user".to_string()),
                user: Some("user".to_string()),
                description: "busybox rootfs for tests".to_string(),
                ..Default::default()
            },
            Recipe::Dir(path) => TemplateConfig {
                env: env(&[("PATH", DEBIAN_PATH)]),
                workdir: None,
                user: None,
                description: format!("imported from {}", path.display()),
                ..Default::default()
            },
        }
    }
}

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_recipes() {
        assert_eq!(recipe_for("mini"), Some(Recipe::Mini));
        let Some(Recipe::Base { mirror, suite, packages }) = recipe_for("base") else { panic!() };
        assert_eq!((mirror.as_str(), suite.as_str()), (DEFAULT_MIRROR, "bookworm"));
        for p in ["bash", "coreutils", "python3", "nodejs", "git", "curl", "ca-certificates"] {
            assert!(packages.iter().any(|q| q == p), "{p}");
        }
        assert_eq!(recipe_for("other"), None);
    }

    #[test]
    fn labels() {
        assert_eq!(Recipe::base().label(), "base");
        assert_eq!(Recipe::Dir("/srv/x".into()).label(), "dir:/srv/x");
    }
}
