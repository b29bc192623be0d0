//! The ids the bus makes: message, conversation, request and fault ids, scheduling tokens.

use uuid::timestamp::context::NoContext;
use uuid::{Timestamp, Uuid};

/// A new id for a message, a conversation, a request or a fault: a version 7 UUID, ordered
/// by the millisecond its clock read and random within it.
///
/// `Uuid::now_v7` also orders the ids of one millisecond, with a counter behind a lock that
/// every thread publishing shares: two ids per publish cost more than a consumer's dispatch.
/// Nothing orders messages by these ids.
pub(crate) fn new_id() -> Uuid {
    Uuid::new_v7(Timestamp::now(NoContext))
}

/// A new scheduling token, ordered within its millisecond too (`Uuid::now_v7`): the Redis
/// scheduler keeps messages due at the same time in the order of their tokens, which must
/// then be the order they were scheduled in.
pub(crate) fn new_token() -> Uuid {
    Uuid::now_v7()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(id: &Uuid) -> u64 {
        let (seconds, nanos) = id.get_timestamp().map(|t| t.to_unix()).unwrap_or_default();
        seconds * 1_000 + u64::from(nanos / 1_000_000)
    }

    fn now_millis() -> u64 {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        u64::try_from(now.as_millis()).unwrap_or(u64::MAX)
    }

    #[test]
    fn ids_are_version_7_distinct_and_of_now() {
        let before = now_millis();
        let ids: Vec<Uuid> = (0..10_000).map(|_| new_id()).collect();
        let after = now_millis();
        assert!(ids.iter().all(|id| id.get_version_num() == 7));
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        // A second of slack either way: the clock may be stepped meanwhile.
        assert!(ids.iter().all(|id| (before.saturating_sub(1_000)..=after + 1_000).contains(&millis(id))));
    }

    #[test]
    fn tokens_are_ordered_as_they_were_made() {
        let tokens: Vec<String> = (0..10_000).map(|_| new_token().to_string()).collect();
        assert!(tokens.windows(2).all(|pair| pair[0] < pair[1]), "as text, as the Redis scheduler compares them");
    }
}
