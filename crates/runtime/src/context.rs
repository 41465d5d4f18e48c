//! Build contexts: a tar archive with a `Dockerfile` at its root. What Berth
//! needs of one without an engine: the Dockerfile's text, the images its
//! stages start `FROM` (each must be checked against the org before a build,
//! since the engine would take any name, id or id prefix), and the same
//! context with every such `FROM` pinned to the image id that was checked,
//! so that a retag between the check and the build cannot swap the base.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;

/// Most bytes of a Dockerfile read out of a context.
pub const MAX_DOCKERFILE: u64 = 1024 * 1024;

/// Why a context cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("the build context is not a readable tar archive: {0}")]
    NotTar(String),
    #[error("the build context has no Dockerfile at its root")]
    NoDockerfile,
    #[error("the Dockerfile is over {MAX_DOCKERFILE} bytes")]
    DockerfileTooLarge,
    #[error("the Dockerfile is not UTF-8 text")]
    NotText,
    /// A rule of the Dockerfile broken, with its line number.
    #[error("Dockerfile line {line}: {rule}")]
    Rule { line: usize, rule: String },
}

/// A tar archive of `files` (path, contents), with fixed modes and times so
/// that the same files make the same bytes.
pub fn tar_of(files: &[(&str, &[u8])]) -> std::io::Result<Vec<u8>> {
    let mut archive = tar::Builder::new(Vec::new());
    for (path, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_path(path)?;
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        archive.append(&header, *bytes)?;
    }
    archive.into_inner()
}

fn is_dockerfile(path: &std::path::Path) -> bool {
    let s = path.to_string_lossy();
    s == "Dockerfile" || s == "./Dockerfile"
}

/// The text of the context's root `Dockerfile`. Exactly one, a regular
/// file: with two, the engine would build from the last one extracted, and
/// a link would make it read another file than the one checked.
pub fn dockerfile_of(context: &[u8]) -> Result<String, ContextError> {
    let mut archive = tar::Archive::new(context);
    let entries = archive
        .entries()
        .map_err(|e| ContextError::NotTar(e.to_string()))?;
    let mut found: Option<String> = None;
    for entry in entries {
        let mut entry = entry.map_err(|e| ContextError::NotTar(e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| ContextError::NotTar(e.to_string()))?
            .into_owned();
        if !is_dockerfile(&path) {
            continue;
        }
        if found.is_some() {
            return Err(ContextError::Rule {
                line: 1,
                rule: "the context holds more than one Dockerfile".into(),
            });
        }
        if !entry.header().entry_type().is_file() {
            return Err(ContextError::Rule {
                line: 1,
                rule: "the Dockerfile must be a regular file, not a link".into(),
            });
        }
        if entry.size() > MAX_DOCKERFILE {
            return Err(ContextError::DockerfileTooLarge);
        }
        let mut bytes = Vec::new();
        entry
            .by_ref()
            .take(MAX_DOCKERFILE + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| ContextError::NotTar(e.to_string()))?;
        found = Some(String::from_utf8(bytes).map_err(|_| ContextError::NotText)?);
    }
    found.ok_or(ContextError::NoDockerfile)
}

/// The same archive with its root `Dockerfile` replaced by `dockerfile`.
pub fn with_dockerfile(context: &[u8], dockerfile: &str) -> Result<Vec<u8>, ContextError> {
    let io = |e: std::io::Error| ContextError::NotTar(e.to_string());
    let mut out = tar::Builder::new(Vec::new());
    let mut archive = tar::Archive::new(context);
    for entry in archive.entries().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        let path = entry.path().map_err(io)?.into_owned();
        if is_dockerfile(&path) {
            continue;
        }
        let mut header = entry.header().clone();
        out.append_data(&mut header, &path, &mut entry)
            .map_err(io)?;
    }
    let bytes = dockerfile.as_bytes();
    let mut header = tar::Header::new_gnu();
    header.set_path("Dockerfile").map_err(io)?;
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    out.append(&header, bytes).map_err(io)?;
    out.into_inner().map_err(io)
}

/// One instruction: its first line number, keyword (upper case) and the
/// rest, continuation lines joined.
struct Instruction {
    line: usize,
    /// How many lines it spans (continuations included).
    lines: usize,
    keyword: String,
    args: String,
}

fn instructions(dockerfile: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    let mut last = 0;
    for (i, raw) in dockerfile.lines().enumerate() {
        let line = raw.trim();
        // Comments and blank lines, also inside a continued instruction.
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (text, continued) = match line.strip_suffix('\\') {
            Some(t) => (t, true),
            None => (line, false),
        };
        last = i + 1;
        match &mut current {
            Some((_, acc)) => {
                acc.push(' ');
                acc.push_str(text);
            }
            None => current = Some((i + 1, text.to_owned())),
        }
        if !continued && let Some((n, text)) = current.take() {
            out.push(instruction(n, last, &text));
        }
    }
    if let Some((n, text)) = current {
        out.push(instruction(n, last, &text));
    }
    out
}

fn instruction(first: usize, last: usize, text: &str) -> Instruction {
    let (keyword, args) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    Instruction {
        line: first,
        lines: last + 1 - first,
        keyword: keyword.to_ascii_uppercase(),
        args: args.trim().to_owned(),
    }
}

/// Whether the Dockerfile sets the `escape` parser directive: with another
/// escape character, lines this parser takes for continued ones are not, and
/// a `FROM` could hide from the check in what looks like a `RUN`.
fn sets_escape(dockerfile: &str) -> Option<usize> {
    dockerfile.lines().enumerate().find_map(|(i, l)| {
        let t = l.trim_start().strip_prefix('#')?.trim_start();
        let (k, _) = t.split_once('=')?;
        k.trim().eq_ignore_ascii_case("escape").then_some(i + 1)
    })
}

/// A `FROM`'s words: flags (`--platform=…`), the image, and `AS name`.
struct From<'a> {
    image: &'a str,
    stage: Option<String>,
}

fn parse_from(args: &str) -> Option<From<'_>> {
    let mut words = args.split_whitespace().skip_while(|w| w.starts_with("--"));
    let image = words.next()?;
    let stage = match (words.next(), words.next()) {
        (Some(kw), Some(name)) if kw.eq_ignore_ascii_case("as") => Some(name.to_ascii_lowercase()),
        _ => None,
    };
    Some(From { image, stage })
}

/// Where the image word of a `FROM` line starts, and the word: the first
/// word after `FROM` that is not a `--flag`.
fn image_word(line: &str) -> Option<(usize, &str)> {
    let mut words = Vec::new();
    let mut start = None;
    for (i, c) in line.char_indices().chain([(line.len(), ' ')]) {
        match (c.is_whitespace(), start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                words.push((s, &line[s..i]));
                start = None;
            }
            _ => {}
        }
    }
    words
        .into_iter()
        .skip(1)
        .find(|(_, w)| !w.starts_with("--"))
}

/// The images the Dockerfile's stages start from, outside the Dockerfile
/// itself (not earlier stages, not `scratch`), in order, each once. Refused:
/// no `FROM` at all, a `FROM` whose image is a variable (it cannot be
/// checked before the build), and `COPY --from` naming anything but an
/// earlier stage (it would read another image's files).
pub fn base_images(dockerfile: &str) -> Result<Vec<String>, ContextError> {
    let mut stages: HashSet<String> = HashSet::new();
    let mut count = 0usize;
    let mut out: Vec<String> = Vec::new();
    let mut seen_from = false;
    if let Some(line) = sets_escape(dockerfile) {
        return Err(ContextError::Rule {
            line,
            rule: "the escape parser directive is not supported".into(),
        });
    }
    for ins in instructions(dockerfile) {
        match ins.keyword.as_str() {
            "FROM" => {
                seen_from = true;
                // One line, so that pinning rewrites exactly what the
                // builder reads.
                if ins.lines > 1 {
                    return Err(ContextError::Rule {
                        line: ins.line,
                        rule: "write FROM on one line".into(),
                    });
                }
                let Some(f) = parse_from(&ins.args) else {
                    return Err(ContextError::Rule {
                        line: ins.line,
                        rule: "FROM names no image".into(),
                    });
                };
                if f.image.contains('$') {
                    return Err(ContextError::Rule {
                        line: ins.line,
                        rule: format!(
                            "FROM {} uses a variable; name the base image itself so that it can be checked",
                            f.image
                        ),
                    });
                }
                let lower = f.image.to_ascii_lowercase();
                if lower != "scratch"
                    && !stages.contains(&lower)
                    && !out.contains(&f.image.to_owned())
                {
                    out.push(f.image.to_owned());
                }
                if let Some(s) = f.stage {
                    stages.insert(s);
                }
                stages.insert(count.to_string());
                count += 1;
            }
            "COPY" | "ADD" => {
                for w in ins
                    .args
                    .split_whitespace()
                    .take_while(|w| w.starts_with("--"))
                {
                    if let Some(from) = w.strip_prefix("--from=")
                        && !stages.contains(&from.to_ascii_lowercase())
                    {
                        return Err(ContextError::Rule {
                            line: ins.line,
                            rule: format!(
                                "{} --from={from} names no earlier stage; copying from an image is not allowed (add a stage `FROM <image> AS <name>` and copy from it)",
                                ins.keyword
                            ),
                        });
                    }
                }
            }
            "ONBUILD" => {
                return Err(ContextError::Rule {
                    line: ins.line,
                    rule: "ONBUILD is not supported".into(),
                });
            }
            // Parser directives and ARG may come before the first FROM.
            "ARG" => {}
            _ if !seen_from => {
                return Err(ContextError::Rule {
                    line: ins.line,
                    rule: format!("{} before the first FROM", ins.keyword),
                });
            }
            _ => {}
        }
    }
    if !seen_from {
        return Err(ContextError::Rule {
            line: 1,
            rule: "the Dockerfile has no FROM".into(),
        });
    }
    Ok(out)
}

/// The Dockerfile with every `FROM` of an outside image replaced by the
/// image id `pins` gives for it. Lines are kept otherwise, so the builder's
/// step numbers and messages still match what the user wrote.
pub fn pin(dockerfile: &str, pins: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(dockerfile.len() + 64);
    for line in dockerfile.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let is_from = trimmed
            .get(..4)
            .is_some_and(|k| k.eq_ignore_ascii_case("from"))
            && trimmed[4..].starts_with(char::is_whitespace);
        if is_from
            && let Some((at, word)) = image_word(line)
            && let Some(id) = pins.get(word)
        {
            // Replace the image word only (flags and `AS` stay).
            out.push_str(&line[..at]);
            out.push_str(id);
            out.push_str(&line[at + word.len()..]);
            continue;
        }
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bases_are_the_outside_images_of_every_stage() {
        let d = "# syntax\nARG X=1\nFROM --platform=linux/amd64 busybox:1.36 AS build\nRUN make \\\n  all\nFROM build\nFROM scratch\nCOPY --from=build /a /a\nFROM Other/x\nFROM busybox:1.36\n";
        assert_eq!(
            base_images(d),
            Ok(vec!["busybox:1.36".to_owned(), "Other/x".to_owned()])
        );
    }

    #[test]
    fn what_cannot_be_checked_is_refused() {
        for (d, needle) in [
            ("ARG B=busybox\nFROM $B\n", "variable"),
            (
                "FROM busybox\nCOPY --from=berth/o/web:g1 /x /x\n",
                "no earlier stage",
            ),
            ("FROM busybox\nCOPY --from=1 /x /x\n", "no earlier stage"),
            ("RUN true\nFROM busybox\n", "before the first FROM"),
            ("# nothing\n", "no FROM"),
            ("FROM busybox\nONBUILD RUN x\n", "ONBUILD"),
            // With a backtick escape, `\` continues nothing: the FROM below
            // is a FROM to the builder, not part of the RUN.
            (
                "# escape=`\nFROM busybox\nRUN echo \\\nFROM other\n",
                "escape",
            ),
            ("FROM \\\n  busybox\n", "one line"),
        ] {
            match base_images(d) {
                Err(ContextError::Rule { rule, .. }) => {
                    assert!(rule.contains(needle), "{d}: {rule}")
                }
                other => panic!("{d}: {other:?}"),
            }
        }
        assert!(base_images("FROM a AS s\nCOPY --from=s /x /x\nCOPY --from=0 /y /y\n").is_ok());
    }

    #[test]
    fn pinning_replaces_only_the_image_word() {
        let pins = BTreeMap::from([("busybox".to_owned(), "sha256:abc".to_owned())]);
        let d = "FROM busybox AS b\nfrom  busybox\nRUN echo busybox\nFROM b\nFROM --platform=busybox busybox\n";
        assert_eq!(
            pin(d, &pins),
            "FROM sha256:abc AS b\nfrom  sha256:abc\nRUN echo busybox\nFROM b\nFROM --platform=busybox sha256:abc\n"
        );
    }

    #[test]
    fn a_context_gives_back_its_dockerfile_and_takes_a_new_one() {
        let Ok(tar) = tar_of(&[("app.txt", b"hi"), ("Dockerfile", b"FROM x\n")]) else {
            panic!("tar")
        };
        assert_eq!(dockerfile_of(&tar).as_deref(), Ok("FROM x\n"));
        let Ok(again) = with_dockerfile(&tar, "FROM sha256:1\n") else {
            panic!("rewrite")
        };
        assert_eq!(dockerfile_of(&again).as_deref(), Ok("FROM sha256:1\n"));
        let mut names = Vec::new();
        let mut a = tar::Archive::new(again.as_slice());
        for e in a.entries().into_iter().flatten().flatten() {
            names.push(
                e.path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            );
        }
        assert_eq!(names, vec!["app.txt", "Dockerfile"]);
        assert!(
            dockerfile_of(&[7u8; 1024]).is_err(),
            "garbage is no context"
        );
        let Ok(two) = tar_of(&[("Dockerfile", b"FROM a\n"), ("./Dockerfile", b"FROM b\n")]) else {
            panic!("tar")
        };
        assert!(matches!(
            dockerfile_of(&two),
            Err(ContextError::Rule { .. })
        ));
        let mut link = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        let appended = link.append_link(&mut h, "Dockerfile", "other/Dockerfile");
        assert!(appended.is_ok());
        let Ok(link) = link.into_inner() else {
            panic!("tar")
        };
        assert!(matches!(
            dockerfile_of(&link),
            Err(ContextError::Rule { .. })
        ));
        let Ok(empty) = tar_of(&[("a", b"x")]) else {
            panic!("tar")
        };
        assert_eq!(dockerfile_of(&empty), Err(ContextError::NoDockerfile));
    }
}
