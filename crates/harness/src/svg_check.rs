//! For tests: a small structural XML check of the SVG pictures, with no XML crate in the tree.
//! It accepts what plotters writes (elements, quoted attributes, text with entities, an XML
//! declaration) and refuses unbalanced tags, stray `<` or `&`, unquoted attributes and a second
//! root.

use std::collections::BTreeMap;

/// An element: its name, attributes and the text directly inside it.
#[derive(Debug, Default)]
pub(crate) struct Element {
    pub(crate) name: String,
    pub(crate) attrs: BTreeMap<String, String>,
    pub(crate) text: String,
}

/// The elements of `xml` in document order, or what makes it ill-formed.
pub(crate) fn elements(xml: &str) -> Result<Vec<Element>, String> {
    let mut out: Vec<Element> = Vec::new();
    let mut open: Vec<(String, usize)> = Vec::new();
    let mut roots = 0;
    let mut rest = xml.trim_start();
    if let Some(decl) = rest.strip_prefix("<?xml") {
        rest = &decl[decl.find("?>").ok_or("unterminated XML declaration")? + 2..];
    }
    while !rest.is_empty() {
        let lt = rest.find('<').unwrap_or(rest.len());
        let text = &rest[..lt];
        check_text(text)?;
        match open.last() {
            Some(&(_, i)) => out[i].text.push_str(text),
            None if !text.trim().is_empty() => return Err(format!("text outside the root: {text:?}")),
            None => {}
        }
        rest = &rest[lt..];
        if rest.is_empty() {
            break;
        }
        let gt = rest.find('>').ok_or("unterminated tag")?;
        let tag = &rest[1..gt];
        rest = &rest[gt + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            match open.pop() {
                Some((n, _)) if n == name.trim() => continue,
                other => return Err(format!("</{name}> closes {other:?}")),
            }
        }
        let (body, empty) = match tag.strip_suffix('/') {
            Some(body) => (body, true),
            None => (tag, false),
        };
        let (name, attrs) = body.split_once(char::is_whitespace).unwrap_or((body, ""));
        if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || "-_:".contains(c)) {
            return Err(format!("bad element name in <{tag}>"));
        }
        if open.is_empty() {
            roots += 1;
        }
        out.push(Element {
            name: name.to_owned(),
            attrs: attributes(attrs)?,
            text: String::new(),
        });
        if !empty {
            open.push((name.to_owned(), out.len() - 1));
        }
    }
    match (open.last(), roots) {
        (Some((name, _)), _) => Err(format!("<{name}> is never closed")),
        (None, 1) => Ok(out),
        (None, n) => Err(format!("{n} root elements")),
    }
}

fn attributes(mut s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut attrs = BTreeMap::new();
    loop {
        s = s.trim_start();
        if s.is_empty() {
            return Ok(attrs);
        }
        let (name, after) = s
            .split_once('=')
            .ok_or_else(|| format!("attribute without a value: {s:?}"))?;
        let quote = after.chars().next().filter(|c| *c == '"' || *c == '\'');
        let quote = quote.ok_or_else(|| format!("unquoted attribute {name}"))?;
        let end = after[1..]
            .find(quote)
            .ok_or_else(|| format!("unterminated attribute {name}"))?;
        let value = &after[1..1 + end];
        check_text(value)?;
        if attrs.insert(name.trim().to_owned(), value.to_owned()).is_some() {
            return Err(format!("attribute {name} twice"));
        }
        s = &after[end + 2..];
    }
}

/// Character data: no `<`, and every `&` starts an entity.
fn check_text(text: &str) -> Result<(), String> {
    if text.contains('<') {
        return Err(format!("'<' in text {text:?}"));
    }
    for (i, _) in text.match_indices('&') {
        let entity = &text[i..text[i..].find(';').map_or(text.len(), |e| i + e + 1)];
        let known = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].contains(&entity)
            || (entity.starts_with("&#") && entity.ends_with(';'));
        if !known {
            return Err(format!("bad entity {entity:?}"));
        }
    }
    Ok(())
}

#[test]
fn refuses_what_is_not_xml() {
    assert!(elements(r#"<svg a="1"><g><text>x &amp; y</text></g></svg>"#).is_ok());
    for bad in [
        "<svg><g></svg>",
        "<svg></svg><svg></svg>",
        "<svg a=1></svg>",
        "<svg>a & b</svg>",
        "<svg><text>x</svg></text>",
        "<svg>",
    ] {
        assert!(elements(bad).is_err(), "{bad}");
    }
}
