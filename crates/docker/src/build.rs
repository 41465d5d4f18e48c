//! What a build says: the bounded tail of its output, the step it was at
//! (the classic builder prints `Step 2/5 : RUN make` before each), and a
//! failure turned into the runtime's `BuildFailed`.

use std::collections::VecDeque;

use berth_runtime::{HostId, RuntimeError};

/// How many lines of build output are kept for `BuildOutput::log_tail` and
/// for the message of a failed build.
pub(crate) const TAIL_LINES: usize = 20;

/// The last [`TAIL_LINES`] lines of the build's output.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    lines: VecDeque<String>,
    /// The last `Step N/M : …` line seen.
    step: Option<String>,
    /// Output arrives in chunks that need not end at a line break.
    partial: String,
}

impl Tail {
    pub(crate) fn push(&mut self, chunk: &str) {
        self.partial.push_str(chunk);
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            self.line(line.trim_end());
        }
    }

    /// The step the build was at.
    pub(crate) fn step(&self) -> Option<&str> {
        self.step.as_deref()
    }

    fn line(&mut self, line: &str) {
        if line.trim().is_empty() {
            return;
        }
        if line.starts_with("Step ") && line.contains(" : ") {
            self.step = Some(line.chars().take(300).collect());
        }
        if self.lines.len() == TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line.to_owned());
    }

    pub(crate) fn finish(mut self) -> Vec<String> {
        let rest = std::mem::take(&mut self.partial);
        self.line(rest.trim_end());
        self.lines.into()
    }
}

/// A failed build as the runtime's error. The engine's message for a
/// failing instruction is what the user needs ("The command '/bin/sh -c
/// make' returned a non-zero code: 2"); the step says which instruction.
pub(crate) fn failure(
    host: &HostId,
    step: Option<String>,
    message: String,
    log_tail: Vec<String>,
) -> RuntimeError {
    RuntimeError::BuildFailed {
        host: host.clone(),
        step: step.unwrap_or_else(|| "unknown step".to_owned()),
        message: message.trim().to_owned(),
        log_tail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_lines_across_chunks() {
        let mut t = Tail::default();
        for i in 0..30 {
            t.push(&format!("line {i}"));
            t.push("\n");
        }
        t.push("no newline at the end");
        let lines = t.finish();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines[0], "line 11");
        assert_eq!(lines[TAIL_LINES - 1], "no newline at the end");
    }

    #[test]
    fn the_tail_knows_the_step_it_was_at() {
        let mut t = Tail::default();
        t.push("Step 1/3 : FROM sha256:ab\n ---> ab\nStep 2/3 : RUN exit 3\n");
        t.push(" ---> Running in 1234\n");
        assert_eq!(t.step(), Some("Step 2/3 : RUN exit 3"));
    }
}
