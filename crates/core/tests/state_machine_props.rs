//! Properties of the instance state machine over any sequence of requested
//! moves: only the moves `can_become` allows happen, `deleted` is final,
//! every status can still reach `deleting` (a delete is always possible),
//! and statuses round-trip through their names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use berth_core::domain::InstanceStatus;
use proptest::prelude::*;

fn status() -> impl Strategy<Value = InstanceStatus> {
    proptest::sample::select(InstanceStatus::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_walk_takes_only_allowed_moves_and_deleted_is_final(moves in proptest::collection::vec(status(), 1..64)) {
        let mut s = InstanceStatus::Requested;
        for to in moves {
            let allowed = s.can_become(to);
            if s == InstanceStatus::Deleted {
                prop_assert!(!allowed, "deleted moved to {to}");
            }
            if allowed {
                prop_assert_ne!(s, to, "a move to the same status is no move");
                s = to;
            }
        }
    }

    #[test]
    fn everything_but_deleted_can_be_deleted(s in status()) {
        let deletable = s.can_become(InstanceStatus::Deleting);
        prop_assert_eq!(deletable, !matches!(s, InstanceStatus::Deleted | InstanceStatus::Deleting));
        if deletable {
            prop_assert!(InstanceStatus::Deleting.can_become(InstanceStatus::Deleted));
        }
    }

    #[test]
    fn names_round_trip(s in status()) {
        prop_assert_eq!(s.as_str().parse::<InstanceStatus>().unwrap(), s);
        prop_assert_eq!(s.to_string(), s.as_str());
    }

    #[test]
    fn terminal_and_creating_do_not_overlap(s in status()) {
        prop_assert!(!(s.is_terminal() && s.is_creating()), "{s}");
    }
}
