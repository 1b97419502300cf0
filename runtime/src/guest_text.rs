//! Text that came from the guest, made safe to show to a person.
//!
//! Agent error messages, the guest's kernel release and the guest console reach users'
//! terminals. A hostile guest controls all of them, and an escape sequence in them
//! (`ESC ] 0 ; … BEL` sets the window title, CSI sequences move the cursor, rewrite lines,
//! and on some terminals answer back into the input) would act on the user's terminal.
//! Everything that is not printable becomes a visible escape, and the text is bounded.
//!
//! Container output (`brig logs`, a container's stdout) is the user's own data and is not
//! passed through here.

use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Longest piece of guest text put into one message, in bytes of input.
pub const MAX_TEXT: usize = 4096;

/// How much of the end of a guest-written log file is ever read.
pub const MAX_TAIL_READ: u64 = 64 * 1024;

/// `text` with every control character (C0 but newline and tab, DEL, C1) written as a
/// visible `\xNN` or `\u{NN}` escape, at most `max` bytes of input
/// (then `…` marks the cut). Newlines and tabs stay when `keep_lines` is set, else they are
/// escaped too, so that one message stays one line.
pub fn escape(text: &str, max: usize, keep_lines: bool) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 8);
    let mut used = 0;
    for c in text.chars() {
        used += c.len_utf8();
        if used > max {
            out.push('…');
            break;
        }
        match c {
            '\n' | '\t' if keep_lines => out.push(c),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            // C1 controls (U+0080–U+009F), among them CSI (U+009B), which some terminals
            // obey in UTF-8 too.
            c if (0x80..0xa0).contains(&(c as u32)) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// One line of guest text for a message: control characters and line breaks escaped,
/// bounded by [`MAX_TEXT`].
pub fn line(text: &str) -> String {
    escape(text, MAX_TEXT, false)
}

/// The last `lines` lines of a guest-written file (the console log, the VMM's log), read
/// from at most the last [`MAX_TAIL_READ`] bytes, never the whole file, each line escaped
/// and bounded. Empty when the file is missing or empty.
pub fn file_tail(path: &Path, lines: usize) -> Vec<String> {
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.seek(SeekFrom::End(0)).unwrap_or(0);
    let start = len.saturating_sub(MAX_TAIL_READ);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    if file.take(MAX_TAIL_READ).read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut all: Vec<&str> = text.lines().collect();
    if start > 0 && all.len() > 1 {
        // The first line was cut by where the read began.
        all.remove(0);
    }
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| escape(l, MAX_TEXT, false))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_title_setting_sequence_becomes_visible_text() {
        let shown = line("exec: \"\x1b]0;pwned\x07\": not found");
        assert_eq!(shown, "exec: \"\\x1b]0;pwned\\x07\": not found");
        assert!(!shown.chars().any(|c| c.is_control()));
    }

    #[test]
    fn c1_controls_and_del_are_escaped_and_unicode_stays() {
        assert_eq!(line("a\u{9b}2Jb\u{7f}c"), "a\\u{9b}2Jb\\x7fc");
        assert_eq!(line("grüße ✓"), "grüße ✓");
    }

    #[test]
    fn line_breaks_stay_only_where_lines_are_expected() {
        assert_eq!(line("one\ntwo\r"), "one\\x0atwo\\x0d");
        assert_eq!(escape("one\ntwo\tx", 100, true), "one\ntwo\tx");
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        let shown = escape(&"é".repeat(100), 9, false);
        assert_eq!(shown, format!("{}…", "é".repeat(4)));
    }

    #[test]
    fn a_tail_reads_only_the_end_of_a_big_file_and_escapes_it() {
        let dir = std::env::temp_dir().join(format!("brig-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let mut text = "x".repeat(3 * MAX_TAIL_READ as usize);
        text.push_str("\nlast but one\nlast \x1b[2J\n");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(
            file_tail(&path, 2),
            vec!["last but one".to_string(), "last \\x1b[2J".to_string()]
        );
        // The cut first line of the window is dropped, not shown half.
        let tail = file_tail(&path, 10);
        assert_eq!(tail.len(), 2, "{tail:?}");
        assert!(file_tail(&dir.join("missing"), 3).is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
