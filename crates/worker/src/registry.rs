//! The registry: named handlers and the event types each subscribes to.

use std::sync::Arc;

use berth_store::Subscriptions;

use crate::handler::Handler;
use crate::policy::is_event_type;

/// One registered worker.
#[derive(Clone)]
pub struct WorkerSpec {
    pub name: Arc<str>,
    pub subscribes: Vec<String>,
    pub handler: Arc<dyn Handler>,
}

impl std::fmt::Debug for WorkerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerSpec")
            .field("name", &self.name)
            .field("subscribes", &self.subscribes)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("a worker named '{0}' is already registered")]
    Duplicate(String),
    #[error(
        "invalid worker name '{0}': use dot-separated lowercase letters, digits, '_' and '-' (e.g. \"network.attach\")"
    )]
    BadName(String),
    #[error("worker '{worker}' subscribes to an invalid event type '{event_type}'")]
    BadEventType { worker: String, event_type: String },
    #[error("worker '{0}' subscribes to no event type")]
    NoSubscription(String),
}

/// Named handlers, each subscribed to one or more event types. Every worker
/// subscribed to a type gets its own delivery of each event of that type.
#[derive(Default, Clone, Debug)]
pub struct Registry {
    workers: Vec<WorkerSpec>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` as worker `name` for `event_types`.
    pub fn register(
        &mut self,
        name: &str,
        event_types: &[&str],
        handler: impl Handler,
    ) -> Result<&mut Self, RegistryError> {
        if !is_event_type(name) || name == "default" {
            return Err(RegistryError::BadName(name.to_owned()));
        }
        if self.workers.iter().any(|w| &*w.name == name) {
            return Err(RegistryError::Duplicate(name.to_owned()));
        }
        if event_types.is_empty() {
            return Err(RegistryError::NoSubscription(name.to_owned()));
        }
        if let Some(bad) = event_types.iter().find(|t| !is_event_type(t)) {
            return Err(RegistryError::BadEventType {
                worker: name.to_owned(),
                event_type: (*bad).to_owned(),
            });
        }
        self.workers.push(WorkerSpec {
            name: Arc::from(name),
            subscribes: event_types.iter().map(|s| (*s).to_owned()).collect(),
            handler: Arc::new(handler),
        });
        Ok(self)
    }

    pub fn workers(&self) -> &[WorkerSpec] {
        &self.workers
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.workers.iter().map(|w| &*w.name)
    }

    pub fn subscriptions(&self) -> Subscriptions {
        let mut s = Subscriptions::new();
        for w in &self.workers {
            for t in &w.subscribes {
                s.subscribe(t, w.name.clone());
            }
        }
        s
    }
}
