//! Free text a client sends that ends up in journals, invoices and support tickets
//! (adjustment reasons, failure reasons, custom payment descriptions): one line of visible
//! text. Control characters (NUL, ANSI escapes, newlines, tabs), line and paragraph
//! separators and bidirectional overrides are refused, so what staff read in a journal or
//! on an invoice is what was sent, and a log line stays one line. Invisible characters
//! (zero-width space and joiners, word joiner, byte-order mark, soft hyphen, Hangul
//! fillers, variation selectors) are kept, but a text of nothing else is blank.
//!
//! [`ONE_LINE_PATTERN`] says the same in the OpenAPI document.

use super::Problem;

/// Characters refused anywhere in one line of text: C0 and C1 controls, the Arabic letter
/// mark, left-to-right and right-to-left marks, line and paragraph separators, bidi
/// embeddings, overrides and isolates, and interlinear annotations (which hide text).
pub fn is_forbidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FFF9}'..='\u{FFFB}')
}

/// Characters that show nothing on their own (format characters, Hangul fillers,
/// variation selectors): kept inside text (text pasted from documents and web pages
/// carries them, and some scripts and emoji need the joiners and selectors), but a text of
/// nothing else is blank.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200D}'
            | '\u{2060}'..='\u{2064}'
            | '\u{206A}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
    )
}

/// Whether `text` has something to see: a character other than whitespace and the
/// invisible ones.
fn is_visible(text: &str) -> bool {
    text.chars().any(|c| !c.is_whitespace() && !is_invisible(c))
}

/// JSON Schema `pattern` of one line of text: no forbidden character (the first class; the
/// syntax is one ECMA-262 and Python agree on) and at least one that is not blank either
/// (the second class adds the whitespace trimming removes).
pub const ONE_LINE_PATTERN: &str = concat!(
    r"^[^\u0000-\u001F\u007F-\u009F\u061C\u200E\u200F\u2028-\u202E\u2066-\u2069\uFFF9-\uFFFB]*",
    r"[^\u0000-\u001F\u007F-\u009F\u061C\u200E\u200F\u2028-\u202E\u2066-\u2069\uFFF9-\uFFFB",
    r"\u0020\u00A0\u00AD\u115F\u1160\u1680\u180E\u2000-\u200D\u202F\u205F-\u2064\u206A-\u206F",
    r"\u3000\u3164\uFE00-\uFE0F\uFEFF\uFFA0]",
    r"[^\u0000-\u001F\u007F-\u009F\u061C\u200E\u200F\u2028-\u202E\u2066-\u2069\uFFF9-\uFFFB]*$",
);

/// Longest free text (a reason, a description) accepted.
pub const MAX_TEXT_CHARS: usize = 500;

/// The schema of a required free-text field: one line, at most [`MAX_TEXT_CHARS`].
pub fn text_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .max_length(Some(MAX_TEXT_CHARS))
        .pattern(Some(ONE_LINE_PATTERN))
        .description(Some("One line of visible text: no control characters, line separators or bidirectional overrides"))
        .build()
}

/// The schema of an optional free-text field (`null` or absent means the default).
pub fn optional_text_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            utoipa::openapi::schema::Type::String,
            utoipa::openapi::schema::Type::Null,
        ]))
        .max_length(Some(MAX_TEXT_CHARS))
        .pattern(Some(ONE_LINE_PATTERN))
        .description(Some("One line of visible text: no control characters, line separators or bidirectional overrides"))
        .build()
}

/// Checks one line of text of at most `max` characters and returns it trimmed.
pub fn one_line<'a>(field: &str, value: &'a str, max: usize) -> Result<&'a str, Problem> {
    if value.chars().count() > max {
        return Err(Problem::validation(
            field,
            &format!("must be at most {max} characters"),
        ));
    }
    if let Some(c) = value.chars().find(|c| is_forbidden(*c)) {
        return Err(Problem::validation(
            field,
            &format!(
                "must be one line of visible text; U+{:04X} is not allowed",
                c as u32
            ),
        ));
    }
    let trimmed = value.trim();
    if !is_visible(trimmed) {
        return Err(Problem::validation(field, "must not be blank"));
    }
    Ok(trimmed)
}

/// Instants a query may name: the years 2000 to 2099, as written (in the offset it is
/// written in, as [`INSTANT_PATTERN`] says in the document). Anything else is a typo, and
/// arithmetic on it could overflow. Answers the instant in UTC.
pub fn instant(
    field: &str,
    t: Option<chrono::DateTime<chrono::FixedOffset>>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, Problem> {
    use chrono::Datelike;
    match t {
        Some(t) if !(2000..=2099).contains(&t.year()) => Err(Problem::validation(
            field,
            "must be in the years 2000 to 2099",
        )),
        other => Ok(other.map(|t| t.to_utc())),
    }
}

/// JSON Schema `pattern` of an instant [`instant`] accepts (with `format: date-time`).
pub const INSTANT_PATTERN: &str = "^20[0-9]{2}-";

/// JSON Schema `pattern` of several lines of text: like [`ONE_LINE_PATTERN`], with line
/// feeds and carriage returns allowed.
pub const PARAGRAPHS_PATTERN: &str = concat!(
    r"^[^\u0000-\u0009\u000B\u000C\u000E-\u001F\u007F-\u009F\u061C\u200E\u200F\u2028-\u202E\u2066-\u2069\uFFF9-\uFFFB]*",
    r"[^\u0000-\u001F\u007F-\u009F\u061C\u200E\u200F\u2028-\u202E\u2066-\u2069\uFFF9-\uFFFB",
    r"\u0020\u00A0\u00AD\u115F\u1160\u1680\u180E\u2000-\u200D\u202F\u205F-\u2064\u206A-\u206F",
    r"\u3000\u3164\uFE00-\uFE0F\uFEFF\uFFA0]",
    r"[^\u0000-\u0009\u000B\u000C\u000E-\u001F\u007F-\u009F\u061C\u200E\u200F\u2028-\u202E\u2066-\u2069\uFFF9-\uFFFB]*$",
);

/// The schema of a required multi-line text field of at most `max` characters.
pub fn paragraphs_schema(max: usize) -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .max_length(Some(max))
        .pattern(Some(PARAGRAPHS_PATTERN))
        .description(Some("Visible text in lines: no control characters other than line breaks, no line separators or bidirectional overrides"))
        .build()
}

/// Checks several lines of text of at most `max` characters: line breaks (`\n`, `\r\n`,
/// `\r`) are kept as `\n`, every other forbidden character is refused. Returns it trimmed.
pub fn paragraphs(field: &str, value: &str, max: usize) -> Result<String, Problem> {
    if value.chars().count() > max {
        return Err(Problem::validation(
            field,
            &format!("must be at most {max} characters"),
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| *c != '\n' && *c != '\r' && is_forbidden(*c))
    {
        return Err(Problem::validation(
            field,
            &format!(
                "must be visible text in lines; U+{:04X} is not allowed",
                c as u32
            ),
        ));
    }
    let text = value.replace("\r\n", "\n").replace('\r', "\n");
    let trimmed = text.trim();
    if !is_visible(trimmed) {
        return Err(Problem::validation(field, "must not be blank"));
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invisible_characters_alone_are_blank_and_kept_inside_text() {
        // Interlinear annotations hide text: refused.
        for bad in ["\u{fff9}", "a\u{fff9}shown\u{fffa}hidden\u{fffb}"] {
            assert!(one_line("reason", bad, 500).is_err(), "{bad:?}");
            assert!(paragraphs("text", bad, 500).is_err(), "{bad:?}");
        }
        for blank in [
            "\u{200b}",
            " \u{200c}\u{200d} ",
            "\u{feff}\u{ad}",
            "\u{2060}",
            "\u{3164}",
            "\u{115f}\u{1160}\u{ffa0}",
            "\u{fe0f}\u{206a}",
        ] {
            assert!(one_line("reason", blank, 500).is_err(), "{blank:?}");
            assert!(paragraphs("text", blank, 500).is_err(), "{blank:?}");
        }
        // Pasted text carries them; emoji sequences and Persian need the joiners.
        for ok in [
            "good\u{200b}will",
            "\u{feff}pasted",
            "dev \u{1F469}\u{200D}\u{1F4BB}",
            "love \u{2764}\u{FE0F}",
            "\u{645}\u{6CC}\u{200C}\u{62E}\u{648}\u{627}\u{647}\u{645}",
        ] {
            assert_eq!(one_line("reason", ok, 500).unwrap(), ok);
        }
    }

    #[test]
    fn instants_are_the_years_2000_to_2099_as_written() {
        let t = |s: &str| Some(chrono::DateTime::parse_from_rfc3339(s).unwrap());
        for ok in [
            "2000-01-01T00:00:00+05:00",
            "2026-06-01T12:00:00Z",
            "2099-12-31T23:59:59-05:00",
        ] {
            assert_eq!(
                instant("from", t(ok)).unwrap(),
                t(ok).map(|t| t.to_utc()),
                "{ok}"
            );
        }
        // The same instants as the first and last above, written in other years.
        for bad in [
            "1999-12-31T19:00:00Z",
            "2100-01-01T04:59:59Z",
            "1999-12-31T12:00:00Z",
            "1999-03-01T00:00:00Z",
            "2100-06-01T00:00:00Z",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
        ] {
            assert!(instant("from", t(bad)).is_err(), "{bad}");
        }
        assert_eq!(instant("from", None).unwrap(), None);
    }

    #[test]
    fn visible_text_passes_trimmed() {
        assert_eq!(
            one_line("r", "  goodwill für T-1042 ✓ ", 50).unwrap(),
            "goodwill für T-1042 ✓"
        );
    }

    #[test]
    fn controls_separators_and_bidi_overrides_are_refused() {
        for bad in [
            "a\u{0}b",
            "red \u{1b}[31m",
            "two\nlines",
            "tab\there",
            "x\u{85}",
            "evil\u{202e}gnp.exe",
            "iso\u{2066}late",
            "line\u{2028}sep",
            "mark\u{200f}",
        ] {
            assert_eq!(
                one_line("r", bad, 50).unwrap_err().code,
                "validation_failed",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn paragraphs_keep_line_breaks_and_refuse_other_controls() {
        assert_eq!(
            paragraphs("m", " first\r\nsecond\rthird\n", 50).unwrap(),
            "first\nsecond\nthird"
        );
        for bad in [
            "a\u{0}b",
            "tab\there",
            "red \u{1b}[31m",
            "evil\u{202e}x",
            "\n \n",
        ] {
            assert!(paragraphs("m", bad, 50).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn blank_and_overlong_text_is_refused() {
        assert!(one_line("r", " \u{a0}\u{3000} ", 50).is_err());
        assert!(one_line("r", "", 50).is_err());
        assert!(one_line("r", &"é".repeat(51), 50).is_err());
        assert!(one_line("r", &"é".repeat(50), 50).is_ok());
    }
}
