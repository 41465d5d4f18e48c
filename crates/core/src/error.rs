//! What Berth records and shows about a failure: a stable code, a message a
//! user can act on, and the underlying chain of causes.

use serde::{Deserialize, Serialize};

/// A failure as stored in attempt history and dead letters and carried in
/// failure events. `code` is stable and documented; `message` is for people;
/// `chain` is the cause chain, outermost first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
}

impl ErrorInfo {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorInfo {
            code: code.into(),
            message: message.into(),
            chain: Vec::new(),
        }
    }

    /// Builds from any error, walking `source()` for the chain.
    pub fn from_error(code: impl Into<String>, err: &(dyn std::error::Error + 'static)) -> Self {
        let mut chain = Vec::new();
        let mut cur = err.source();
        while let Some(e) = cur {
            chain.push(e.to_string());
            cur = e.source();
        }
        ErrorInfo {
            code: code.into(),
            message: err.to_string(),
            chain,
        }
    }

    /// The message followed by its causes, `: `-separated, as one line.
    pub fn one_line(&self) -> String {
        let mut s = self.message.clone();
        for c in &self.chain {
            s.push_str(": ");
            s.push_str(c);
        }
        s
    }
}
