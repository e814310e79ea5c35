//! Authorization: mosquitto's `acl_file`, read unchanged, and the rules a token carries.
//!
//! # The file
//!
//! ```text
//! # comment
//! topic read sensors/#          anonymous clients (lines before any `user` line)
//! user alice                    starts alice's block (several blocks for one user merge)
//! topic readwrite alice/#
//! topic deny alice/secret
//! pattern write devices/%c/out  every client, %c = client id, %u = username
//! ```
//!
//! `topic|pattern [read|write|readwrite|deny|subscribe] <filter>`: without an access type
//! the access is `readwrite`, and the filter is the rest of the line (it may hold spaces).
//! As in mosquitto, `topic read` alone names the topic `read` with `readwrite` access.
//! `subscribe` is ternmq's addition (below). Any other line is an error naming the file and
//! the line, as is a filter that is not a valid MQTT topic filter.
//!
//! # Evaluation order (mosquitto 2.0's `acl_file`, reproduced)
//!
//! For a PUBLISH (Write), a delivered message (Read) and, when checked, a SUBSCRIBE filter:
//!
//! 1. Writing to a topic beginning with `$SYS`, and reading or writing a topic beginning
//!    with `$share`, is refused whatever the rules (mosquitto's `acl__check_dollar`).
//! 2. The client's own block: the `user` block of its username, or the anonymous block
//!    when it has no username (a username without a block has no own rules). Any matching
//!    `deny` refuses; otherwise a matching rule that grants the access allows.
//! 3. When the file has `pattern` lines: a username or client id containing `+` or `#`
//!    is refused everything from here on (it could widen a pattern to other clients'
//!    topics).
//! 4. The patterns, `%c` and `%u` substituted wherever they appear (a pattern with `%u`
//!    does not apply to a client without a username): `deny` first, then the grants, as
//!    in 2.
//! 5. Nothing matched: refused.
//!
//! A rule whose filter does not begin with `$` never matches a topic that does: `#`
//! does not grant `$SYS/...`; only a rule naming `$SYS` does.
//!
//! # SUBSCRIBE
//!
//! mosquitto's acl_file does not check SUBSCRIBE at all: any filter is accepted and each
//! message is then checked for Read before delivery. ternmq does the same, unless the
//! file has at least one `subscribe` rule: then every SUBSCRIBE filter (of every client)
//! is checked with the order above, where a rule applies when it *covers* the filter
//! (every topic the filter matches, the rule matches too: `a/#` covers `a/+/b`, `a/+`
//! does not cover `a/#`). Only `subscribe` rules grant it, and `read` rules are still
//! what lets each message through. A shared subscription `$share/{group}/{filter}` is
//! checked as its filter.
//!
//! # Tokens
//!
//! A JWT may carry rules ([`TokenAcl`]); they then replace the file's rules for that
//! client (see `docs/security.md`).

use crate::protocol::topic;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// What a client wants to do with a topic or filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Receive a message published to this topic name: checked per delivered message.
    Read,
    /// Publish to this topic name.
    Write,
    /// Subscribe to this topic filter: checked per filter of a SUBSCRIBE.
    Subscribe,
}

impl Access {
    const fn bit(self) -> u8 {
        match self {
            Access::Read => READ,
            Access::Write => WRITE,
            Access::Subscribe => SUBSCRIBE,
        }
    }
}

const READ: u8 = 1;
const WRITE: u8 = 2;
const SUBSCRIBE: u8 = 4;

/// The client an authorization is for.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    pub username: Option<&'a str>,
    pub client_id: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("cannot read acl_file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// A rule as written in the file (patterns not yet substituted).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileRule {
    filter: String,
    /// Granted access bits; 0 for `deny`.
    grant: u8,
}

/// A loaded acl_file, or [`Acl::allow_all`]. Cheap to share behind an `Arc`; build one
/// [`Authorizer`] per client at CONNECT with [`Acl::authorizer`].
#[derive(Debug, Clone, Default)]
pub struct Acl {
    allow_all: bool,
    /// Rules of clients without a username (lines before the first `user`).
    anonymous: Vec<FileRule>,
    users: HashMap<String, Vec<FileRule>>,
    patterns: Vec<FileRule>,
    /// The file has a `subscribe` rule: SUBSCRIBE filters are checked.
    checks_subscribe: bool,
}

impl Acl {
    /// No acl_file: everything is allowed (mosquitto's default without an ACL), except
    /// writing to `$SYS` and `$share` topics.
    pub fn allow_all() -> Acl {
        Acl {
            allow_all: true,
            ..Acl::default()
        }
    }

    /// Reads an acl_file; a bad line is an error naming the file and the line.
    pub fn load(path: &Path) -> Result<Acl, AclError> {
        let text = std::fs::read_to_string(path).map_err(|source| AclError::Io {
            path: path.to_owned(),
            source,
        })?;
        Acl::parse(&text).map_err(|(line, message)| AclError::Line {
            path: path.to_owned(),
            line,
            message,
        })
    }

    /// Parses the text of an acl_file; errors carry the 1-based line number.
    pub fn parse(text: &str) -> Result<Acl, (usize, String)> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fail = |message: String| (index + 1, message);
            let (keyword, rest) = next_token(line).unwrap_or((line, ""));
            match keyword {
                "user" => {
                    let name = rest.trim();
                    if name.is_empty() {
                        return Err(fail("`user` without a username".into()));
                    }
                    user = Some(name.to_owned());
                }
                "topic" | "pattern" => {
                    let (access, rest) = next_token(rest)
                        .ok_or_else(|| fail(format!("`{keyword}` without a topic")))?;
                    let filter = rest.trim();
                    let (grant, filter) = if filter.is_empty() {
                        // mosquitto: a single word is the topic, with readwrite access.
                        (READ | WRITE, access)
                    } else {
                        let grant = match access {
                            "read" => READ,
                            "write" => WRITE,
                            "readwrite" => READ | WRITE,
                            "subscribe" => SUBSCRIBE,
                            "deny" => 0,
                            other => {
                                return Err(fail(format!(
                                    "unknown access type `{other}` (read, write, readwrite, subscribe or deny)"
                                )))
                            }
                        };
                        (grant, filter)
                    };
                    if !topic::valid_filter(filter) {
                        return Err(fail(format!("`{filter}` is not a valid topic filter")));
                    }
                    acl.checks_subscribe |= grant & SUBSCRIBE != 0;
                    let rule = FileRule {
                        filter: filter.to_owned(),
                        grant,
                    };
                    let list = match (keyword, &user) {
                        ("pattern", _) => &mut acl.patterns,
                        (_, None) => &mut acl.anonymous,
                        (_, Some(name)) => acl.users.entry(name.clone()).or_default(),
                    };
                    list.push(rule);
                }
                other => {
                    return Err(fail(format!(
                        "unknown keyword `{other}` (topic, pattern or user)"
                    )))
                }
            }
        }
        Ok(acl)
    }

    /// The resolved rules of one client: its own block (or the anonymous one) and the
    /// patterns with `%u`/`%c` substituted, checked without allocating. With a token's
    /// rules, those replace the file's (they apply even over [`Acl::allow_all`]).
    pub fn authorizer(&self, who: &Client, token: Option<&TokenAcl>) -> Authorizer {
        if let Some(token) = token {
            return token.authorizer(who);
        }
        if self.allow_all {
            return Authorizer::allow_all();
        }
        let mut rules = Vec::new();
        let own = match who.username {
            Some(name) => self.users.get(name),
            None => Some(&self.anonymous),
        };
        if let Some(own) = own {
            push_deny_first(&mut rules, own.iter().map(|r| (r.filter.clone(), r.grant)));
        }
        if !self.patterns.is_empty() {
            if dangerous(who) {
                rules.push(Rule::deny_all());
            } else {
                let applicable = self
                    .patterns
                    .iter()
                    .filter(|r| who.username.is_some() || !r.filter.contains("%u"))
                    .map(|r| (substitute(&r.filter, who), r.grant));
                push_deny_first(&mut rules, applicable);
            }
        }
        Authorizer {
            rules: rules.into_boxed_slice(),
            checks_subscribe: self.checks_subscribe,
            allow_all: false,
        }
    }

    /// One check without keeping the client's [`Authorizer`]: resolves the client's rules
    /// each time (allocates), so connections should hold an `Authorizer` instead.
    pub fn check(&self, who: &Client, topic_or_filter: &str, access: Access) -> bool {
        self.authorizer(who, None).check(topic_or_filter, access)
    }
}

/// The first word of `s` and what follows it, or `None` when `s` is blank.
fn next_token(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if s.is_empty() {
        return None;
    }
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    Some((&s[..end], &s[end..]))
}

/// mosquitto refuses such clients when patterns are in use: `%u` = `#` would make a
/// pattern match every user's topics.
fn dangerous(who: &Client) -> bool {
    let bad = |s: &str| s.contains(['+', '#']);
    who.username.is_some_and(bad) || bad(who.client_id)
}

/// mosquitto 2.0 replaces `%c` and `%u` wherever they appear in a pattern.
fn substitute(pattern: &str, who: &Client) -> String {
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut rest = pattern;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        match (after.as_bytes().first(), who.username) {
            (Some(b'c'), _) => out.push_str(who.client_id),
            (Some(b'u'), Some(user)) => out.push_str(user),
            _ => {
                out.push('%');
                rest = after;
                continue;
            }
        }
        rest = &after[1..];
    }
    out.push_str(rest);
    out
}

/// Appends the rules with every `deny` before every grant (mosquitto puts each deny at
/// the head of its list), keeping the written order otherwise.
fn push_deny_first(rules: &mut Vec<Rule>, list: impl Iterator<Item = (String, u8)> + Clone) {
    for deny in [true, false] {
        rules.extend(list.clone().filter(|(_, grant)| (*grant == 0) == deny).map(
            |(filter, grant)| Rule {
                filter: Filter::new(&filter),
                kind: if deny {
                    RuleKind::Deny
                } else {
                    RuleKind::Allow(grant)
                },
            },
        ));
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RuleKind {
    Allow(u8),
    Deny,
    /// Refuses whatever reaches it (a dangerous username or client id).
    DenyAll,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    filter: Filter,
    kind: RuleKind,
}

impl Rule {
    fn deny_all() -> Rule {
        Rule {
            filter: Filter::new("#"),
            kind: RuleKind::DenyAll,
        }
    }

    fn applies(&self, topic_or_filter: &str, access: Access) -> bool {
        match access {
            Access::Read | Access::Write => self.filter.matches(topic_or_filter),
            Access::Subscribe => self.filter.covers(topic_or_filter),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(Box<str>),
    Plus,
    Hash,
}

/// A topic filter split into levels once (at CONNECT), so that a check splits only the
/// topic, and stops at the first level that differs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Filter {
    levels: Box<[Level]>,
    /// Begins with `$`: only such a filter matches or covers `$` topics (MQTT 4.7.2,
    /// mosquitto's ACL check).
    dollar: bool,
}

impl Filter {
    /// `text` is a valid filter (checked at load; substitution keeps it valid, since
    /// names with wildcards never get substituted).
    fn new(text: &str) -> Filter {
        let levels = text
            .split('/')
            .map(|level| match level {
                "+" => Level::Plus,
                "#" => Level::Hash,
                literal => Level::Literal(literal.into()),
            })
            .collect();
        Filter {
            levels,
            dollar: text.starts_with('$'),
        }
    }

    /// Whether the topic name matches.
    fn matches(&self, topic: &str) -> bool {
        self.walk(topic, |level, part| match level {
            Level::Plus => true,
            Level::Literal(literal) => **literal == *part,
            Level::Hash => true,
        })
    }

    /// Whether every topic that `filter` matches is matched by this filter too (both
    /// valid filters): `a/#` covers `a/+/b`, `a/+` does not cover `a/#`.
    fn covers(&self, filter: &str) -> bool {
        self.walk(filter, |level, part| match level {
            Level::Plus => part != "#",
            // A literal never equals `+` or `#`.
            Level::Literal(literal) => **literal == *part,
            Level::Hash => true,
        })
    }

    /// Walks `text` level by level against the filter's levels: `#` accepts the rest
    /// (and the parent level), other levels must be accepted by `accept`, and both must
    /// end together.
    fn walk(&self, text: &str, accept: impl Fn(&Level, &str) -> bool) -> bool {
        if text.starts_with('$') != self.dollar {
            return false;
        }
        let mut rest = Some(text);
        for level in self.levels.iter() {
            if *level == Level::Hash {
                return true;
            }
            let Some(remaining) = rest else {
                return false;
            };
            let (part, tail) = match remaining.split_once('/') {
                Some((part, tail)) => (part, Some(tail)),
                None => (remaining, None),
            };
            if !accept(level, part) {
                return false;
            }
            rest = tail;
        }
        rest.is_none()
    }
}

/// One client's resolved rules, built at CONNECT ([`Acl::authorizer`]): checks allocate
/// nothing. `Send + Sync`; keep it in the connection.
#[derive(Debug, Clone)]
pub struct Authorizer {
    rules: Box<[Rule]>,
    checks_subscribe: bool,
    allow_all: bool,
}

impl Authorizer {
    /// Everything allowed (except writing `$SYS` and `$share` topics).
    pub fn allow_all() -> Authorizer {
        Authorizer {
            rules: Box::new([]),
            checks_subscribe: false,
            allow_all: true,
        }
    }

    /// Whether the client may read or write the topic name, or subscribe to the filter.
    /// The caller validates the topic or filter first (as a PUBLISH or SUBSCRIBE must be).
    pub fn check(&self, topic_or_filter: &str, access: Access) -> bool {
        let mut target = topic_or_filter;
        match access {
            Access::Write if target.starts_with("$SYS") => return false,
            Access::Read | Access::Write if target.starts_with("$share") => return false,
            Access::Subscribe => {
                if !self.checks_subscribe && !self.allow_all {
                    return true;
                }
                match topic::parse_shared(target) {
                    Ok(Some((_, filter))) => target = filter,
                    Ok(None) => {}
                    Err(_) => return false,
                }
            }
            _ => {}
        }
        if self.allow_all {
            return true;
        }
        let bit = access.bit();
        for rule in self.rules.iter() {
            match rule.kind {
                RuleKind::DenyAll => return false,
                RuleKind::Deny if rule.applies(target, access) => return false,
                RuleKind::Allow(grant) if grant & bit != 0 && rule.applies(target, access) => {
                    return true
                }
                _ => {}
            }
        }
        false
    }
}

/// ACL rules carried in a token, in EMQX's simple form: `{"pub": [filters], "sub":
/// [filters], "all": [filters]}`, each an allowed topic filter, `%u`/`%c` (or EMQX's
/// `${username}`/`${clientid}`) substituted. `sub` grants subscribing and receiving,
/// `pub` publishing, `all` both. Nothing else is allowed, and SUBSCRIBE is checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenAcl {
    #[serde(default, rename = "pub")]
    pub publish: Vec<String>,
    #[serde(default, rename = "sub")]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub all: Vec<String>,
}

/// A filter in a token that is not valid even before substitution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadTokenFilter(pub String);

impl fmt::Display for BadTokenFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` is not a valid topic filter", self.0)
    }
}

impl TokenAcl {
    /// Checks every filter (placeholders count as one ordinary level).
    pub fn validate(&self) -> Result<(), BadTokenFilter> {
        let all = self.publish.iter().chain(&self.subscribe).chain(&self.all);
        match all.into_iter().find(|f| !topic::valid_filter(f)) {
            Some(bad) => Err(BadTokenFilter(bad.clone())),
            None => Ok(()),
        }
    }

    fn authorizer(&self, who: &Client) -> Authorizer {
        let lists = [
            (&self.all, READ | WRITE | SUBSCRIBE),
            (&self.subscribe, READ | SUBSCRIBE),
            (&self.publish, WRITE),
        ];
        let has_placeholder = lists.iter().flat_map(|(l, _)| l.iter()).any(|f| {
            f.contains("%u")
                || f.contains("%c")
                || f.contains("${username}")
                || f.contains("${clientid}")
        });
        let rules = if has_placeholder && dangerous(who) {
            vec![Rule::deny_all()]
        } else {
            lists
                .iter()
                .flat_map(|(list, grant)| {
                    list.iter().map(move |f| {
                        (
                            f.replace("${username}", "%u").replace("${clientid}", "%c"),
                            *grant,
                        )
                    })
                })
                // A rule with %u for a client without username matches nothing.
                .filter(|(f, _)| who.username.is_some() || !f.contains("%u"))
                .map(|(f, grant)| Rule {
                    filter: Filter::new(&substitute(&f, who)),
                    kind: RuleKind::Allow(grant),
                })
                .collect()
        };
        Authorizer {
            rules: rules.into_boxed_slice(),
            checks_subscribe: true,
            allow_all: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Access::{Read, Subscribe, Write};

    fn client<'a>(username: Option<&'a str>, client_id: &'a str) -> Client<'a> {
        Client {
            username,
            client_id,
        }
    }

    fn acl(text: &str) -> Acl {
        Acl::parse(text).unwrap()
    }

    #[test]
    fn anonymous_block_applies_only_to_clients_without_username() {
        let acl = acl("topic read public/#\nuser alice\ntopic readwrite alice/#\n");
        let anon = client(None, "c1");
        let alice = client(Some("alice"), "c2");
        let bob = client(Some("bob"), "c3");
        assert!(acl.check(&anon, "public/x", Read));
        assert!(!acl.check(&anon, "public/x", Write));
        assert!(!acl.check(&anon, "alice/x", Read));
        assert!(acl.check(&alice, "alice/x", Write));
        // A user's block replaces the anonymous one: alice cannot read public/x.
        assert!(!acl.check(&alice, "public/x", Read));
        // A user without a block and no patterns: nothing.
        assert!(!acl.check(&bob, "public/x", Read));
        assert!(!acl.check(&bob, "alice/x", Read));
    }

    #[test]
    fn access_types() {
        let acl =
            acl("user u\ntopic read r/#\ntopic write w/#\ntopic readwrite rw/#\ntopic both/#\n");
        let u = client(Some("u"), "c");
        let cases = [
            ("r/1", true, false),
            ("w/1", false, true),
            ("rw/1", true, true),
            ("both/1", true, true),
            ("other", false, false),
        ];
        for (topic, read, write) in cases {
            assert_eq!(acl.check(&u, topic, Read), read, "read {topic}");
            assert_eq!(acl.check(&u, topic, Write), write, "write {topic}");
        }
    }

    #[test]
    fn single_word_is_the_topic_with_readwrite() {
        // mosquitto: `topic read` names the topic "read".
        let acl = acl("topic read\n");
        let anon = client(None, "c");
        assert!(acl.check(&anon, "read", Read));
        assert!(acl.check(&anon, "read", Write));
    }

    #[test]
    fn deny_overrides_whatever_its_position() {
        let acl = acl("user u\ntopic readwrite a/#\ntopic deny a/secret\ntopic read a/+/x\n");
        let u = client(Some("u"), "c");
        assert!(acl.check(&u, "a/open", Write));
        assert!(!acl.check(&u, "a/secret", Read));
        assert!(!acl.check(&u, "a/secret", Write));
        assert!(acl.check(&u, "a/secret/more", Read));
    }

    #[test]
    fn user_rules_come_before_patterns() {
        // A user's grant wins over a pattern deny; a user's deny wins over a pattern grant.
        let acl = acl("user u\ntopic read dev/c1/in\ntopic deny dev/c1/out\n\
             pattern deny dev/%c/in\npattern readwrite dev/%c/#\n");
        let u = client(Some("u"), "c1");
        assert!(acl.check(&u, "dev/c1/in", Read));
        assert!(!acl.check(&u, "dev/c1/out", Write));
        assert!(acl.check(&u, "dev/c1/other", Write));
        // Another user: the pattern deny applies.
        let v = client(Some("v"), "c1");
        assert!(!acl.check(&v, "dev/c1/in", Read));
        assert!(acl.check(&v, "dev/c1/other", Read));
        assert!(!acl.check(&v, "dev/c2/other", Read));
    }

    #[test]
    fn patterns_substitute_username_and_client_id() {
        let acl =
            acl("pattern readwrite users/%u/#\npattern read clients/%c\npattern write x/%u-%c/y\n");
        let u = client(Some("alice"), "dev1");
        assert!(acl.check(&u, "users/alice/inbox", Write));
        assert!(!acl.check(&u, "users/bob/inbox", Write));
        assert!(acl.check(&u, "clients/dev1", Read));
        assert!(!acl.check(&u, "clients/dev1", Write));
        // mosquitto 2.0 substitutes inside a level too.
        assert!(acl.check(&u, "x/alice-dev1/y", Write));
        // %u patterns do not apply without a username; %c ones do.
        let anon = client(None, "dev1");
        assert!(!acl.check(&anon, "users//inbox", Write));
        assert!(acl.check(&anon, "clients/dev1", Read));
        // A username with '/' spans levels, as in mosquitto 2.0.
        let slash = client(Some("a/b"), "d");
        assert!(acl.check(&slash, "users/a/b/inbox", Read));
    }

    #[test]
    fn wildcards_in_username_or_client_id_are_refused_with_patterns() {
        let acl = acl("user a+b\ntopic read own/#\npattern readwrite users/%u/#\n");
        // The user's own rules still apply (checked before the patterns).
        let plus = client(Some("a+b"), "c");
        assert!(acl.check(&plus, "own/x", Read));
        assert!(!acl.check(&plus, "users/a+b/x", Read));
        assert!(!acl.check(&plus, "users/x/x", Read));
        let hash = client(Some("ok"), "c#");
        assert!(!acl.check(&hash, "users/ok/x", Read));
        assert!(acl.check(&client(Some("ok"), "c"), "users/ok/x", Read));
        // Without patterns mosquitto does not look at the names.
        let plain = super::Acl::parse("user a+b\ntopic read own/#\n").unwrap();
        assert!(plain.check(&plus, "own/x", Read));
    }

    #[test]
    fn dollar_topics_need_a_rule_that_names_them() {
        let acl = acl("topic readwrite #\ntopic read +/broker/#\nuser admin\ntopic read $SYS/#\ntopic readwrite #\n");
        let anon = client(None, "c");
        assert!(acl.check(&anon, "a/b", Read));
        assert!(!acl.check(&anon, "$SYS/broker/uptime", Read));
        let admin = client(Some("admin"), "c");
        assert!(acl.check(&admin, "$SYS/broker/uptime", Read));
        // Nobody writes $SYS, whatever the rules.
        assert!(!acl.check(&admin, "$SYS/broker/uptime", Write));
        assert!(!acl.check(&admin, "$SYSx", Write));
        assert!(!Acl::allow_all().check(&anon, "$SYS/x", Write));
        assert!(Acl::allow_all().check(&anon, "$SYS/x", Read));
        assert!(!Acl::allow_all().check(&anon, "$share/g/x", Write));
    }

    #[test]
    fn allow_all() {
        let acl = Acl::allow_all();
        let anon = client(None, "c");
        for access in [Read, Write, Subscribe] {
            assert!(acl.check(&anon, "a/b", access));
        }
        assert!(acl.check(&anon, "#", Subscribe));
    }

    #[test]
    fn subscribe_is_not_checked_without_subscribe_rules() {
        // mosquitto: SUBSCRIBE always granted; delivery filtered by Read.
        let acl = acl("topic read a/#\n");
        let anon = client(None, "c");
        assert!(acl.check(&anon, "#", Subscribe));
        assert!(acl.check(&anon, "b/+", Subscribe));
        assert!(!acl.check(&anon, "b/x", Read));
    }

    #[test]
    fn subscribe_rules_check_filter_coverage() {
        let acl = acl(
            "user u\ntopic subscribe a/#\ntopic subscribe b/+/c\ntopic deny a/secret/#\n\
             topic read a/#\ntopic subscribe $SYS/broker/#\n",
        );
        let u = client(Some("u"), "c");
        for (filter, allowed) in [
            ("a/#", true),
            ("a", true),
            ("a/x/+", true),
            ("a/secret", false),
            ("a/secret/x", false),
            ("b/x/c", true),
            ("b/+/c", true),
            ("b/#", false),
            ("b/x/d", false),
            ("#", false),
            ("+/x", false),
            ("$SYS/broker/load", true),
            ("$SYS/#", false),
            ("$share/g/a/x", true),
            ("$share/g/b/#", false),
            ("$share/g", false),
        ] {
            assert_eq!(acl.check(&u, filter, Subscribe), allowed, "{filter}");
        }
        // `subscribe` does not grant Read, `read` does not grant Subscribe.
        assert!(!acl.check(&u, "b/x/c", Read));
        let r = super::Acl::parse("topic subscribe x\ntopic read y/#\n").unwrap();
        assert!(!r.check(&client(None, "c"), "y/1", Subscribe));
        // Once the file has a subscribe rule, clients without one can subscribe to nothing.
        assert!(!acl.check(&client(Some("other"), "c"), "a/x", Subscribe));
    }

    #[test]
    fn covers_is_filter_inclusion() {
        for (rule, filter, expected) in [
            ("#", "#", true),
            ("#", "a/+/b", true),
            ("#", "$SYS/x", false),
            ("$SYS/#", "$SYS/x/#", true),
            ("a/+", "a/b", true),
            ("a/+", "a/+", true),
            ("a/+", "a/#", false),
            ("a/+", "a", false),
            ("a/#", "a", true),
            ("a/b", "a/+", false),
            ("a/b", "a/b", true),
            ("a/b", "a/b/c", false),
            ("+/+", "a/b", true),
            ("+", "$SYS", false),
        ] {
            assert_eq!(
                Filter::new(rule).covers(filter),
                expected,
                "{rule} covers {filter}"
            );
        }
    }

    mod prop {
        use super::super::Filter;
        use crate::protocol::topic;
        use proptest::collection::vec;
        use proptest::prelude::*;
        use proptest::sample::select;

        fn topic_name() -> impl Strategy<Value = String> {
            vec(select(vec!["a", "b", "", "$s"]), 1..5).prop_map(|l| l.join("/"))
        }

        fn filter() -> impl Strategy<Value = String> {
            (
                vec(select(vec!["a", "b", "", "$s", "+"]), 0..4),
                any::<bool>(),
            )
                .prop_map(|(mut levels, hash)| {
                    if hash || levels.is_empty() {
                        levels.push("#");
                    }
                    levels.join("/")
                })
        }

        proptest! {
            /// The precompiled matcher agrees with the router's.
            #[test]
            fn matches_like_the_router(f in filter(), t in topic_name()) {
                prop_assert_eq!(Filter::new(&f).matches(&t), topic::matches(&f, &t), "{} vs {}", f, t);
            }

            /// A covering rule matches every topic the covered filter matches.
            #[test]
            fn covers_is_sound(r in filter(), f in filter(), topics in vec(topic_name(), 16)) {
                let (rule, sub) = (Filter::new(&r), Filter::new(&f));
                if rule.covers(&f) {
                    for t in &topics {
                        prop_assert!(!sub.matches(t) || rule.matches(t), "{} covers {} but not {}", r, f, t);
                    }
                }
            }
        }
    }

    #[test]
    fn parse_errors_name_the_line() {
        for (text, line, needle) in [
            ("topic read a\nbogus x\n", 2, "unknown keyword"),
            ("\n\ntopic\n", 3, "without a topic"),
            ("user\n", 1, "without a username"),
            ("topic reed a/b\n", 1, "unknown access type"),
            ("# ok\ntopic read a/#/b\n", 2, "not a valid topic filter"),
            ("pattern write a+\n", 1, "not a valid topic filter"),
        ] {
            let (at, message) = Acl::parse(text).unwrap_err();
            assert_eq!(at, line, "{text:?}");
            assert!(message.contains(needle), "{message}");
        }
    }

    #[test]
    fn comments_blank_lines_spaces_and_crlf() {
        let acl = acl("# comment\r\n\r\n   # indented comment\r\ntopic   read    a b/c  \r\nuser   bob  \r\ntopic\tdeny\tx\r\n");
        assert!(acl.check(&client(None, "c"), "a b/c", Read));
        assert_eq!(
            acl.users["bob"],
            vec![FileRule {
                filter: "x".into(),
                grant: 0
            }]
        );
    }

    #[test]
    fn user_blocks_merge() {
        let acl = acl("user u\ntopic read a\nuser v\ntopic read b\nuser u\ntopic read c\n");
        let u = client(Some("u"), "c");
        assert!(acl.check(&u, "a", Read) && acl.check(&u, "c", Read));
        assert!(!acl.check(&u, "b", Read));
    }

    #[test]
    fn load_reports_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acl");
        std::fs::write(&path, "topic read a\ntopic nope a\n").unwrap();
        let err = Acl::load(&path).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}:2: ", path.display())), "{err}");
        let missing = Acl::load(&dir.path().join("none")).unwrap_err().to_string();
        assert!(missing.contains("cannot read acl_file"), "{missing}");
    }

    #[test]
    fn token_acl_replaces_the_file() {
        let file = acl("topic readwrite #\n");
        let token = TokenAcl {
            publish: vec!["up/%c".into()],
            subscribe: vec!["down/${username}/#".into()],
            all: vec!["chat/#".into()],
        };
        token.validate().unwrap();
        let who = client(Some("alice"), "dev1");
        let auth = file.authorizer(&who, Some(&token));
        assert!(auth.check("up/dev1", Write));
        assert!(!auth.check("up/dev1", Read));
        assert!(!auth.check("up/dev2", Write));
        assert!(auth.check("down/alice/x", Read));
        assert!(auth.check("down/alice/#", Subscribe));
        assert!(!auth.check("down/alice/x", Write));
        assert!(!auth.check("down/#", Subscribe));
        assert!(auth.check("chat/a", Write) && auth.check("chat/a", Read));
        assert!(auth.check("chat/#", Subscribe));
        // The file's `#` no longer applies.
        assert!(!auth.check("other", Read));
        // Token rules apply over allow_all too.
        assert!(!Acl::allow_all()
            .authorizer(&who, Some(&token))
            .check("other", Write));
        // A username with wildcards gets nothing from placeholder rules.
        let bad = client(Some("#"), "dev1");
        assert!(!file.authorizer(&bad, Some(&token)).check("chat/a", Read));
        assert_eq!(
            TokenAcl {
                publish: vec!["a/#/b".into()],
                ..TokenAcl::default()
            }
            .validate(),
            Err(BadTokenFilter("a/#/b".into()))
        );
    }

    #[test]
    fn authorizer_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Authorizer>();
        check::<Acl>();
    }

    /// Not a timing assertion: prints what a Read check costs for `--nocapture` runs
    /// (the criterion bench `acl` measures it properly).
    #[test]
    fn read_check_cost_report() {
        let mut text = String::from("user u\n");
        for i in 0..20 {
            text.push_str(&format!("topic read site/{i}/+/temp\n"));
        }
        text.push_str("topic deny site/secret/#\npattern read devices/%c/#\n");
        let acl = acl(&text);
        let auth = acl.authorizer(&client(Some("u"), "dev7"), None);
        let n = 100_000;
        let start = std::time::Instant::now();
        let mut allowed = 0;
        for _ in 0..n {
            allowed += usize::from(auth.check(std::hint::black_box("devices/dev7/x/y"), Read));
        }
        assert_eq!(allowed, n);
        eprintln!(
            "acl read check (22 rules, match on the last): {:?}/check",
            start.elapsed() / n as u32
        );
    }
}
