//! Text as people should read it: characters that are invisible, or that reorder what follows
//! them (bidi overrides), shown as `⟨U+202E⟩`. A command id `bidi-\u{202E}gpj.exe` would otherwise
//! read as `bidi-exe.jpg` on a page or in a terminal table; what people read must be what is
//! there.

use std::borrow::Cow;

/// Whether `c` is shown escaped: control characters (Cc), format characters (Cf: bidi
/// embeddings, overrides and isolates, zero-width and other invisible ones, the tag block),
/// variation selectors, line and paragraph separators, and the characters that render as nothing
/// (the combining grapheme joiner, the Hangul and Khmer fillers).
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{070F}' | '\u{06DD}' | '\u{08E2}'
            | '\u{0600}'..='\u{0605}'
            | '\u{0890}'..='\u{0891}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}' | '\u{FFA0}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{110BD}' | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E007F}'
            | '\u{E0100}'..='\u{E01EF}')
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

/// `text` with hidden characters shown escaped except line feeds and tabs (for message bodies
/// shown as blocks); a carriage return is shown, since at a terminal it rewrites the line.
pub fn visible_block(text: &str) -> Cow<'_, str> {
    escaped(text, |c| matches!(c, '\n' | '\t'))
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
        assert_eq!(visible_block("a\r\nb\tc"), "a⟨U+000D⟩\nb\tc");
    }

    #[test]
    fn characters_that_render_as_nothing_are_shown() {
        for c in [
            '\u{E0041}', // a tag character
            '\u{E0100}', // a variation selector (supplement)
            '\u{FE0F}',  // a variation selector
            '\u{3164}',  // the Hangul filler
            '\u{115F}',  // the Hangul choseong filler
            '\u{034F}',  // the combining grapheme joiner
            '\u{17B4}',  // a Khmer inherent vowel
            '\u{180B}',  // a Mongolian free variation selector
            '\t',
            '\r',
        ] {
            let text = format!("a{c}b");
            assert_eq!(visible(&text), format!("a⟨U+{:04X}⟩b", c as u32), "{c:?}");
        }
    }
}
