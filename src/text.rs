//! Text as people should read it: characters that are invisible, or that reorder what follows
//! them (bidi overrides), shown as `⟨U+202E⟩`. A command id `bidi-\u{202E}gpj.exe` would otherwise
//! read as `bidi-exe.jpg` on a page or in a terminal table; what people read must be what is
//! there.

use std::borrow::Cow;

/// Whether `c` is shown escaped: control characters, bidi embeddings, overrides and isolates,
/// zero-width and other invisible format characters, line and paragraph separators.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00AD}' | '\u{061C}' | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}')
}

fn escaped(text: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !text.chars().any(|c| hidden(c) && !keep(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if hidden(c) && !keep(c) {
            out.push_str(&format!("⟨U+{:04X}⟩", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `text` on one line with every hidden character shown escaped (for table cells and fields).
pub fn visible(text: &str) -> Cow<'_, str> {
    escaped(text, |_| false)
}

/// `text` with hidden characters shown escaped except line breaks and tabs (for message bodies
/// shown as blocks).
pub fn visible_block(text: &str) -> Cow<'_, str> {
    escaped(text, |c| matches!(c, '\n' | '\t' | '\r'))
}

/// JSON text re-indented, every token kept as written (numbers are never re-formatted, so an
/// amount reads exactly as it was sent); `None` when it is not JSON.
pub fn pretty_json(text: &str) -> Option<String> {
    serde_json::from_str::<serde::de::IgnoredAny>(text).ok()?;
    let mut out = String::with_capacity(text.len() * 2);
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.push_str(&"  ".repeat(depth));
    };
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                let empty = matches!(chars.clone().find(|c| !c.is_whitespace()), Some('}' | ']'));
                if !empty {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                if !(out.ends_with('{') || out.ends_with('[')) {
                    depth = depth.saturating_sub(1);
                    newline(&mut out, depth);
                }
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reordering_and_invisible_characters_are_shown() {
        assert_eq!(visible("bidi-\u{202E}gpj.exe"), "bidi-⟨U+202E⟩gpj.exe");
        assert_eq!(visible("a\0b\u{1B}[31m"), "a⟨U+0000⟩b⟨U+001B⟩[31m");
        assert_eq!(
            visible("\u{2066}x\u{2069}\u{200B}"),
            "⟨U+2066⟩x⟨U+2069⟩⟨U+200B⟩"
        );
        assert_eq!(visible("line\nbreak"), "line⟨U+000A⟩break");
        assert_eq!(visible_block("line\nbreak\u{202E}"), "line\nbreak⟨U+202E⟩");
        assert!(matches!(visible("plain ünïcödé €"), Cow::Borrowed(_)));
        assert_eq!(visible("עברית العربية"), "עברית العربية");
    }
}
