//! The instance domain: validated names, the status state machine, the
//! Kubernetes-style conditions and the error a user sees.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;

/// An instance name: `^[a-z0-9][a-z0-9-]{0,62}$` (a DNS label, since it is
/// the container's name on its org's network).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct InstanceName(String);

/// Why a value was refused: the field, the value and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule} (got {value:?})")]
pub struct Invalid {
    pub field: &'static str,
    pub value: String,
    pub rule: String,
}

impl InstanceName {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .enumerate()
                .all(|(i, b)| b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && b == b'-'));
        if ok {
            Ok(InstanceName(s.to_owned()))
        } else {
            Err(Invalid {
                field: "name",
                value: s.chars().take(80).collect(),
                rule: "must match ^[a-z0-9][a-z0-9-]{0,62}$".into(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for InstanceName {
    type Error = Invalid;
    fn try_from(s: String) -> Result<Self, Invalid> {
        Self::parse(&s)
    }
}

impl From<InstanceName> for String {
    fn from(n: InstanceName) -> String {
        n.0
    }
}

impl fmt::Display for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    Requested,
    Provisioning,
    Building,
    Starting,
    Running,
    Failed,
    Stopping,
    Stopped,
    Exited,
    Deleting,
    Deleted,
}

impl InstanceStatus {
    pub const ALL: [InstanceStatus; 11] = [
        InstanceStatus::Requested,
        InstanceStatus::Provisioning,
        InstanceStatus::Building,
        InstanceStatus::Starting,
        InstanceStatus::Running,
        InstanceStatus::Failed,
        InstanceStatus::Stopping,
        InstanceStatus::Stopped,
        InstanceStatus::Exited,
        InstanceStatus::Deleting,
        InstanceStatus::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Requested => "requested",
            InstanceStatus::Provisioning => "provisioning",
            InstanceStatus::Building => "building",
            InstanceStatus::Starting => "starting",
            InstanceStatus::Running => "running",
            InstanceStatus::Failed => "failed",
            InstanceStatus::Stopping => "stopping",
            InstanceStatus::Stopped => "stopped",
            InstanceStatus::Exited => "exited",
            InstanceStatus::Deleting => "deleting",
            InstanceStatus::Deleted => "deleted",
        }
    }

    /// A flow that reached this status is over.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            InstanceStatus::Running
                | InstanceStatus::Failed
                | InstanceStatus::Stopped
                | InstanceStatus::Exited
                | InstanceStatus::Deleted
        )
    }

    /// The creation flow may still move this instance forward.
    pub fn is_creating(self) -> bool {
        matches!(
            self,
            InstanceStatus::Requested
                | InstanceStatus::Provisioning
                | InstanceStatus::Building
                | InstanceStatus::Starting
        )
    }

    /// Whether `self → to` is a legal transition. Everything but `deleted`
    /// may go to `deleting`; `deleted` is final.
    pub fn can_become(self, to: InstanceStatus) -> bool {
        use InstanceStatus::*;
        if self == Deleted {
            return false;
        }
        if to == Deleting {
            return self != Deleting;
        }
        matches!(
            (self, to),
            (Requested, Provisioning)
                | (Requested | Provisioning, Building)
                | (Requested | Provisioning | Building, Starting)
                | (Starting, Running)
                | (
                    Requested | Provisioning | Building | Starting | Running,
                    Failed
                )
                | (Running | Exited, Stopping)
                | (Stopping, Stopped)
                | (Stopping, Starting)
                | (Running, Exited)
                // The container ended before its start was recorded done.
                | (Starting, Exited)
                | (Exited | Stopped, Starting)
                | (Deleting, Deleted)
        )
    }
}

impl fmt::Display for InstanceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for InstanceStatus {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        InstanceStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| Invalid {
                field: "status",
                value: s.to_owned(),
                rule: "unknown instance status".into(),
            })
    }
}

/// The steps of creation whose completion is recorded as a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConditionKind {
    HostReady,
    NetworkReady,
    ImageBuilt,
    ContainerStarted,
    NetworkAttached,
}

/// One condition, as in Kubernetes: whether it holds, why, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: ConditionKind,
    pub status: bool,
    pub reason: String,
    pub message: String,
    pub last_transition: Timestamp,
}

/// The conditions of an instance, at most one per kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Conditions(pub Vec<Condition>);

impl Conditions {
    pub fn get(&self, kind: ConditionKind) -> Option<&Condition> {
        self.0.iter().find(|c| c.kind == kind)
    }

    pub fn holds(&self, kind: ConditionKind) -> bool {
        self.get(kind).is_some_and(|c| c.status)
    }

    /// Sets a condition; the transition time changes only if the status does.
    pub fn set(
        &mut self,
        kind: ConditionKind,
        status: bool,
        reason: &str,
        message: &str,
        at: Timestamp,
    ) {
        match self.0.iter_mut().find(|c| c.kind == kind) {
            Some(c) => {
                if c.status != status {
                    c.last_transition = at;
                }
                c.status = status;
                c.reason = reason.to_owned();
                c.message = message.to_owned();
            }
            None => {
                self.0.push(Condition {
                    kind,
                    status,
                    reason: reason.to_owned(),
                    message: message.to_owned(),
                    last_transition: at,
                });
                self.0.sort_by_key(|c| c.kind);
            }
        }
    }
}

/// What a user sees when their instance failed: a stable code (documented
/// under `docs/errors/`), words they can act on, the step that failed, how
/// many attempts it made, and the underlying cause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceError {
    pub code: String,
    pub message: String,
    pub step: String,
    pub attempts: u32,
    pub cause: Option<String>,
}

/// What to do when an instance's container exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum RestartPolicy {
    #[default]
    No,
    OnFailure {
        max: Option<u32>,
    },
    Always,
}

impl FromStr for RestartPolicy {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        let bad = || Invalid {
            field: "restart",
            value: s.to_owned(),
            rule: "must be no, on-failure, on-failure:N (N ≥ 1) or always".into(),
        };
        match s {
            "no" => Ok(RestartPolicy::No),
            "always" => Ok(RestartPolicy::Always),
            "on-failure" => Ok(RestartPolicy::OnFailure { max: None }),
            _ => {
                let n = s.strip_prefix("on-failure:").ok_or_else(bad)?;
                match n.parse::<u32>() {
                    Ok(max) if max >= 1 => Ok(RestartPolicy::OnFailure { max: Some(max) }),
                    _ => Err(bad()),
                }
            }
        }
    }
}

impl TryFrom<String> for RestartPolicy {
    type Error = Invalid;
    fn try_from(s: String) -> Result<Self, Invalid> {
        s.parse()
    }
}

impl From<RestartPolicy> for String {
    fn from(p: RestartPolicy) -> String {
        match p {
            RestartPolicy::No => "no".into(),
            RestartPolicy::Always => "always".into(),
            RestartPolicy::OnFailure { max: None } => "on-failure".into(),
            RestartPolicy::OnFailure { max: Some(n) } => format!("on-failure:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_dns_label_rule() {
        for ok in ["a", "web-1", "0abc", &"a".repeat(63)] {
            assert!(InstanceName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "Web", "a_b", "a.b", &"a".repeat(64), "é"] {
            let e = InstanceName::parse(bad).unwrap_err();
            assert_eq!(e.field, "name");
        }
    }

    #[test]
    fn the_state_machine_allows_the_flow_and_refuses_going_back() {
        use InstanceStatus::*;
        for (a, b) in [
            (Requested, Provisioning),
            (Provisioning, Building),
            (Building, Starting),
            (Starting, Running),
            (Starting, Failed),
            (Running, Exited),
            (Exited, Starting),
            (Running, Deleting),
            (Deleting, Deleted),
        ] {
            assert!(a.can_become(b), "{a} → {b}");
        }
        for (a, b) in [
            (Running, Provisioning),
            (Failed, Running),
            (Deleted, Deleting),
            (Deleted, Running),
            // A failed instance has nothing left to start: recreate it.
            (Failed, Starting),
            (Deleting, Deleting),
        ] {
            assert!(!a.can_become(b), "{a} → {b}");
        }
        for s in InstanceStatus::ALL {
            assert_eq!(s.as_str().parse::<InstanceStatus>().unwrap(), s);
        }
    }

    #[test]
    fn conditions_keep_transition_time_until_status_changes() {
        let mut c = Conditions::default();
        let t1 = Timestamp::from_micros(1);
        let t2 = Timestamp::from_micros(2);
        c.set(ConditionKind::ImageBuilt, true, "Built", "ok", t1);
        c.set(ConditionKind::ImageBuilt, true, "Built", "again", t2);
        assert_eq!(
            c.get(ConditionKind::ImageBuilt).unwrap().last_transition,
            t1
        );
        c.set(ConditionKind::ImageBuilt, false, "Failed", "x", t2);
        assert_eq!(
            c.get(ConditionKind::ImageBuilt).unwrap().last_transition,
            t2
        );
        assert!(!c.holds(ConditionKind::ImageBuilt));
    }

    #[test]
    fn restart_policies_parse_and_print() {
        for s in ["no", "always", "on-failure", "on-failure:3"] {
            let p: RestartPolicy = s.parse().unwrap();
            assert_eq!(String::from(p), s);
        }
        for bad in ["sometimes", "on-failure:0", "on-failure:x"] {
            assert_eq!(bad.parse::<RestartPolicy>().unwrap_err().field, "restart");
        }
    }
}
