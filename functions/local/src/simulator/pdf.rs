//! A minimal PDF 1.4 writer for the simulated invoice PDFs: one page of Helvetica text,
//! written by hand (catalog, page tree, page, font, content stream, cross-reference table)
//! so the local runner needs no PDF library.

/// A string literal for a PDF content stream: ASCII only (other characters become `?`,
/// `×` becomes `x`), with `\`, `(` and `)` escaped.
fn literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('(');
    for c in text.chars() {
        match c {
            '\\' | '(' | ')' => {
                out.push('\\');
                out.push(c);
            }
            '×' => out.push('x'),
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push(')');
    out
}

/// A one-page A4 document showing `lines` top to bottom; the first is set larger, as a
/// title. Lines beyond what the page holds are left out.
pub fn document(lines: &[String]) -> Vec<u8> {
    let mut content = String::from("BT\n/F1 16 Tf\n50 790 Td\n");
    for (i, line) in lines.iter().take(60).enumerate() {
        if i == 1 {
            content.push_str("/F1 10 Tf\n0 -10 Td\n");
        }
        content.push_str(&format!("{} Tj\n0 -14 Td\n", literal(line)));
    }
    content.push_str("ET\n");
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_owned(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_owned(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] \
         /Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>"
            .to_owned(),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
            .to_owned(),
        format!(
            "<< /Length {} >>\nstream\n{content}endstream",
            content.len()
        ),
    ];
    let mut pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n".to_vec();
    let mut offsets = Vec::with_capacity(objects.len());
    for (i, body) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf.extend_from_slice(format!("{} 0 obj\n{body}\nendobj\n", i + 1).as_bytes());
    }
    let xref = pdf.len();
    let mut table = format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1);
    for o in offsets {
        table.push_str(&format!("{o:010} 00000 n \n"));
    }
    table.push_str(&format!(
        "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
        objects.len() + 1
    ));
    pdf.extend_from_slice(table.as_bytes());
    pdf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_a_pdf_whose_cross_references_point_at_its_objects() {
        let pdf = document(&["Invoice (x)".into(), "1 × Max plan \\ $29.00".into()]);
        assert!(pdf.starts_with(b"%PDF-1.4\n"));
        assert!(pdf.ends_with(b"%%EOF\n"));
        let text = String::from_utf8_lossy(&pdf).into_owned();
        assert!(text.contains("(Invoice \\(x\\)) Tj"));
        assert!(text.contains("(1 x Max plan \\\\ $29.00) Tj"));
        let start: usize = text
            .rsplit("startxref\n")
            .next()
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let table = String::from_utf8(pdf[start..].to_vec()).unwrap();
        assert!(table.starts_with("xref\n0 6\n"));
        for (n, entry) in table.lines().skip(3).take(5).enumerate() {
            let offset: usize = entry[..10].parse().unwrap();
            let obj = format!("{} 0 obj", n + 1);
            assert!(pdf[offset..].starts_with(obj.as_bytes()), "{entry}");
        }
    }
}
