//! File path globs of a scope, matched against `co_filename`.
//!
//! The syntax, the same wherever a scope is written (`PYDTRACE_SCOPE`, the
//! tools' `--file`):
//!
//! - `*` matches any run of characters within one path component (not `/`);
//! - `**` as a whole component matches any number of components, none included;
//! - `?` matches one character other than `/`;
//! - `[abc]`, `[a-z]` match one character of the set, `[!abc]` (or `[^abc]`)
//!   one character not in it (never `/`); a `]` right after the opening
//!   bracket (or its `!`) is part of the set;
//! - `\c` matches the character `c` itself.
//!
//! A glob that starts with `/` is matched against the whole filename; any
//! other glob against the filename's last components (as if it started with
//! `**/`): `app/*.py` matches `/srv/app/main.py`, and `worker.py` matches every
//! file named `worker.py`. Names such as `<string>` or `<frozen os>` are one
//! component. Nothing is resolved on the file system: symbolic links and `..`
//! are compared as written.

use std::fmt;

/// A glob that cannot be compiled, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobError {
    pub glob: String,
    pub reason: String,
}

impl fmt::Display for GlobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed file glob {:?}: {}", self.glob, self.reason)
    }
}

/// One element of a component's pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(char),
    /// `?`
    One,
    /// `*`
    Run,
    /// `[...]`: inclusive ranges (a single character is a range of one).
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

/// One path component of a glob.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// `**`: any number of components.
    AnyComponents,
    Pattern(Vec<Token>),
}

/// A compiled glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    text: String,
    parts: Vec<Part>,
}

impl Glob {
    /// Compiles `text`.
    pub fn new(text: &str) -> Result<Glob, GlobError> {
        let error = |reason: &str| GlobError {
            glob: text.to_owned(),
            reason: reason.to_owned(),
        };
        if text.is_empty() {
            return Err(error("it is empty"));
        }
        if text.ends_with('/') {
            return Err(error(
                "it ends with '/' and so matches no file; write DIR/** for every file under DIR",
            ));
        }
        if text.contains(',') {
            return Err(error(
                "a glob cannot hold a comma (commas separate scope entries); match it with '?'",
            ));
        }
        let anchored = text.starts_with('/');
        let mut parts = Vec::new();
        if !anchored {
            parts.push(Part::AnyComponents);
        }
        let body = if anchored { &text[1..] } else { text };
        for component in split_components(body).map_err(|reason| error(&reason))? {
            if component == "**" {
                if parts.last() != Some(&Part::AnyComponents) {
                    parts.push(Part::AnyComponents);
                }
                continue;
            }
            parts.push(Part::Pattern(
                compile_component(&component).map_err(|r| error(&r))?,
            ));
        }
        Ok(Glob {
            text: text.to_owned(),
            parts,
        })
    }

    /// The glob as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `path` (a `co_filename`) matches.
    pub fn matches(&self, path: &str) -> bool {
        // An anchored glob's leading '/' is consumed: the path must have one too.
        let path = match self.parts.first() {
            Some(Part::AnyComponents) => path,
            _ => match path.strip_prefix('/') {
                Some(rest) => rest,
                None => return false,
            },
        };
        let components: Vec<&str> = path.split('/').collect();
        match_parts(&self.parts, &components)
    }
}

/// The components of a glob body, split at unescaped `/` (an escaped
/// character stays escaped in its component).
fn split_components(body: &str) -> Result<Vec<String>, String> {
    let mut out = vec![String::new()];
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let Some(next) = chars.next() else {
                    return Err("it ends with a lone '\\'".into());
                };
                if next == '/' {
                    return Err("'/' cannot be escaped: it always separates components".into());
                }
                let last = out.last_mut().expect("never empty");
                last.push('\\');
                last.push(next);
            }
            '/' => out.push(String::new()),
            c => out.last_mut().expect("never empty").push(c),
        }
    }
    Ok(out)
}

fn compile_component(component: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = component.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let mut after_star = false;
    while i < chars.len() {
        let star = chars[i] == '*';
        match chars[i] {
            '\\' => {
                tokens.push(Token::Literal(chars[i + 1])); // split_components keeps pairs whole
                i += 2;
            }
            '?' => {
                tokens.push(Token::One);
                i += 1;
            }
            '*' if after_star => {
                return Err("'**' must be a whole path component, as in a/**/b".into());
            }
            '*' => {
                tokens.push(Token::Run);
                i += 1;
            }
            '[' => {
                let (token, next) = compile_class(&chars, i)?;
                tokens.push(token);
                i = next;
            }
            c => {
                tokens.push(Token::Literal(c));
                i += 1;
            }
        }
        after_star = star;
    }
    Ok(tokens)
}

/// The class that opens at `chars[open]` (`[`), and the index after its `]`.
fn compile_class(chars: &[char], open: usize) -> Result<(Token, usize), String> {
    let mut i = open + 1;
    let negated = matches!(chars.get(i), Some('!' | '^'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let Some(&c) = chars.get(i) else {
            return Err("a '[' has no closing ']'".into());
        };
        if c == ']' && !first {
            i += 1;
            break;
        }
        first = false;
        let low = if c == '\\' {
            i += 1;
            *chars.get(i).ok_or("a '[' has no closing ']'")?
        } else {
            c
        };
        i += 1;
        if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|&n| n != ']') {
            let mut high = chars[i + 1];
            i += 2;
            if high == '\\' {
                high = *chars.get(i).ok_or("a '[' has no closing ']'")?;
                i += 1;
            }
            if high < low {
                return Err(format!("the range {low}-{high} is reversed"));
            }
            ranges.push((low, high));
        } else {
            ranges.push((low, low));
        }
    }
    Ok((Token::Class { negated, ranges }, i))
}

/// Whether the glob parts match the path components exactly. Dynamic
/// programming over (part, component): linear in each, whatever the number
/// of `**` parts (no backtracking that a long glob could make explode).
fn match_parts(parts: &[Part], components: &[&str]) -> bool {
    let n = components.len();
    // reach[j]: the parts so far match exactly the first j components.
    let mut reach = vec![false; n + 1];
    reach[0] = true;
    for part in parts {
        let mut next = vec![false; n + 1];
        match part {
            Part::AnyComponents => {
                let mut any = false;
                for (j, cell) in next.iter_mut().enumerate() {
                    any |= reach[j];
                    *cell = any;
                }
            }
            Part::Pattern(tokens) => {
                for j in 0..n {
                    if reach[j] {
                        let text: Vec<char> = components[j].chars().collect();
                        next[j + 1] = match_tokens(tokens, &text);
                    }
                }
            }
        }
        reach = next;
    }
    reach[n]
}

/// Whether a component's tokens match `text` (one component: no `/`).
fn match_tokens(tokens: &[Token], text: &[char]) -> bool {
    // Iterative matching with a single backtrack point for the last `*`.
    let (mut t, mut s) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while s < text.len() {
        match tokens.get(t) {
            Some(Token::Run) => {
                star = Some((t, s));
                t += 1;
                continue;
            }
            Some(token) if token_matches(token, text[s]) => {
                t += 1;
                s += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((star_t, star_s)) => {
                t = star_t + 1;
                s = star_s + 1;
                star = Some((star_t, star_s + 1));
            }
            None => return false,
        }
    }
    tokens[t..].iter().all(|token| *token == Token::Run)
}

fn token_matches(token: &Token, c: char) -> bool {
    match token {
        Token::Literal(l) => *l == c,
        Token::One => true,
        Token::Run => unreachable!("handled by match_tokens"),
        Token::Class { negated, ranges } => {
            ranges.iter().any(|&(low, high)| low <= c && c <= high) != *negated
        }
    }
}
