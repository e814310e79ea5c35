//! Topic names, topic filters and shared subscriptions (MQTT 5.0 section 4.7 and 4.8.2,
//! 3.1.1 section 4.7).

/// A topic name a PUBLISH may carry: non-empty and without wildcards.
pub fn valid_topic_name(s: &str) -> bool {
    !s.is_empty() && !s.contains(['+', '#'])
}

/// A topic filter a SUBSCRIBE may carry: non-empty, `#` only as the whole last level, `+`
/// only as a whole level.
pub fn valid_filter(s: &str) -> bool {
    if s.is_empty() {
        return false;
    }
    let mut levels = s.split('/').peekable();
    while let Some(level) = levels.next() {
        match level {
            "#" => return levels.peek().is_none(),
            "+" => {}
            _ if level.contains(['+', '#']) => return false,
            _ => {}
        }
    }
    true
}

/// Whether `topic` matches `filter`. A filter starting with a wildcard does not match a
/// topic starting with `$` (4.7.2), so `#` and `+/x` see no `$SYS/x`.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut filter = filter.split('/');
    let mut topic = topic.split('/');
    loop {
        match (filter.next(), topic.next()) {
            // `#` also matches the parent level: `a/#` matches `a`.
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A `$share/...` filter that is not `$share/{group}/{filter}` with a non-empty group free
/// of `+`, `#` and `/`, and a non-empty filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MalformedShare;

/// Splits a shared subscription `$share/{group}/{filter}` into its group and its filter.
///
/// `Ok(None)` for an ordinary filter, `Err(MalformedShare)` for a filter that starts with
/// `$share/` but is not a valid share (`$share/g`, `$share//x`, `$share/g+/x`, `$share/g/`).
/// The filter part is returned as is: check it with [`valid_filter`].
pub fn parse_shared(filter: &str) -> Result<Option<(&str, &str)>, MalformedShare> {
    let Some(rest) = filter.strip_prefix("$share/") else {
        return Ok(None);
    };
    let (group, filter) = rest.split_once('/').ok_or(MalformedShare)?;
    if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
        return Err(MalformedShare);
    }
    Ok(Some((group, filter)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        for ok in ["a", "a/b", "/", "/a", "a/", "$SYS/x", "a b", "ü/€"] {
            assert!(valid_topic_name(ok), "{ok}");
        }
        for bad in ["", "+", "#", "a/+", "a/#", "a+", "#a"] {
            assert!(!valid_topic_name(bad), "{bad}");
        }
    }

    #[test]
    fn filters() {
        for ok in [
            "a", "#", "+", "+/+", "a/#", "a/+/b", "/", "/#", "+/#", "$SYS/#", "a//b",
        ] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in [
            "", "a#", "a/#/b", "#/a", "a+", "a/b+", "+a/b", "a/##", "##", "++",
        ] {
            assert!(!valid_filter(bad), "{bad}");
        }
    }

    #[test]
    fn matching() {
        let yes = [
            ("a/b", "a/b"),
            ("#", "a"),
            ("#", "a/b/c"),
            ("#", "/"),
            ("a/#", "a"),
            ("a/#", "a/b/c"),
            ("+", "a"),
            ("+", ""),
            ("+/+", "/a"),
            ("a/+/c", "a/b/c"),
            ("a/+", "a/"),
            ("/+", "/a"),
            ("$SYS/#", "$SYS/x"),
            ("$SYS/+", "$SYS/x"),
            ("a/$x", "a/$x"),
            ("+/$x", "a/$x"),
        ];
        for (f, t) in yes {
            assert!(matches(f, t), "{f} should match {t}");
        }
        let no = [
            ("a/b", "a"),
            ("a", "a/b"),
            ("a/b", "a/c"),
            ("+", "a/b"),
            ("+", "/a"),
            ("a/+", "a"),
            ("a/+/c", "a/b/d"),
            ("#", "$SYS/x"),
            ("+/x", "$SYS/x"),
            ("+", "$SYS"),
            ("a/#", "b"),
            ("A", "a"),
        ];
        for (f, t) in no {
            assert!(!matches(f, t), "{f} should not match {t}");
        }
    }

    #[test]
    fn shared() {
        assert_eq!(parse_shared("a/b"), Ok(None));
        assert_eq!(parse_shared("$share"), Ok(None));
        assert_eq!(parse_shared("$SYS/x"), Ok(None));
        assert_eq!(parse_shared("$share/g/a/b"), Ok(Some(("g", "a/b"))));
        assert_eq!(parse_shared("$share/g/#"), Ok(Some(("g", "#"))));
        assert_eq!(parse_shared("$share/g//"), Ok(Some(("g", "/"))));
        for bad in [
            "$share/",
            "$share/g",
            "$share//x",
            "$share/g/",
            "$share/g+/x",
            "$share/#/x",
        ] {
            assert_eq!(parse_shared(bad), Err(MalformedShare), "{bad}");
        }
    }
}
