//! Search terms: how text becomes terms, and how terms become sealed tags.
//!
//! **Folding** ([`fold`]) is per character, so folding a string folds each of its substrings
//! the same way: Unicode lowercase (`char::to_lowercase`; final sigma `ς` folds to `σ`),
//! full-width ASCII (U+FF01..U+FF5E) to ASCII and the ideographic space to a space. Not
//! folded (a query must spell these as the text does): accents and other diacritics (`é` is
//! not `e`), compatibility forms other than full-width ASCII (ligatures such as `ﬁ`,
//! half-width katakana, circled and super-scripted digits), `ß` against `ss`, simplified
//! against traditional Chinese, hiragana against katakana.
//!
//! **Terms** ([`terms`]): the folded text splits into runs of letters and digits (with
//! combining marks). A run in a space-separated script is one word term. A run of CJK
//! characters (Han, hiragana, katakana, Hangul) gives its character bigrams and its single
//! characters, so any substring of two or more CJK characters is found through its bigrams
//! and a one-character query through its unigram. A word term is whole: part of a word in a
//! space-separated script (`cast` in `forecast`) is not a term and is not found.
//!
//! **Matching** ([`Needle::matches`]), the rule the decrypted text confirms with, with or
//! without an index: the folded text contains the folded query, and every term of the query
//! is a term of the text. An index holding every term of every text therefore finds a
//! superset of the matches, and confirming them on the decrypted text gives exactly the same
//! results as scanning everything.
//!
//! **Sealed tags** ([`SearchKey`]): a term is stored only as an 8-byte HMAC-SHA256 tag under
//! the tenant's search key, itself derived from a data key
//! (`tidings_log::crypto::DataKey::search_key`). Whoever reads the store or
//! the bucket sees tags, never words, and shredding the tenant's data keys leaves no way to
//! compute a query's tags. Eight bytes make two terms of one index collide with odds of
//! about 2^-64 per pair: a collision only adds a candidate, which the decrypted text rejects.

use std::collections::BTreeSet;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The bytes of a sealed term tag.
pub const TAG_LEN: usize = 8;

/// A term as the index stores it.
pub type Tag = [u8; TAG_LEN];

/// The longest query accepted by [`Needle::new`], in bytes (after folding): room for
/// compliance's 1,024 characters of CJK text. The gateway allows end users less.
pub const MAX_QUERY_BYTES: usize = 4096;

/// The most terms a query may have; more is refused rather than run slowly.
pub const MAX_QUERY_TERMS: usize = 256;

/// Folds one character into `out` (see the module documentation for what is folded).
fn fold_char(c: char, out: &mut String) {
    match c {
        '\u{FF01}'..='\u{FF5E}' => {
            // Full-width ASCII: same order as ASCII 0x21..0x7E.
            let ascii = char::from_u32(c as u32 - 0xFEE0).unwrap_or(c);
            out.extend(ascii.to_lowercase());
        }
        '\u{3000}' => out.push(' '),
        'ς' => out.push('σ'),
        c if c.is_ascii() => out.push(c.to_ascii_lowercase()),
        c => out.extend(c.to_lowercase()),
    }
}

/// The folded form of `text` (see the module documentation).
pub fn fold(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        fold_char(c, &mut out);
    }
    out
}

/// Whether `c` belongs to a script written without spaces between words, searched by
/// character bigrams: Han (CJK unified ideographs and their extensions and compatibility
/// forms), hiragana, katakana, Hangul.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF      // hiragana, katakana
        | 0x31F0..=0x31FF    // katakana phonetic extensions
        | 0x3400..=0x4DBF    // Han extension A
        | 0x4E00..=0x9FFF    // Han
        | 0xAC00..=0xD7AF    // Hangul syllables
        | 0x1100..=0x11FF    // Hangul jamo
        | 0x3130..=0x318F    // Hangul compatibility jamo
        | 0xF900..=0xFAFF    // Han compatibility
        | 0x20000..=0x3134F  // Han extensions B to G
    )
}

/// Whether `c` continues a word: letters, digits and the combining marks that change them
/// (Unicode general categories Mn/Mc are not exposed by std; the common combining blocks
/// are listed).
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric()
        || matches!(c as u32,
            0x0300..=0x036F      // combining diacritical marks
            | 0x0483..=0x0489    // Cyrillic combining
            | 0x0591..=0x05C7    // Hebrew points
            | 0x0610..=0x061A | 0x064B..=0x065F | 0x0670 // Arabic marks
            | 0x0900..=0x0903 | 0x093A..=0x094F | 0x0951..=0x0957 | 0x0962..=0x0963 // Devanagari
            | 0x0E31 | 0x0E34..=0x0E3A | 0x0E47..=0x0E4E // Thai
            | 0x1AB0..=0x1AFF | 0x1DC0..=0x1DFF | 0x20D0..=0x20FF // more combining marks
            | 0x3099..=0x309A    // kana voicing marks
        )
}

/// One term of a text. Words and CJK grams never equal each other (a word holds no CJK
/// character and a gram nothing else), so both hash in one space.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Term(String);

impl Term {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A run of folded text: a word of a space-separated script, or CJK characters.
enum Run<'a> {
    Word(&'a str),
    Cjk(Vec<char>),
}

/// Splits already folded text into word runs and CJK runs; everything else separates them.
fn runs(folded: &str) -> Vec<Run<'_>> {
    let mut out = Vec::new();
    let mut word_start: Option<usize> = None;
    let mut cjk_run: Vec<char> = Vec::new();
    for (i, c) in folded.char_indices() {
        let in_cjk = is_cjk(c);
        let in_word = !in_cjk && is_word_char(c);
        if !in_word && let Some(start) = word_start.take() {
            out.push(Run::Word(&folded[start..i]));
        }
        if !in_cjk && !cjk_run.is_empty() {
            out.push(Run::Cjk(std::mem::take(&mut cjk_run)));
        }
        if in_cjk {
            cjk_run.push(c);
        } else if in_word && word_start.is_none() {
            word_start = Some(i);
        }
    }
    if let Some(start) = word_start {
        out.push(Run::Word(&folded[start..]));
    }
    if !cjk_run.is_empty() {
        out.push(Run::Cjk(cjk_run));
    }
    out
}

/// The distinct terms of a document's text: words, and CJK bigrams plus unigrams.
pub fn terms(text: &str) -> BTreeSet<Term> {
    terms_of_folded(&fold(text))
}

/// The terms of already folded text.
fn terms_of_folded(folded: &str) -> BTreeSet<Term> {
    let mut out = BTreeSet::new();
    for run in runs(folded) {
        match run {
            Run::Word(w) => {
                out.insert(Term(w.to_string()));
            }
            Run::Cjk(run) => {
                out.extend(run.iter().map(|c| Term(c.to_string())));
                out.extend(run.windows(2).map(|p| Term(p.iter().collect())));
            }
        }
    }
    out
}

/// A term no text can have (texts' terms hold no control character), posted by the hot index
/// for every event of a kind (`message_edited`, `message_recalled`), so compliance lists a
/// conversation's edits and recalls without opening its other events.
pub fn kind_term(kind: &str) -> Term {
    Term(format!("\u{1}{kind}"))
}

/// The terms a query must find: its words, and for each CJK run its bigrams (its one
/// character if the run is one character long).
fn query_terms(folded: &str) -> BTreeSet<Term> {
    let mut out = BTreeSet::new();
    for run in runs(folded) {
        match run {
            Run::Word(w) => {
                out.insert(Term(w.to_string()));
            }
            Run::Cjk(run) if run.len() == 1 => {
                out.insert(Term(run[0].to_string()));
            }
            Run::Cjk(run) => out.extend(run.windows(2).map(|p| Term(p.iter().collect()))),
        }
    }
    out
}

/// Why a query is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("the query is empty")]
    Empty,
    #[error("the query is {bytes} bytes; the most is {MAX_QUERY_BYTES}")]
    TooLong { bytes: usize },
    #[error("the query has {terms} terms; the most is {MAX_QUERY_TERMS}")]
    TooManyTerms { terms: usize },
}

/// A query, folded, with its terms: what a text must contain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Needle {
    folded: String,
    terms: BTreeSet<Term>,
}

impl Needle {
    /// Folds and splits `query`. A query of punctuation only has no terms: it is matched
    /// by substring alone, and an index cannot help with it ([`Needle::terms`] is empty).
    pub fn new(query: &str) -> Result<Needle, QueryError> {
        let folded = fold(query);
        if folded.trim().is_empty() {
            return Err(QueryError::Empty);
        }
        if folded.len() > MAX_QUERY_BYTES {
            return Err(QueryError::TooLong {
                bytes: folded.len(),
            });
        }
        let terms = query_terms(&folded);
        if terms.len() > MAX_QUERY_TERMS {
            return Err(QueryError::TooManyTerms { terms: terms.len() });
        }
        Ok(Needle { folded, terms })
    }

    /// The terms every matching text has.
    pub fn terms(&self) -> &BTreeSet<Term> {
        &self.terms
    }

    /// Whether `text` matches: its folded form contains the folded query, and each of the
    /// query's terms is one of its terms (so a query word never matches part of a word).
    pub fn matches(&self, text: &str) -> bool {
        let folded = fold(text);
        if !folded.contains(&self.folded) {
            return false;
        }
        if self.terms.is_empty() {
            return true;
        }
        let have = terms_of_folded(&folded);
        self.terms.iter().all(|t| have.contains(t))
    }

    /// Where the query occurs in `text`, as byte ranges of `text` (for highlighting), in
    /// order and not overlapping. Empty if it does not match.
    pub fn highlights(&self, text: &str) -> Vec<std::ops::Range<usize>> {
        if !self.matches(text) {
            return Vec::new();
        }
        // Fold character by character, remembering where each folded byte came from.
        let mut folded = String::with_capacity(text.len());
        let mut origin: Vec<usize> = Vec::with_capacity(text.len() + 1);
        for (i, c) in text.char_indices() {
            let before = folded.len();
            fold_char(c, &mut folded);
            origin.extend(std::iter::repeat_n(i, folded.len() - before));
        }
        origin.push(text.len());
        let mut out = Vec::new();
        let mut from = 0;
        while let Some(at) = folded[from..].find(&self.folded) {
            let start = from + at;
            let end = start + self.folded.len();
            // The end maps to the start of the next source character.
            let src_end = origin[end..]
                .iter()
                .copied()
                .find(|&o| o > origin[start])
                .unwrap_or(text.len());
            out.push(origin[start]..src_end);
            from = end;
        }
        out
    }
}

/// A tenant's key for term tags, of one data key id: HMAC-SHA256 keyed with 32 bytes
/// derived from that data key. Cheap to clone. Shows only its id in `Debug`.
#[derive(Clone)]
pub struct SearchKey {
    pub id: u32,
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for SearchKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SearchKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Domain separation of term tags from anything else keyed by the search key.
const TERM_LABEL: &[u8] = b"tidings-term-v1\0";

impl SearchKey {
    /// Only `tidings_log::crypto::DataKey::search_key` makes one.
    #[doc(hidden)]
    pub fn from_secret(id: u32, secret: &[u8]) -> SearchKey {
        SearchKey {
            id,
            mac: <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key"),
        }
    }

    /// The sealed tag of a term.
    pub fn tag(&self, term: &Term) -> Tag {
        let mut mac = self.mac.clone();
        mac.update(TERM_LABEL);
        mac.update(term.0.as_bytes());
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        terms(text).into_iter().map(|t| t.0).collect()
    }

    #[test]
    fn words_fold_case_and_width() {
        assert_eq!(
            words("Quarterly FORECAST, ｆｉｎａｌ！"),
            ["final", "forecast", "quarterly"]
        );
        assert_eq!(fold("ＡＢＣ　１２３"), "abc 123");
        assert_eq!(fold("ΣΟΦΟΣ σοφος"), "σοφοσ σοφοσ");
        assert_eq!(words("naïve café"), ["café", "naïve"]);
        // Decomposed accents stay inside the word.
        assert_eq!(words("cafe\u{301} ok"), ["cafe\u{301}", "ok"]);
    }

    #[test]
    fn cjk_text_gives_bigrams_and_unigrams() {
        assert_eq!(
            words("新品发布"),
            ["发", "发布", "品", "品发", "布", "新", "新品"]
        );
        // Mixed scripts: the word and the CJK run split where the script changes.
        assert_eq!(
            words("iPhone发布会"),
            ["iphone", "会", "发", "发布", "布", "布会"]
        );
        assert_eq!(
            words("会議は３時"),
            ["3", "は", "会", "会議", "時", "議", "議は"]
        );
        assert_eq!(words("회의 시작"), ["시", "시작", "의", "작", "회", "회의"]);
    }

    #[test]
    fn a_needle_matches_whole_words_and_cjk_substrings() {
        let n = |q: &str| Needle::new(q).expect("query");
        assert!(n("forecast").matches("The Quarterly FORECAST attached"));
        assert!(n("quarterly forecast").matches("the quarterly forecast"));
        assert!(!n("cast").matches("forecast"), "part of a word");
        assert!(
            !n("forecast quarterly").matches("quarterly forecast"),
            "order"
        );
        assert!(n("ｆｏｒｅｃａｓｔ").matches("Forecast"));
        assert!(n("发布").matches("新品发布会"));
        assert!(n("布").matches("新品发布会"), "one CJK character");
        assert!(!n("发会").matches("新品发布会"));
        assert!(n("iphone 发布").matches("新 iPhone 发布会"));
        assert!(n("会議").matches("明日の会議は3時"));
        assert!(n("ärger").matches("STRASSE und ÄRGER"));
        assert!(n("σοφια").matches("ΣΟΦΙΑ"));
        assert!(n("!!!").matches("wow!!!"), "punctuation only: substring");
        assert!(n("!!!").terms().is_empty());
        let kind = kind_term("message_edited");
        for text in [
            "\u{1}message_edited",
            "message_edited",
            "\u{1}message edited",
        ] {
            assert!(!terms(text).contains(&kind), "{text:?}");
        }
    }

    #[test]
    fn bad_queries_are_typed_errors() {
        assert_eq!(Needle::new("  "), Err(QueryError::Empty));
        assert_eq!(
            Needle::new(&"a".repeat(MAX_QUERY_BYTES + 1)),
            Err(QueryError::TooLong {
                bytes: MAX_QUERY_BYTES + 1
            })
        );
        let many: Vec<String> = (0..=MAX_QUERY_TERMS).map(|i| format!("w{i}")).collect();
        assert!(matches!(
            Needle::new(&many.join(" ")),
            Err(QueryError::TooManyTerms { .. })
        ));
    }

    #[test]
    fn highlights_point_into_the_original_text() {
        let n = Needle::new("forecast").expect("query");
        let text = "FORECAST and ｆｏｒｅｃａｓｔ";
        let spans: Vec<&str> = n.highlights(text).into_iter().map(|r| &text[r]).collect();
        assert_eq!(spans, ["FORECAST", "ｆｏｒｅｃａｓｔ"]);
        let n = Needle::new("发布").expect("query");
        let text = "新品发布会";
        let spans: Vec<&str> = n.highlights(text).into_iter().map(|r| &text[r]).collect();
        assert_eq!(spans, ["发布"]);
        assert!(
            Needle::new("cast")
                .expect("q")
                .highlights("forecast")
                .is_empty()
        );
    }

    #[test]
    fn tags_depend_on_the_key_and_never_show_the_term() {
        let a = SearchKey::from_secret(1, &[7u8; 64]);
        let b = SearchKey::from_secret(1, &[8u8; 64]);
        let term = Term("bluebird".into());
        assert_eq!(a.tag(&term), a.tag(&term));
        assert_ne!(a.tag(&term), b.tag(&term));
        assert_ne!(a.tag(&term), a.tag(&Term("bluebirds".into())));
        assert!(!format!("{a:?}").contains('7'));
    }
}
