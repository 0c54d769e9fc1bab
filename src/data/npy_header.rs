//! The `.npy` header: the prefix (magic, version, header length) and the Python dict literal
//! numpy writes after it, parsed in one pass (work linear in the header's length, nesting
//! bounded), with one-line errors that give the byte offset and never echo control characters.

/// The magic string every `.npy` file starts with.
pub(crate) const MAGIC: &[u8] = b"\x93NUMPY";

/// Longest prefix: magic (6), version (2) and a 4-byte header length (versions 2.0 and 3.0).
pub(crate) const MAX_PREFIX: usize = 12;

/// Longest header text read. The dtypes sae reads need well under 200 bytes; numpy itself
/// refuses headers over 10 000 bytes by default. The cap keeps a corrupt length field from
/// making the reader allocate gigabytes.
pub(crate) const MAX_HEADER: u64 = 1 << 20;

/// Most dimensions a numpy array has (`NPY_MAXDIMS` in numpy 2; 32 before).
const MAX_DIMS: usize = 64;

/// Deepest nesting of brackets accepted: the dict (1), a structured descr's list (2), a field's
/// tuple (3) and its shape or title (4), with room for a nested structured field or two.
const MAX_DEPTH: usize = 8;

/// What the fixed-size prefix says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Prefix {
    /// Byte offset of the header text (10 or 12).
    pub text_start: u64,
    /// Length of the header text in bytes, padding and '\n' included.
    pub text_len: u64,
    /// Version 3.0 headers are utf-8; 1.0 and 2.0 are latin-1.
    pub utf8: bool,
}

impl Prefix {
    /// Where the data begins.
    pub fn data_start(&self) -> u64 {
        self.text_start + self.text_len
    }
}

/// Parses the first bytes of a file (up to [`MAX_PREFIX`] of them; fewer when the file is
/// shorter). The error is the reason, for `DataError::NotNpy`.
pub(crate) fn parse_prefix(head: &[u8]) -> Result<Prefix, String> {
    if head.is_empty() {
        return Err("the file is empty".into());
    }
    if !head.starts_with(MAGIC) {
        return Err("it does not start with the \\x93NUMPY magic".into());
    }
    let short = || {
        format!(
            "the file ends after {} bytes, inside the header's prefix",
            head.len()
        )
    };
    let (major, minor) = match head.get(6..8) {
        Some(&[major, minor]) => (major, minor),
        _ => return Err(short()),
    };
    let (width, utf8) = match (major, minor) {
        (1, 0) => (2, false),
        (2, 0) => (4, false),
        (3, 0) => (4, true),
        _ => {
            return Err(format!(
                "format version {major}.{minor}; sae reads versions 1.0, 2.0 and 3.0"
            ))
        }
    };
    let field = head.get(8..8 + width).ok_or_else(short)?;
    let text_len = field
        .iter()
        .rev()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    Ok(Prefix {
        text_start: 8 + width as u64,
        text_len,
        utf8,
    })
}

/// The array's element type as the header states it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Descr {
    /// A numpy type string such as `<f4` (undecoded escapes aside, as written).
    Plain(String),
    /// A structured dtype: the list's text as written.
    Structured(String),
}

/// The three keys of a header dict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub descr: Descr,
    pub fortran_order: bool,
    pub shape: Vec<u64>,
}

/// Why a header text is not a valid header, and the descr if the parser got that far (so that
/// a broken header can still blame a dtype sae does not read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HeaderError {
    /// One line, control characters escaped.
    pub reason: String,
    pub descr: Option<Descr>,
}

/// Parses the header text (the bytes after the prefix, up to the data) as numpy writes it:
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`, keys in any order, single or
/// double quotes, optional trailing commas, whitespace, padding and a final '\n'. Other keys
/// are parsed and ignored.
pub(crate) fn parse_header(text: &[u8], utf8: bool) -> Result<Header, HeaderError> {
    if utf8 {
        if let Err(err) = std::str::from_utf8(text) {
            return Err(HeaderError {
                reason: format!(
                    "the format 3.0 header is not utf-8 at byte {} of the header",
                    err.valid_up_to()
                ),
                descr: None,
            });
        }
    }
    let mut parser = Parser {
        text,
        utf8,
        pos: 0,
        descr: None,
    };
    let result = parser.header();
    result.map_err(|reason| HeaderError {
        reason,
        descr: parser.descr,
    })
}

/// Text from a file, fit for an error message: escaped as the crate's other file text is
/// ([`crate::error::escape_controls`]), and cut when long.
pub(crate) fn escape(text: &str) -> String {
    const MAX_CHARS: usize = 400;
    match text.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{} [...]", crate::error::escape_controls(&text[..cut])),
        None => crate::error::escape_controls(text),
    }
}

/// A parsed Python literal. Only what the three keys need is kept; spans give the raw text.
enum Value {
    Str(String),
    Bool(bool),
    /// An integer: `None` when past u64.
    Int {
        negative: bool,
        magnitude: Option<u64>,
    },
    /// Floats, `None` and the like: legal, but no key sae reads takes them.
    Other,
    /// A tuple (or, with `list`, a list) of values.
    Seq {
        items: Vec<Value>,
        list: bool,
    },
    Dict,
}

struct Parser<'a> {
    text: &'a [u8],
    utf8: bool,
    pos: usize,
    /// The `'descr'` value once parsed.
    descr: Option<Descr>,
}

type Parsed<T> = Result<T, String>;

impl Parser<'_> {
    fn header(&mut self) -> Parsed<Header> {
        self.skip_ws();
        if self.peek() != Some(b'{') {
            return Err(self.expected("'{' (the header is a Python dict)"));
        }
        self.pos += 1;
        let (mut fortran_order, mut shape) = (None, None);
        self.items(b'}', |p| {
            let key_at = p.pos;
            let key = match p.value(1)? {
                Value::Str(key) => key,
                _ => {
                    return Err(format!(
                        "a key that is not a string at byte {key_at} of the header"
                    ))
                }
            };
            p.skip_ws();
            if p.peek() != Some(b':') {
                return Err(p.expected("':' after a key"));
            }
            p.pos += 1;
            p.skip_ws();
            let value_at = p.pos;
            let value = p.value(1)?;
            let duplicate = match (key.as_str(), value) {
                ("descr", Value::Str(s)) => p.descr.replace(Descr::Plain(s)).is_some(),
                ("descr", Value::Seq { list: true, .. }) => {
                    let text = p.decode(&p.text[value_at..p.pos]);
                    p.descr.replace(Descr::Structured(text)).is_some()
                }
                ("descr", _) => {
                    return Err(format!(
                        "'descr' at byte {value_at} of the header is neither a string nor a list"
                    ))
                }
                ("fortran_order", Value::Bool(b)) => fortran_order.replace(b).is_some(),
                ("fortran_order", _) => {
                    return Err(format!(
                        "'fortran_order' at byte {value_at} of the header is not True or False"
                    ))
                }
                ("shape", value) => shape.replace(dims(value, value_at)?).is_some(),
                _ => false,
            };
            if duplicate {
                return Err(format!("the key '{}' appears twice", escape(&key)));
            }
            Ok(())
        })?;
        self.skip_ws();
        if self.pos < self.text.len() {
            return Err(self.expected("only padding after the header dict"));
        }
        let missing = |key: &str| format!("the header dict has no '{key}' key");
        Ok(Header {
            descr: self.descr.clone().ok_or_else(|| missing("descr"))?,
            fortran_order: fortran_order.ok_or_else(|| missing("fortran_order"))?,
            shape: shape.ok_or_else(|| missing("shape"))?,
        })
    }

    /// Comma-separated items up to `close` (a trailing comma allowed), the opening bracket
    /// already consumed; returns whether a comma was seen.
    fn items(&mut self, close: u8, mut item: impl FnMut(&mut Self) -> Parsed<()>) -> Parsed<bool> {
        let mut comma = false;
        loop {
            self.skip_ws();
            if self.peek() == Some(close) {
                self.pos += 1;
                return Ok(comma);
            }
            item(self)?;
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    comma = true;
                }
                Some(c) if c == close => {
                    self.pos += 1;
                    return Ok(comma);
                }
                _ => return Err(self.expected(&format!("',' or '{}'", close as char))),
            }
        }
    }

    /// One literal; `depth` counts the brackets it sits in.
    fn value(&mut self, depth: usize) -> Parsed<Value> {
        self.skip_ws();
        let Some(c) = self.peek() else {
            return Err(self.expected("a value"));
        };
        match c {
            b'\'' | b'"' => self.string(c),
            b'(' | b'[' | b'{' => {
                if depth >= MAX_DEPTH {
                    return Err(format!(
                        "brackets nested deeper than {MAX_DEPTH} levels at byte {} of the header; no header \
                         sae reads needs more",
                        self.pos
                    ));
                }
                self.pos += 1;
                match c {
                    b'{' => {
                        self.items(b'}', |p| {
                            p.value(depth + 1)?;
                            p.skip_ws();
                            if p.peek() != Some(b':') {
                                return Err(p.expected("':' after a key"));
                            }
                            p.pos += 1;
                            p.value(depth + 1).map(drop)
                        })?;
                        Ok(Value::Dict)
                    }
                    _ => {
                        let close = if c == b'(' { b')' } else { b']' };
                        let mut items = Vec::new();
                        let comma = self.items(close, |p| {
                            items.push(p.value(depth + 1)?);
                            Ok(())
                        })?;
                        // `(x)` is x in parentheses, not a tuple.
                        if c == b'(' && !comma && items.len() == 1 {
                            return Ok(items.pop().expect("one item"));
                        }
                        Ok(Value::Seq {
                            items,
                            list: c == b'[',
                        })
                    }
                }
            }
            b'0'..=b'9' | b'-' | b'+' | b'.' => self.number(),
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = self.pos;
                while self
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
                {
                    self.pos += 1;
                }
                match &self.text[start..self.pos] {
                    b"True" => Ok(Value::Bool(true)),
                    b"False" => Ok(Value::Bool(false)),
                    b"None" => Ok(Value::Other),
                    _ => Err(format!(
                        "unknown name '{}' at byte {start} of the header",
                        self.raw(start, self.pos)
                    )),
                }
            }
            _ => Err(self.expected("a value")),
        }
    }

    /// A quoted string (escapes `\\`, `\'`, `\"`, `\n`, `\t`, `\r` and `\0` decoded, others
    /// kept as written), the opening quote under the cursor.
    fn string(&mut self, quote: u8) -> Parsed<Value> {
        let start = self.pos;
        self.pos += 1;
        let mut bytes = Vec::new();
        loop {
            match self.peek() {
                None | Some(b'\n') => {
                    return Err(format!(
                        "a string opened at byte {start} of the header is not closed"
                    ))
                }
                Some(c) if c == quote => {
                    self.pos += 1;
                    break;
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let Some(e) = self.peek() else { continue };
                    self.pos += 1;
                    match e {
                        b'\\' | b'\'' | b'"' => bytes.push(e),
                        b'n' => bytes.push(b'\n'),
                        b't' => bytes.push(b'\t'),
                        b'r' => bytes.push(b'\r'),
                        b'0' => bytes.push(0),
                        _ => bytes.extend([b'\\', e]),
                    }
                }
                Some(c) => {
                    bytes.push(c);
                    self.pos += 1;
                }
            }
        }
        Ok(Value::Str(self.decode(&bytes)))
    }

    /// An integer (`[+-]digits`, an `L` suffix allowed, as Python 2's numpy wrote), or a float
    /// (kept as [`Value::Other`]).
    fn number(&mut self) -> Parsed<Value> {
        let start = self.pos;
        let negative = self.peek() == Some(b'-');
        if matches!(self.peek(), Some(b'-' | b'+')) {
            self.pos += 1;
        }
        let digits_at = self.pos;
        while let Some(c) = self.peek() {
            let exponent_sign = matches!(c, b'+' | b'-')
                && self.pos > digits_at
                && matches!(self.text[self.pos - 1], b'e' | b'E');
            if !(c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || exponent_sign) {
                break;
            }
            self.pos += 1;
        }
        let token = &self.text[digits_at..self.pos];
        let digits = token.strip_suffix(b"L").unwrap_or(token);
        if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) {
            let magnitude = digits.iter().try_fold(0u64, |acc, &d| {
                acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
            });
            return Ok(Value::Int {
                negative,
                magnitude,
            });
        }
        let text = self.raw(start, self.pos);
        if text.replace('_', "").parse::<f64>().is_ok() {
            Ok(Value::Other)
        } else {
            Err(format!(
                "'{text}' at byte {start} of the header is not a number"
            ))
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r' | b'\x0c')) {
            self.pos += 1;
        }
    }

    fn decode(&self, bytes: &[u8]) -> String {
        if self.utf8 {
            // The whole text was checked to be utf-8, and escapes only touch ASCII bytes.
            String::from_utf8_lossy(bytes).into_owned()
        } else {
            bytes.iter().map(|&b| char::from(b)).collect()
        }
    }

    /// The text of `start..end`, escaped for a message.
    fn raw(&self, start: usize, end: usize) -> String {
        escape(&self.decode(&self.text[start..end]))
    }

    /// "expected X at byte N, found Y".
    fn expected(&self, what: &str) -> String {
        let found = match self.peek() {
            None => "the end of the header".to_string(),
            Some(_) => {
                // One character: up to 4 bytes in utf-8, one in latin-1.
                let end = (self.pos + if self.utf8 { 4 } else { 1 }).min(self.text.len());
                let text = self.decode(&self.text[self.pos..end]);
                let c = text.chars().next().expect("a byte is there");
                format!("'{}'", escape(&c.to_string()))
            }
        };
        format!(
            "expected {what} at byte {} of the header, found {found}",
            self.pos
        )
    }
}

/// The dimensions of a `'shape'` value: a tuple (or list) of non-negative integers.
fn dims(value: Value, at: usize) -> Parsed<Vec<u64>> {
    let Value::Seq { items, .. } = value else {
        return Err(format!("'shape' at byte {at} of the header is not a tuple"));
    };
    if items.len() > MAX_DIMS {
        return Err(format!(
            "'shape' at byte {at} of the header has {} dimensions; numpy arrays have at most \
             {MAX_DIMS}",
            items.len()
        ));
    }
    items
        .into_iter()
        .map(|item| match item {
            Value::Int {
                negative: false,
                magnitude: Some(n),
            } => Ok(n),
            Value::Int {
                magnitude: Some(0), ..
            } => Ok(0),
            Value::Int { negative: true, .. } => Err(format!(
                "'shape' at byte {at} of the header has a negative dimension"
            )),
            Value::Int { .. } => Err(format!(
                "'shape' at byte {at} of the header has a dimension past 2^64"
            )),
            _ => Err(format!(
                "'shape' at byte {at} of the header has a dimension that is not an integer"
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Header, HeaderError> {
        parse_header(text.as_bytes(), true)
    }

    fn reason(text: &str) -> String {
        match parse(text) {
            Ok(header) => panic!("{text:?} parsed as {header:?}"),
            Err(err) => {
                assert!(!err.reason.contains('\n'), "{:?}", err.reason);
                err.reason
            }
        }
    }

    #[test]
    fn numpy_headers_parse() {
        let header =
            parse("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }          \n")
                .unwrap();
        assert_eq!(
            header,
            Header {
                descr: Descr::Plain("<f4".into()),
                fortran_order: false,
                shape: vec![3, 4],
            }
        );
        for (text, shape, fortran) in [
            ("{'shape': (5,), 'fortran_order': True, 'descr': '<f2'}", vec![5], true),
            ("{\"descr\":\"<f2\",\"fortran_order\":True,\"shape\":()}", vec![], true),
            ("  {'descr': '<f2', 'fortran_order': False, 'shape': (2L, 3L)}\n", vec![2, 3], false),
            ("{'descr': '<f2', 'fortran_order': False, 'shape': [2, 3], 'x': {1: (None, 1.5e-3)},}", vec![2, 3], false),
            ("{'descr':'<f2','fortran_order':False,'shape':(+2,-0,)}\t\r\x0c", vec![2, 0], false),
        ] {
            let header = parse(text).unwrap_or_else(|e| panic!("{text}: {e:?}"));
            assert_eq!((header.shape, header.fortran_order), (shape, fortran), "{text}");
            assert_eq!(header.descr, Descr::Plain("<f2".into()));
        }
    }

    #[test]
    fn a_list_descr_is_structured_and_kept_as_written() {
        let text = "{'descr': [('x', '<f4'), (('t', 'y'), '<f4', (3,)), ('z', [('a', '|u1')])], \
                    'fortran_order': False, 'shape': (3,), }";
        assert_eq!(
            parse(text).unwrap().descr,
            Descr::Structured(
                "[('x', '<f4'), (('t', 'y'), '<f4', (3,)), ('z', [('a', '|u1')])]".into()
            )
        );
    }

    #[test]
    fn latin1_and_utf8_strings_decode() {
        let latin1 = b"{'descr': '<f4\xfc', 'fortran_order': False, 'shape': (1,)}";
        assert_eq!(
            parse_header(latin1, false).unwrap().descr,
            Descr::Plain("<f4ü".into())
        );
        assert!(parse_header(latin1, true)
            .unwrap_err()
            .reason
            .contains("header is not utf-8 at byte 14 of the header"));
        let escaped = r#"{'descr': '<\'f4\\', 'fortran_order': False, 'shape': (1,)}"#;
        assert_eq!(parse(escaped).unwrap().descr, Descr::Plain("<'f4\\".into()));
    }

    #[test]
    fn syntax_errors_say_what_was_expected_where() {
        assert_eq!(
            reason("{'descr' '<f4'}"),
            "expected ':' after a key at byte 9 of the header, found '''"
        );
        assert_eq!(
            reason("{'descr': '<f4' 'shape': (1,)}"),
            "expected ',' or '}' at byte 16 of the header, found '''"
        );
        assert_eq!(
            reason(""),
            "expected '{' (the header is a Python dict) at byte 0 of the header, found the end \
             of the header"
        );
        assert!(reason("{'descr': '<f4")
            .contains("string opened at byte 10 of the header is not closed"));
        assert!(reason("{'descr': x}").contains("unknown name 'x' at byte 10 of the header"));
        assert!(
            reason("{'descr': 1.2.3}").contains("'1.2.3' at byte 10 of the header is not a number")
        );
        assert!(reason("{1: 2}").contains("a key that is not a string at byte 1 of the header"));
        assert!(
            reason("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)} x")
                .contains("expected only padding after the header dict at byte 56")
        );
        assert!(reason("{'shape': (1,), 'shape': (1,)}").contains("'shape' appears twice"));
        assert!(reason("{'shape': (2.0,)}").contains("not an integer"));
        assert!(reason("{'shape': (-1,)}").contains("negative"));
        assert!(reason("{'shape': (18446744073709551616,)}").contains("past 2^64"));
        assert!(
            reason("{'shape': (3)}").contains("'shape' at byte 10 of the header is not a tuple")
        );
        assert!(reason("{'fortran_order': 0}").contains("not True or False"));
        assert!(reason("{'descr': 4}").contains("neither a string nor a list"));
        assert!(reason("{'descr': '<f4', 'shape': (1,)}").contains("no 'fortran_order' key"));
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = format!("{{'x': {}{}}}", "[".repeat(7), "]".repeat(7));
        assert!(reason(&deep).contains("no 'descr'"));
        let deeper = format!("{{'x': {}{}}}", "[".repeat(8), "]".repeat(8));
        assert!(reason(&deeper).contains("nested deeper than 8 levels at byte 13 of the header"));
        assert!(reason(&"{".repeat(100_000))
            .contains("nested deeper than 8 levels at byte 8 of the header"));
    }

    #[test]
    fn a_broken_header_keeps_the_descr_it_read() {
        let err = parse("{'descr': '<i4', 'shape': (2, 4) x}").unwrap_err();
        assert_eq!(err.descr, Some(Descr::Plain("<i4".into())));
        assert_eq!(
            parse("{'shape': (1,) 'descr': '<i4'}").unwrap_err().descr,
            None
        );
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape("\x1b[2J<f4'\u{7f}é"), "\\u{1b}[2J<f4'\\u{7f}é");
        let err = reason("{'descr': \x1b}");
        assert!(err.ends_with("found '\\u{1b}'"), "{err}");
        assert!(escape(&"a".repeat(1000)).ends_with(" [...]"));
    }

    #[test]
    fn prefixes() {
        assert_eq!(
            parse_prefix(b"\x93NUMPY\x01\x00\x11\x00"),
            Ok(Prefix {
                text_start: 10,
                text_len: 17,
                utf8: false
            })
        );
        let v3 = parse_prefix(b"\x93NUMPY\x03\x00\x00\x01\x00\x01").unwrap();
        assert_eq!(
            (v3.text_len, v3.utf8, v3.data_start()),
            (0x0100_0100, true, 0x0100_010c)
        );
        assert!(parse_prefix(b"").unwrap_err().contains("empty"));
        assert!(parse_prefix(b"\x93NUMP").unwrap_err().contains("magic"));
        assert!(parse_prefix(b"\x93NUMPY\x02\x00\x01")
            .unwrap_err()
            .contains("ends after 9 bytes, inside the header's prefix"));
        assert!(parse_prefix(b"\x93NUMPY\x09\x09\x00\x00")
            .unwrap_err()
            .contains("version 9.9"));
    }
}
