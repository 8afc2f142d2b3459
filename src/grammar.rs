//! The grammar of a scope and of a lease: pure functions and values, no
//! state, so that the channel (which reads the tools' leases) and the scope
//! in force (`scope`) share one reader of the text without reaching each
//! other.
//!
//! A scope is a list of module names (each covering its submodules) and file
//! path globs (`glob`), written as entries separated by commas or newlines:
//! `module:NAME`, `file:GLOB`, or without a prefix, a file glob if it holds
//! `/`, `*`, `?`, `[`, `\` or `<`, otherwise a module name. A lease's text
//! (written by a tool into the channel) is a scope plus `probe:NAME` entries
//! naming the probes the tool asks for and a `follow:PATH` entry naming the
//! socket its children report to ([`Lease`]). docs/scope.md has the
//! rules a user sees; which code a scope covers is [`Scope::covers`].
//!
//! Reaches down to `probes` only (probe names); `scope` and `channel` use it.

mod glob;

use std::fmt;
use std::sync::Arc;

pub use glob::{Glob, GlobError};

use crate::probes::ProbeSet;

/// A scope: module names and file globs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    modules: Vec<String>,
    globs: Vec<Glob>,
}

/// Why a scope's text cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeError {
    Glob(GlobError),
    ModuleName {
        name: String,
        reason: String,
    },
    Empty,
    TooLong {
        len: usize,
        limit: usize,
    },
    NotUtf8,
    /// A lease's `probe:NAME` names no probe of the provider.
    Probe(String),
    /// A lease's `follow:PATH` is malformed, or another lease follows already.
    Follow(String),
}

impl fmt::Display for ScopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScopeError::Glob(err) => write!(f, "{err}"),
            ScopeError::ModuleName { name, reason } => write!(
                f,
                "{name:?} is not a module name: {reason} (a file? give it as a file glob)"
            ),
            ScopeError::Empty => write!(f, "the scope names no module and no file"),
            ScopeError::TooLong { len, limit } => {
                write!(f, "the scope is {len} bytes long; at most {limit} fit")
            }
            ScopeError::NotUtf8 => write!(f, "the scope is not UTF-8 text"),
            ScopeError::Probe(name) => write!(f, "provider python has no probe {name:?}"),
            ScopeError::Follow(why) => write!(f, "follow: {why}"),
        }
    }
}

impl Scope {
    /// Parses a scope: entries separated by commas or newlines, each
    /// `module:NAME`, `file:GLOB`, or without a prefix: a file glob if it
    /// holds `/`, `*`, `?`, `[`, `\` or `<`, otherwise a module name. Blank
    /// entries are skipped; a text without entries gives an empty scope.
    pub fn parse(text: &str) -> Result<Scope, ScopeError> {
        let mut scope = Scope::default();
        for entry in text
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            if let Some(name) = entry.strip_prefix("module:") {
                scope.add_module(name.trim())?;
            } else if let Some(glob) = entry.strip_prefix("file:") {
                scope.add_glob(glob.trim())?;
            } else if entry.contains(['/', '*', '?', '[', '\\', '<']) {
                scope.add_glob(entry)?;
            } else {
                scope.add_module(entry)?;
            }
        }
        Ok(scope)
    }

    fn add_module(&mut self, name: &str) -> Result<(), ScopeError> {
        check_module_name(name)?;
        if !self.modules.iter().any(|m| m == name) {
            self.modules.push(name.to_owned());
        }
        Ok(())
    }

    fn add_glob(&mut self, text: &str) -> Result<(), ScopeError> {
        let glob = Glob::new(text).map_err(ScopeError::Glob)?;
        if !self.globs.iter().any(|g| g.as_str() == text) {
            self.globs.push(glob);
        }
        Ok(())
    }

    /// Whether the scope names nothing (then it is no scope: everything fires).
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty() && self.globs.is_empty()
    }

    /// The module names.
    pub fn modules(&self) -> &[String] {
        &self.modules
    }

    /// The file globs, as written.
    pub fn files(&self) -> impl Iterator<Item = &str> {
        self.globs.iter().map(Glob::as_str)
    }

    /// Everything of `self` and of `other`.
    pub fn union(&self, other: &Scope) -> Scope {
        let mut out = self.clone();
        for module in &other.modules {
            if !out.modules.contains(module) {
                out.modules.push(module.clone());
            }
        }
        for glob in &other.globs {
            if !out.globs.iter().any(|g| g.as_str() == glob.as_str()) {
                out.globs.push(glob.clone());
            }
        }
        out
    }

    /// The scope as text, one prefixed entry per line (what [`Scope::parse`] reads back).
    pub fn text(&self) -> String {
        let modules = self.modules.iter().map(|m| format!("module:{m}"));
        let files = self.files().map(|g| format!("file:{g}"));
        modules.chain(files).collect::<Vec<_>>().join("\n")
    }

    /// Whether code whose frames run under module `name` is in scope.
    fn covers_module(&self, name: &str) -> bool {
        self.modules.iter().any(|m| {
            name.strip_prefix(m.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
    }

    /// Whether a code object with these module names and filename is in scope.
    pub fn covers(&self, modules: &[String], filename: &str) -> bool {
        modules.iter().any(|m| self.covers_module(m))
            || self.globs.iter().any(|g| g.matches(filename))
    }
}

/// A dotted name whose parts are identifiers (Unicode letters, digits and
/// `_`, not starting with a digit). Whether such a module exists is not
/// asked: it may be imported later.
fn check_module_name(name: &str) -> Result<(), ScopeError> {
    let bad = |reason: &str| {
        Err(ScopeError::ModuleName {
            name: name.to_owned(),
            reason: reason.to_owned(),
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    for part in name.split('.') {
        let mut chars = part.chars();
        match chars.next() {
            None => return bad("it has an empty part between dots"),
            Some(c) if !(c == '_' || c.is_alphabetic()) => {
                return bad("each dotted part must start with a letter or '_'")
            }
            _ => {}
        }
        if !chars.all(|c| c == '_' || c.is_alphanumeric()) {
            return bad("each dotted part may hold only letters, digits and '_'");
        }
    }
    Ok(())
}

/// What a lease asks for: a scope (`None`: the lease sets none), probes, the
/// socket where this process's children report (`follow`), or several.
#[derive(Debug)]
pub struct Lease {
    pub scope: Option<Arc<Scope>>,
    pub probes: ProbeSet,
    pub follow: Option<String>,
}

impl Lease {
    /// Parses a lease's text: its `probe:NAME` entries, its `follow:PATH`
    /// entry, and the rest as a scope; well formed, and asking for something.
    pub fn parse(text: &str) -> Result<Lease, ScopeError> {
        let mut names = Vec::new();
        let mut follow = None;
        let mut scope_lines = Vec::new();
        for entry in text.split([',', '\n']).map(str::trim) {
            if let Some(name) = entry.strip_prefix("probe:") {
                names.push(name.trim());
            } else if let Some(path) = entry.strip_prefix("follow:") {
                follow = Some(follow_path(path.trim(), follow.is_some())?);
            } else {
                scope_lines.push(entry);
            }
        }
        let probes =
            ProbeSet::from_names(&names).map_err(|unknown| ScopeError::Probe(unknown.0))?;
        let scope = Scope::parse(&scope_lines.join("\n"))?;
        if scope.is_empty() && probes.is_empty() && follow.is_none() {
            return Err(ScopeError::Empty);
        }
        Ok(Lease {
            scope: (!scope.is_empty()).then(|| Arc::new(scope)),
            probes,
            follow,
        })
    }
}

/// A `follow:PATH` entry's socket path: absolute, without a NUL (it goes into
/// the environment), and the lease's only one.
fn follow_path(path: &str, again: bool) -> Result<String, ScopeError> {
    if again {
        return Err(ScopeError::Follow(
            "a lease names one socket at most".into(),
        ));
    }
    if !path.starts_with('/') || path.contains('\0') {
        return Err(ScopeError::Follow(format!(
            "{path:?} is not an absolute path"
        )));
    }
    Ok(path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_by_prefix_and_by_shape() {
        let scope = Scope::parse("app, file:lib/*.py\nmodule:tools.x , <string>,,").unwrap();
        assert_eq!(scope.modules(), ["app", "tools.x"]);
        assert_eq!(scope.files().collect::<Vec<_>>(), ["lib/*.py", "<string>"]);
        assert_eq!(Scope::parse(&scope.text()).unwrap(), scope);
        assert!(scope.covers(&["app.sub".into()], "/x.py"));
        assert!(!scope.covers(&["application".into()], "/x.py"));
        assert!(scope.covers(&[], "/srv/lib/a.py"));
        assert!(Scope::parse(" , \n").unwrap().is_empty());
    }

    #[test]
    fn bad_module_names() {
        for text in ["a..b", "1abc", "a-b", "module:"] {
            assert!(
                matches!(Scope::parse(text), Err(ScopeError::ModuleName { .. })),
                "{text}"
            );
        }
    }

    #[test]
    fn a_lease_asks_for_a_scope_probes_or_both() {
        let lease = Lease::parse("probe:function-entry\napp\nprobe: line").unwrap();
        assert_eq!(lease.scope.as_deref().unwrap().modules(), ["app"]);
        assert_eq!(
            lease.probes,
            ProbeSet::from_names(&["function-entry", "line"]).unwrap()
        );
        let probes_only = Lease::parse("probe:gc-start").unwrap();
        assert!(probes_only.scope.is_none());
        assert!(matches!(Lease::parse(" \n"), Err(ScopeError::Empty)));
        assert_eq!(
            Lease::parse("probe:nope,app").unwrap_err(),
            ScopeError::Probe("nope".into())
        );
        let follow = Lease::parse("follow: /run/t.sock").unwrap();
        assert_eq!(follow.follow.as_deref(), Some("/run/t.sock"));
        assert!(follow.scope.is_none() && follow.probes.is_empty());
        for bad in ["follow:t.sock", "follow:/a\nfollow:/b"] {
            assert!(
                matches!(Lease::parse(bad), Err(ScopeError::Follow(_))),
                "{bad}"
            );
        }
    }
}
