//! The build context of an instance image: a generated Dockerfile (`FROM`
//! base, `ENV`, `CMD`, `LABEL`) in a tar archive, and the bounded tail of the
//! build's output. Values are quoted so that nothing a user writes in an env
//! value can add an instruction or be expanded by the builder.

use std::collections::VecDeque;

use berth_runtime::ImageSpec;

/// How many lines of build output are kept for `BuildOutput::log_tail` and
/// for the message of a failed build.
pub(crate) const TAIL_LINES: usize = 20;

/// The Dockerfile for `spec`, or why it cannot be written.
///
/// Every instruction of the classic builder is a step that costs a container
/// and a commit (about a second on this kind of storage driver), so there are
/// at most three: one `ENV` with every variable, `CMD`, and `LABEL` last.
/// Labels go last: if they differ between images of the same base, env and
/// cmd, only that step does, and the steps before it come from the engine's
/// build cache (Berth labels instance images by org only, so a second
/// instance of the same spec builds entirely from the cache).
pub(crate) fn dockerfile(spec: &ImageSpec) -> Result<String, String> {
    check_reference(&spec.base).map_err(|why| format!("base image {:?}: {why}", spec.base))?;
    let mut out = format!("FROM {}\n", spec.base);
    if !spec.env.is_empty() {
        out.push_str("ENV");
        for (k, v) in &spec.env {
            check_key("env", k)?;
            check_value("env", k, v)?;
            out.push_str(&format!(" {}={}", quote(k), quote(v)));
        }
        out.push('\n');
    }
    if let Some(cmd) = &spec.cmd {
        // The exec (JSON) form: no shell is added, no variable is expanded,
        // and JSON escapes newlines, so the instruction stays on one line.
        let json = serde_json::to_string(cmd).map_err(|e| format!("cmd: {e}"))?;
        out.push_str(&format!("CMD {json}\n"));
    }
    if !spec.labels.is_empty() {
        out.push_str("LABEL");
        for (k, v) in &spec.labels {
            check_key("label", k)?;
            check_value("label", k, v)?;
            out.push_str(&format!(" {}={}", quote(k), quote(v)));
        }
        out.push('\n');
    }
    Ok(out)
}

/// A tar archive holding only `Dockerfile`.
pub(crate) fn context(dockerfile: &str) -> std::io::Result<Vec<u8>> {
    let bytes = dockerfile.as_bytes();
    let mut header = tar::Header::new_gnu();
    header.set_path("Dockerfile")?;
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    // A fixed mtime keeps the context identical between attempts.
    header.set_mtime(0);
    header.set_cksum();
    let mut archive = tar::Builder::new(Vec::new());
    archive.append(&header, bytes)?;
    archive.into_inner()
}

/// The last [`TAIL_LINES`] lines of the build's output.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    lines: VecDeque<String>,
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

    fn line(&mut self, line: &str) {
        if line.trim().is_empty() {
            return;
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

/// Double quotes for the Dockerfile's word parser: inside them only `"`,
/// `$` and `\` are special, and each is escaped, so the value is taken
/// literally (no variable expansion).
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if matches!(c, '"' | '$' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn check_key(kind: &str, k: &str) -> Result<(), String> {
    if k.is_empty() || k.contains('=') || k.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{kind} name {k:?} must be non-empty, without '=', spaces or control characters"
        ));
    }
    Ok(())
}

/// A Dockerfile instruction is one line, and a quoted string has no escape
/// for a line break: such values cannot be expressed.
fn check_value(kind: &str, k: &str, v: &str) -> Result<(), String> {
    if v.chars().any(|c| c == '\n' || c == '\r' || c == '\0') {
        return Err(format!(
            "{kind} {k}: line breaks and NUL are not supported in values"
        ));
    }
    Ok(())
}

/// The characters of a Docker image reference (`name[:tag][@digest]`); the
/// engine checks the grammar, this only keeps the `FROM` line one line.
fn check_reference(r: &str) -> Result<(), &'static str> {
    if r.is_empty() {
        return Err("is empty");
    }
    let ok = r
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/' | '@'));
    if ok {
        Ok(())
    } else {
        Err("is not an image reference")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_runtime::Labels;

    fn spec() -> ImageSpec {
        ImageSpec {
            tag: "berth/o/web:g1".into(),
            base: "berth-test-base:latest".into(),
            env: vec![
                ("A".into(), "plain".into()),
                ("B".into(), r#"has "quotes" and $HOME and \ slash"#.into()),
            ],
            cmd: Some(vec!["sh".into(), "-c".into(), "echo \"$A\"".into()]),
            labels: Labels::from([("berth.org".to_owned(), "o".to_owned())]),
        }
    }

    #[test]
    fn the_dockerfile_quotes_everything() {
        let d = dockerfile(&spec());
        assert_eq!(
            d.as_deref(),
            Ok(concat!(
                "FROM berth-test-base:latest\n",
                "ENV \"A\"=\"plain\" \"B\"=\"has \\\"quotes\\\" and \\$HOME and \\\\ slash\"\n",
                "CMD [\"sh\",\"-c\",\"echo \\\"$A\\\"\"]\n",
                "LABEL \"berth.org\"=\"o\"\n",
            ))
        );
    }

    #[test]
    fn what_cannot_be_one_line_is_refused() {
        let mut s = spec();
        s.env.push(("C".into(), "two\nlines".into()));
        assert!(dockerfile(&s).is_err());
        let mut s = spec();
        s.base = "busybox\nRUN rm -rf /".into();
        assert!(dockerfile(&s).is_err());
        let mut s = spec();
        s.env.push(("A B".into(), "x".into()));
        assert!(dockerfile(&s).is_err());
    }

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
    fn the_context_is_a_tar_with_the_dockerfile() {
        let Ok(bytes) = context("FROM x\n") else {
            panic!("tar failed")
        };
        let mut archive = tar::Archive::new(bytes.as_slice());
        let names: Vec<String> = archive
            .entries()
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.path().ok().map(|p| p.display().to_string()))
            .collect();
        assert_eq!(names, vec!["Dockerfile".to_owned()]);
    }
}
