//! The ids the bus makes: message, conversation, request and fault ids, scheduling tokens.

use uuid::timestamp::context::NoContext;
use uuid::{Timestamp, Uuid};

/// A new id: a version 7 UUID, ordered by its millisecond and random within it.
///
/// `Uuid::now_v7` also orders the ids of one millisecond, with a counter behind a lock that
/// every thread publishing shares, and its `u128` arithmetic; that made two ids cost more
/// than a consumer's dispatch. Nothing in the bus or MassTransit orders messages by id.
pub(crate) fn new_id() -> Uuid {
    Uuid::new_v7(Timestamp::now(NoContext))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_version_7_distinct_and_ordered_by_millisecond() {
        let ids: Vec<Uuid> = (0..10_000).map(|_| new_id()).collect();
        assert!(ids.iter().all(|id| id.get_version_num() == 7));
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        let millis =
            |id: &Uuid| id.get_timestamp().map(|t| t.to_unix()).map(|(s, n)| s * 1_000 + u64::from(n / 1_000_000));
        assert!(
            ids.windows(2).all(|pair| millis(&pair[0]) <= millis(&pair[1])),
            "a later id is never of an earlier millisecond"
        );
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_millis();
        let last = millis(&ids[ids.len() - 1]).expect("a v7 id has a time");
        assert!(u128::from(last) <= now && now - u128::from(last) < 60_000, "the id's time is now");
    }
}
