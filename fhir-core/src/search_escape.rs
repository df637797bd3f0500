//! The escaping rules of FHIR search parameter values (R4 §3.1.1.5.8).
//!
//! `\,`, `\|`, `\$` and `\\` stand for the literal characters; everything else is as written.
//! Shared by the store's conditional criteria and the search index's query parser.

/// Splits at `sep` where it is not escaped by a backslash; escapes are kept for [`unescape`].
pub fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            cur.push(c);
            if let Some(n) = chars.next() {
                cur.push(n);
            }
        } else if c == sep {
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

/// Removes FHIR search escapes (`\,` `\|` `\$` `\\`); a lone backslash stays.
pub fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\'
            && let Some(&n) = chars.peek()
            && matches!(n, ',' | '|' | '$' | '\\')
        {
            out.push(n);
            chars.next();
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_separators_do_not_split() {
        assert_eq!(split_unescaped(r"a\,b,c", ','), [r"a\,b", "c"]);
        assert_eq!(unescape(r"a\,b\|c\$d\\e\x"), r"a,b|c$d\e\x");
        assert_eq!(split_unescaped("", ','), [""]);
    }
}
