//! Build progress events, and the parser that turns debootstrap's `I:` lines into them.

use std::collections::BTreeMap;

/// One progress event of a template build.
///
/// Stages, in order: `cache` (waiting for / using the shared build cache), the debootstrap
/// stages `debootstrap` (its other messages), `retrieving`, `validating`, `extracting`,
/// `unpacking`, `configuring`, then `user`, `normalizing`, `digest`, `importing`,
/// `publishing`. The `mini` recipe reports `building`; `Recipe::Dir` reports `importing`.
/// Image imports and pulls report `resolving` (manifests and config), `layer` (`done` of
/// `total` image layers, with whether the layer is already present), `extracting` (`done`
/// bytes of the layer blob read so far, `total` its size when known), `digest` and
/// `publishing`.
/// `done` counts items within the stage (packages, for the debootstrap stages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Stage name (see above).
    pub stage: String,
    /// Items done in this stage.
    pub done: u64,
    /// Items in this stage, when known.
    pub total: Option<u64>,
    /// Human-readable detail, e.g. `Unpacking libc6:amd64...`.
    pub message: String,
}

impl Progress {
    /// An event with no counts.
    pub fn stage(stage: &str, message: impl Into<String>) -> Progress {
        Progress { stage: stage.to_string(), done: 0, total: None, message: message.into() }
    }
}

/// Index files debootstrap also reports as retrieved/validated (not packages).
const INDEX_FILES: [&str; 4] = ["InRelease", "Release", "Release.gpg", "Packages"];

/// Turns debootstrap output lines into [`Progress`] events.
///
/// Per-package lines (`I: Retrieving libc6 2.36-9`, `I: Validating ...`, `I: Extracting
/// libc6...`, `I: Unpacking libc6:amd64...`, `I: Configuring libc6...`) advance a counted
/// stage (each stage keeps its own count: retrieving and validating lines interleave). Debootstrap never prints how many packages it will fetch, so the download stages
/// have no total; the number validated becomes the total of `unpacking` and `configuring`
/// (approximate: a few core packages are installed without a line, so those stages may end
/// a little short of it). Other `I:`, `W:` and `E:` lines are passed on as messages of the
/// current stage; anything else (debootstrap prints little else) is ignored.
#[derive(Debug)]
pub struct DebootstrapParser {
    stage: &'static str,
    /// Lines seen per counted stage (retrieving and validating interleave).
    counts: BTreeMap<&'static str, u64>,
}

impl Default for DebootstrapParser {
    fn default() -> Self {
        DebootstrapParser { stage: "debootstrap", counts: BTreeMap::new() }
    }
}

impl DebootstrapParser {
    /// Parses one line of output.
    pub fn line(&mut self, line: &str) -> Option<Progress> {
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix("I: ") {
            return Some(self.info(rest));
        }
        if line.starts_with("W: ") || line.starts_with("E: ") {
            return Some(self.message(line));
        }
        None
    }

    fn info(&mut self, rest: &str) -> Progress {
        let mut words = rest.split_whitespace();
        let verb = words.next().unwrap_or("");
        let args: Vec<&str> = words.collect();
        let per_package = match (verb, args.as_slice()) {
            ("Retrieving", [name, _]) if !INDEX_FILES.contains(name) => Some("retrieving"),
            ("Validating", [name, _]) if !INDEX_FILES.contains(name) => Some("validating"),
            ("Extracting", [name]) if name.ends_with("...") => Some("extracting"),
            ("Unpacking", [name]) if name.ends_with("...") => Some("unpacking"),
            ("Configuring", [name]) if name.ends_with("...") => Some("configuring"),
            _ => None,
        };
        match per_package {
            Some(stage) => self.advance(stage, rest),
            None => self.message(rest),
        }
    }

    fn advance(&mut self, stage: &'static str, message: &str) -> Progress {
        self.stage = stage;
        *self.counts.entry(stage).or_default() += 1;
        self.message(message)
    }

    /// Packages validated so far (each package is validated once, downloaded or not).
    fn packages(&self) -> u64 {
        self.counts.get("validating").copied().unwrap_or(0)
    }

    fn message(&self, message: &str) -> Progress {
        let total = matches!(self.stage, "unpacking" | "configuring").then_some(self.packages()).filter(|&n| n > 0);
        let done = self.counts.get(self.stage).copied().unwrap_or(0).min(total.unwrap_or(u64::MAX));
        Progress { stage: self.stage.to_string(), done, total, message: message.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
I: Retrieving InRelease 
I: Checking Release signature
I: Valid Release signature (key id 4D64FEC119C2029067D6E791F8D2585B8783D481)
I: Retrieving Packages 
I: Validating Packages 
I: Resolving dependencies of required packages...
I: Checking component main on http://deb.debian.org/debian...
I: Retrieving libacl1 2.3.1-3
I: Validating libacl1 2.3.1-3
I: Retrieving adduser 3.134
I: Validating adduser 3.134
I: Chosen extractor for .deb packages: dpkg-deb
I: Extracting adduser...
I: Installing core packages...
I: Unpacking required packages...
I: Unpacking libacl1:amd64...
I: Configuring required packages...
I: Configuring libacl1:amd64...
I: Configuring adduser...
W: some warning
I: Base system installed successfully.
";

    fn parse_all() -> Vec<Progress> {
        let mut parser = DebootstrapParser::default();
        SAMPLE.lines().filter_map(|l| parser.line(l)).collect()
    }

    #[test]
    fn index_files_are_not_packages() {
        let events = parse_all();
        assert_eq!(events[0].stage, "debootstrap");
        assert_eq!(events[4].stage, "debootstrap", "{:?}", events[4]);
        assert_eq!(events[4].message, "Validating Packages");
    }

    #[test]
    fn counts_packages_per_stage() {
        let events = parse_all();
        let retrieving: Vec<_> =
            events.iter().filter(|e| e.stage == "retrieving").map(|e| (e.message.as_str(), e.done, e.total)).collect();
        assert_eq!(retrieving, [("Retrieving libacl1 2.3.1-3", 1, None), ("Retrieving adduser 3.134", 2, None)]);
        let configuring: Vec<_> = events
            .iter()
            .filter(|e| e.stage == "configuring" && e.message.starts_with("Configuring"))
            .map(|e| (e.done, e.total))
            .collect();
        assert_eq!(configuring, [(1, Some(2)), (2, Some(2))]);
        let unpacking = events.iter().find(|e| e.message == "Unpacking libacl1:amd64...").unwrap();
        assert_eq!((unpacking.stage.as_str(), unpacking.done, unpacking.total), ("unpacking", 1, Some(2)));
        let extracting = events.iter().find(|e| e.message == "Extracting adduser...").unwrap();
        assert_eq!((extracting.stage.as_str(), extracting.done, extracting.total), ("extracting", 1, None));
    }

    #[test]
    fn phase_headers_and_warnings_are_messages() {
        let events = parse_all();
        let header = events.iter().find(|e| e.message == "Unpacking required packages...").unwrap();
        assert_eq!(header.stage, "extracting", "a header does not start a stage");
        let warning = events.iter().find(|e| e.message == "W: some warning").unwrap();
        assert_eq!((warning.stage.as_str(), warning.done), ("configuring", 2));
    }

    #[test]
    fn ignores_other_output() {
        let mut parser = DebootstrapParser::default();
        assert_eq!(parser.line("dpkg: warning: something"), None);
        assert_eq!(parser.line(""), None);
    }

    #[test]
    fn done_never_exceeds_total() {
        let mut parser = DebootstrapParser::default();
        parser.line("I: Validating a 1");
        for _ in 0..3 {
            let p = parser.line("I: Configuring a...").unwrap();
            assert!(p.done <= p.total.unwrap());
        }
        assert_eq!(parser.packages(), 1);
    }
}
