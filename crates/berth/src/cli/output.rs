//! How the CLI prints: text or one JSON document, colour only on a
//! terminal and never with `NO_COLOR`, aligned tables, short durations.

use std::io::IsTerminal;
use std::time::Duration;

use serde_json::Value;

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// What the output looks like.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    pub json: bool,
    /// ANSI colours on stdout.
    pub color: bool,
    /// Stdout is a terminal (spinners redraw a line).
    pub tty: bool,
}

impl Out {
    pub fn new(format: Format) -> Out {
        let tty = std::io::stdout().is_terminal();
        // https://no-color.org: set and not empty.
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Out {
            json: format == Format::Json,
            color: tty && !no_color,
            tty,
        }
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    }

    pub fn red(&self, s: &str) -> String {
        self.paint("31", s)
    }

    pub fn green(&self, s: &str) -> String {
        self.paint("32", s)
    }

    pub fn yellow(&self, s: &str) -> String {
        self.paint("33", s)
    }

    pub fn dim(&self, s: &str) -> String {
        self.paint("2", s)
    }

    pub fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }

    /// Prints `v` as the command's one JSON document.
    pub fn print_json(&self, v: &Value) {
        match serde_json::to_string_pretty(v) {
            Ok(s) => println!("{s}"),
            Err(_) => println!("{v}"),
        }
    }
}

/// Prints rows under a header, each column as wide as its widest cell
/// (cells are measured without their colour codes).
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(visible_len(c));
            }
        }
    }
    let line = |cells: Vec<String>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            s.push_str(&c);
            if i + 1 < n {
                let pad = widths[i].saturating_sub(visible_len(&c)) + 2;
                s.push_str(&" ".repeat(pad));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// Characters of `s` a terminal shows (ANSI escapes excluded).
pub fn visible_len(s: &str) -> usize {
    let mut n = 0;
    let mut esc = false;
    for c in s.chars() {
        if esc {
            if c == 'm' {
                esc = false;
            }
        } else if c == '\x1b' {
            esc = true;
        } else {
            n += 1;
        }
    }
    n
}

/// A duration as people read it in a progress line: `850µs`, `12ms`,
/// `1.4s`, `2m03s`.
pub fn short(d: Duration) -> String {
    let us = d.as_micros();
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{}ms", us / 1_000)
    } else if us < 60_000_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

/// A string field of `v`, or `""`.
pub fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// An RFC 3339 time of the API.
pub fn time(v: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339(v).ok()
}

/// `later - earlier`, zero if negative.
pub fn between(earlier: std::time::SystemTime, later: std::time::SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or(Duration::ZERO)
}

/// A line of text cut to `max` characters.
pub fn cut(s: &str, max: usize) -> String {
    let one = s.lines().next().unwrap_or("");
    if one.chars().count() <= max {
        one.to_owned()
    } else {
        let mut t: String = one.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}
