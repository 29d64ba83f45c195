//! CSV rows as RFC 4180 writes them: fields separated by commas, records ended by CRLF, a
//! field quoted when it holds a comma, a double quote, CR or LF, and a double quote inside
//! a quoted field doubled.
//!
//! Free text (reasons, notes, models) is also defused for spreadsheets: a text field that
//! starts with `=`, `+`, `-`, `@`, a tab or CR gets a leading `'`, so opening an export in a
//! spreadsheet never runs a formula someone typed into a reason. Numbers, ids and times
//! are written as they are.

/// One field of a row.
#[derive(Debug, Clone, Copy)]
pub enum Cell<'a> {
    /// Numbers, ids, timestamps, enum values: written as they are.
    Plain(&'a str),
    /// Free text someone typed: defused against formulas.
    Text(&'a str),
}

fn defuse(text: &str) -> std::borrow::Cow<'_, str> {
    match text.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{text}").into(),
        _ => text.into(),
    }
}

/// Appends one record (with its CRLF) to `out`.
pub fn write_row(out: &mut String, cells: &[Cell<'_>]) {
    for (i, cell) in cells.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let value = match cell {
            Cell::Plain(v) => std::borrow::Cow::Borrowed(*v),
            Cell::Text(v) => defuse(v),
        };
        if value.contains([',', '"', '\r', '\n']) {
            out.push('"');
            out.push_str(&value.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(&value);
        }
    }
    out.push_str("\r\n");
}

/// A header record from column names.
pub fn header(columns: &[&str]) -> String {
    let mut out = String::new();
    let cells: Vec<Cell<'_>> = columns.iter().map(|c| Cell::Plain(c)).collect();
    write_row(&mut out, &cells);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_what_needs_quoting() {
        let mut out = String::new();
        write_row(
            &mut out,
            &[
                Cell::Plain("-5"),
                Cell::Text("a,b"),
                Cell::Text("say \"hi\""),
                Cell::Text("two\nlines"),
                Cell::Text("=SUM(A1)"),
                Cell::Plain(""),
            ],
        );
        assert_eq!(
            out,
            "-5,\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\",'=SUM(A1),\r\n"
        );
    }
}
