//! What a committed group commit's declared writes tell the instance cache,
//! so that the dispatcher passes its writes through without knowing what
//! they write.

use std::collections::HashMap;

use berth_core::Timestamp;

use crate::Store;
use crate::instances::Instance;
use crate::writes::{Patched, Write};

impl Store {
    /// Tells the instance cache what a committed turn's declared writes did
    /// (`applied`: those not refused, in the order they were declared;
    /// `patched`: what its patches returned, from
    /// [`crate::writes::patched_rows`]). Call with the write gate held,
    /// before releasing it, like [`Store::cache_instances`].
    pub fn cache_committed<'a>(
        &self,
        now: Timestamp,
        applied: impl IntoIterator<Item = &'a Write>,
        patched: Patched,
    ) {
        let applied: Vec<&Write> = applied.into_iter().collect();
        let (written, changed) = known_rows(now, &applied, patched);
        if !written.is_empty() || !changed.is_empty() {
            self.cache_instances(written, changed);
        }
    }
}

/// The rows `applied` left as known (rows written whole as written, patched
/// rows as their last patch returned them) and the ids of rows they changed
/// in ways not known here.
fn known_rows(
    now: Timestamp,
    applied: &[&Write],
    patched: Patched,
) -> (Vec<Instance>, Vec<String>) {
    let mut last: HashMap<&str, Option<Instance>> = HashMap::new();
    for w in applied {
        match w {
            Write::Instance(i) => {
                // As the update wrote it: one version on, stamped now.
                let mut row = (**i).clone();
                row.version += 1;
                row.updated_at = now;
                last.insert(&i.id, Some(row));
            }
            Write::InsertInstance(i, _) => {
                last.insert(&i.id, Some((**i).clone()));
            }
            // Below: patches are applied after every whole write.
            Write::Patch(_) => {}
            Write::ClaimHost { .. } | Write::ReleaseHost { .. } => {}
        }
    }
    // SQL applies a turn's patches after its whole writes, so a patched row
    // is as its last patch returned it, whatever order the writes were
    // declared in; one declared but not applied (its guard failed) left
    // nothing known: forget the row.
    let after_patches: HashMap<String, Instance> =
        patched.0.into_iter().map(|i| (i.id.clone(), i)).collect();
    for w in applied {
        if let Write::Patch(p) = w {
            last.insert(&p.id, after_patches.get(&p.id).cloned());
        }
    }
    let mut written = Vec::new();
    let mut changed = Vec::new();
    for (id, row) in last {
        match row {
            Some(r) => written.push(r),
            None => changed.push(id.to_owned()),
        }
    }
    (written, changed)
}
