//! How values become index terms: normalisation of strings, order-preserving text encodings of
//! numbers and instants, and the layout `key SEP part SEP part …` shared by indexing and
//! querying.
//!
//! Every term of a field starts with its *key*: the parameter's code, or for a component of a
//! composite parameter `code$form$…` (see [`composite_key`]). The key is followed by
//! [`SEP`], so that one parameter's terms form a contiguous range of the term dictionary and a
//! prefix or range query never strays into another parameter.

use std::cell::RefCell;

use tantivy::tokenizer::{AsciiFoldingFilter, LowerCaser, RawTokenizer, TextAnalyzer};

/// Separates the parts of a term. ASCII unit separator: it cannot be typed in a URL by
/// accident, and values have it removed ([`clean`]).
pub(crate) const SEP: char = '\u{1f}';

/// Longest term, in bytes. Longer values are cut (at a character boundary): a match on the
/// first 400 bytes is then taken as a match on the whole value.
pub(crate) const MAX_TERM_BYTES: usize = 400;

/// Longest word suffix indexed for word-prefix matching (`:text`, `_text`).
const MAX_WORD_SUFFIX_BYTES: usize = 48;

/// Most word suffixes indexed per value, so that a long narrative stays affordable.
const MAX_WORDS: usize = 200;

thread_local! {
    static FOLDER: RefCell<TextAnalyzer> = RefCell::new(
        TextAnalyzer::builder(RawTokenizer::default())
            .filter(LowerCaser)
            .filter(AsciiFoldingFilter)
            .build(),
    );
}

/// Case- and accent-insensitive form of a string, as FHIR string search compares them:
/// lower case, accents removed and letters folded to ASCII where Unicode has a folding (`Ø` → `o`,
/// `Å` → `a`, `æ` → `ae`, `é` → `e`), white space collapsed.
pub fn normalize(s: &str) -> String {
    let collapsed = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let folded = FOLDER.with(|f| {
        let mut analyzer = f.borrow_mut();
        let mut stream = analyzer.token_stream(&collapsed);
        let mut out = String::with_capacity(collapsed.len());
        while stream.advance() {
            out.push_str(&stream.token().text);
        }
        out
    });
    clean(&folded)
}

/// The value without [`SEP`] (and other control characters), so that it cannot forge a term of
/// another layout.
pub(crate) fn clean(s: &str) -> String {
    if s.chars().any(char::is_control) {
        s.chars().filter(|c| !c.is_control()).collect()
    } else {
        s.to_string()
    }
}

/// Cuts `s` to at most `max` bytes at a character boundary.
pub(crate) fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `key SEP part SEP part …`, cut to [`MAX_TERM_BYTES`].
pub(crate) fn term(key: &str, parts: &[&str]) -> String {
    let mut t =
        String::with_capacity(key.len() + 1 + parts.iter().map(|p| p.len() + 1).sum::<usize>());
    t.push_str(key);
    for p in parts {
        t.push(SEP);
        t.push_str(p);
    }
    cut(&t, MAX_TERM_BYTES).to_string()
}

/// `key SEP` followed by `parts`, each followed by `SEP`: the common start of every term of a
/// range query (numbers and instants are appended to it).
pub(crate) fn prefix(key: &str, parts: &[&str]) -> String {
    let mut t = String::from(key);
    t.push(SEP);
    for p in parts {
        t.push_str(p);
        t.push(SEP);
    }
    t
}

/// An `i64` as 16 hex digits whose text order is the numeric order.
pub(crate) fn hex_i64(v: i64) -> String {
    format!("{:016x}", (v as u64) ^ (1 << 63))
}

/// An `f64` as 16 hex digits whose text order is the numeric order (IEEE 754 bits with the
/// sign bit flipped for positive numbers and all bits flipped for negative ones).
pub(crate) fn hex_f64(v: f64) -> String {
    let v = if v == 0.0 { 0.0 } else { v };
    let bits = v.to_bits();
    let ordered = if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    };
    format!("{ordered:016x}")
}

/// The suffixes of `normalized` that start at a word, each cut to a few dozen bytes: indexing
/// them makes "a word of the text starts with …" a prefix query.
pub(crate) fn word_suffixes(normalized: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut prev_alnum = false;
    for (i, c) in normalized.char_indices() {
        let alnum = c.is_alphanumeric();
        if alnum && !prev_alnum {
            out.push(cut(&normalized[i..], MAX_WORD_SUFFIX_BYTES));
            if out.len() == MAX_WORDS {
                break;
            }
        }
        prev_alnum = alnum;
    }
    out
}

/// The key of a composite parameter's last component, given the forms of the components
/// before it (see [`token_forms`]).
pub(crate) fn composite_key(code: &str, forms: &[&str]) -> String {
    let mut k = code.to_string();
    for f in forms {
        k.push('$');
        k.push_str(f);
    }
    k
}

/// The ways a composite's leading token can be asked for, as composite-key forms: `c:code`
/// (any system), `s:system|code`, `n:code` (no system). (`system|` alone, any code of a system,
/// is not offered in composites: it would multiply their terms for a search nobody makes.)
pub(crate) fn token_forms(system: Option<&str>, code: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(c) = code {
        out.push(format!("c:{}", clean(c)));
        match system {
            Some(s) => out.push(format!("s:{}|{}", clean(s), clean(c))),
            None => out.push(format!("n:{}", clean(c))),
        }
    }
    out
}

/// Shortens a user-supplied text for an error message.
pub(crate) fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(80).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_folds_case_and_accents() {
        assert_eq!(normalize("  Søren  Ærlig Åse "), "soren aerlig ase");
        assert_eq!(normalize("ÉLISE"), "elise");
        assert_eq!(normalize("Nordmann"), "nordmann");
    }

    #[test]
    fn encodings_keep_order() {
        let ints = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        for w in ints.windows(2) {
            assert!(hex_i64(w[0]) < hex_i64(w[1]), "{w:?}");
        }
        let floats = [
            f64::NEG_INFINITY,
            -1e10,
            -2.5,
            -0.0001,
            0.0,
            1e-9,
            72.5,
            1e300,
        ];
        for w in floats.windows(2) {
            assert!(hex_f64(w[0]) < hex_f64(w[1]), "{w:?}");
        }
        assert_eq!(hex_f64(-0.0), hex_f64(0.0));
    }

    #[test]
    fn words_and_escapes() {
        assert_eq!(
            word_suffixes("systolic blood-pressure"),
            ["systolic blood-pressure", "blood-pressure", "pressure"]
        );
        assert_eq!(cut("æøå", 3), "æ");
        assert!(!clean("a\u{1f}b").contains(SEP));
    }
}
