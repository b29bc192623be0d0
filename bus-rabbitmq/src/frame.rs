//! Whether a message's properties fit in one AMQP frame.
//!
//! A message body is split over as many frames as it needs, but its properties (the header
//! table included) travel in one content-header frame, which must fit in the `frame_max` the
//! connection negotiated (RabbitMQ's default: 128 KiB). A larger one makes the broker close
//! the whole connection (`FRAME_ERROR`), failing every channel on it; published again on
//! each new connection, it would do so for ever. So an outgoing message is measured first.

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

/// Bytes a content-header frame carries besides the properties: frame type, channel and
/// size (7), class id and weight (4), body size (8) and the frame end (1).
const HEADER_FRAME_OVERHEAD: usize = 20;

/// The size of the content-header frame that carries `properties`, as lapin writes it.
pub(crate) fn header_frame_size(properties: &BasicProperties) -> usize {
    let short = |s: &Option<lapin::types::ShortString>| s.as_ref().map_or(0, |s| 1 + s.as_str().len());
    HEADER_FRAME_OVERHEAD
        + 2 // property flags
        + short(properties.content_type())
        + short(properties.content_encoding())
        + properties.headers().as_ref().map_or(0, table_size)
        + properties.delivery_mode().map_or(0, |_| 1)
        + properties.priority().map_or(0, |_| 1)
        + short(properties.correlation_id())
        + short(properties.reply_to())
        + short(properties.expiration())
        + short(properties.message_id())
        + properties.timestamp().map_or(0, |_| 8)
        + short(properties.kind())
        + short(properties.user_id())
        + short(properties.app_id())
        + short(properties.cluster_id())
}

fn table_size(table: &FieldTable) -> usize {
    4 + table.inner().iter().map(|(name, value)| 1 + name.as_str().len() + 1 + value_size(value)).sum::<usize>()
}

/// The encoded size of a field value, without its type byte.
fn value_size(value: &AMQPValue) -> usize {
    match value {
        AMQPValue::Void => 0,
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        AMQPValue::FieldArray(items) => 4 + items.as_slice().iter().map(|v| 1 + value_size(v)).sum::<usize>(),
        AMQPValue::FieldTable(table) => table_size(table),
    }
}

/// Makes `properties` fit in a frame of `frame_max` bytes: first by replacing the largest
/// header values with a short note of what was there, largest first; then, if many small
/// headers still do not fit, by leaving out the largest of those not named in `kept`. Used
/// when moving a message to `_error`, `_skipped` or a delay queue: the original fitted, but the
/// headers added on the way (`kept`: the reason it failed) may not, and the move must not fail
/// for it. Returns the names of the headers it cut or left out.
pub(crate) fn fit(properties: &mut BasicProperties, frame_max: usize, kept: &bus_core::Headers) -> Vec<String> {
    let mut cut = Vec::new();
    while header_frame_size(properties) > frame_max {
        let Some(mut table) = properties.headers().clone() else { break };
        let largest = table
            .inner()
            .iter()
            .map(|(name, value)| (value_size(value), name.clone()))
            .filter(|(size, _)| *size > NOTE_LIMIT)
            .max();
        let Some((size, name)) = largest else { break };
        table.insert(name.clone(), AMQPValue::LongString(format!("[{size} bytes cut: too large for a frame]").into()));
        cut.push(name.as_str().to_owned());
        *properties = properties.clone().with_headers(table);
    }
    if header_frame_size(properties) > frame_max {
        if let Some(table) = properties.headers().clone() {
            let mut entries: Vec<(lapin::types::ShortString, AMQPValue)> = table.inner().clone().into_iter().collect();
            // Largest last, so that they are popped first.
            entries.sort_by_key(|(name, value)| {
                (!kept.contains(name.as_str()), 1 + name.as_str().len() + value_size(value))
            });
            let mut size = header_frame_size(properties);
            while size > frame_max {
                match entries.last() {
                    Some((name, value)) if !kept.contains(name.as_str()) => {
                        size -= 1 + name.as_str().len() + 1 + value_size(value);
                        cut.push(name.as_str().to_owned());
                        entries.pop();
                    }
                    _ => break,
                }
            }
            let mut table = FieldTable::default();
            for (name, value) in entries {
                table.insert(name, value);
            }
            *properties = properties.clone().with_headers(table);
        }
    }
    cut
}

/// Values at most this large are never cut: the note that replaces one is about this size.
const NOTE_LIMIT: usize = 64;

#[cfg(test)]
mod tests {
    use lapin::types::{FieldArray, LongString, ShortString};

    use super::*;

    /// What lapin writes, measured by amq-protocol's own encoder.
    fn encoded(properties: &BasicProperties) -> usize {
        let (buffer, _) = cookie_factory::gen(lapin::protocol::basic::gen_properties(properties), Vec::new())
            .expect("properties encode");
        buffer.len() + HEADER_FRAME_OVERHEAD
    }

    fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut table = FieldTable::default();
        for (name, value) in entries {
            table.insert(ShortString::from(name), value);
        }
        table
    }

    #[test]
    fn the_measured_size_is_the_encoded_size() {
        let nested = table(vec![("inner", AMQPValue::LongString(LongString::from("x".repeat(300))))]);
        let headers = table(vec![
            ("MT-Reason", AMQPValue::LongString(LongString::from("fault"))),
            ("count", AMQPValue::LongLongInt(3)),
            ("flag", AMQPValue::Boolean(true)),
            ("ratio", AMQPValue::Double(0.5)),
            ("small", AMQPValue::ShortShortInt(-1)),
            ("short", AMQPValue::ShortInt(7)),
            ("long", AMQPValue::LongUInt(7)),
            ("float", AMQPValue::Float(1.5)),
            ("when", AMQPValue::Timestamp(1_700_000_000)),
            ("decimal", AMQPValue::DecimalValue(lapin::types::DecimalValue { scale: 2, value: 314 })),
            ("name", AMQPValue::ShortString(ShortString::from("abc"))),
            ("bytes", AMQPValue::ByteArray(vec![1u8, 2, 3].into())),
            ("none", AMQPValue::Void),
            (
                "list",
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongLongInt(1), AMQPValue::FieldTable(nested)])),
            ),
        ]);
        let properties = BasicProperties::default()
            .with_content_type("application/vnd.masstransit+json".into())
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_priority(3)
            .with_correlation_id("c".into())
            .with_reply_to("r".into())
            .with_expiration("1000".into())
            .with_message_id("m".into())
            .with_timestamp(5)
            .with_type("t".into())
            .with_app_id("a".into());
        assert_eq!(header_frame_size(&properties), encoded(&properties));
        assert_eq!(header_frame_size(&BasicProperties::default()), encoded(&BasicProperties::default()));
    }

    #[test]
    fn fitting_cuts_the_largest_values_until_the_frame_fits() {
        let headers = table(vec![
            ("huge", AMQPValue::LongString(LongString::from("h".repeat(200_000)))),
            ("big", AMQPValue::LongString(LongString::from("b".repeat(1_000)))),
            ("MT-Reason", AMQPValue::LongString(LongString::from("fault"))),
        ]);
        let mut properties = BasicProperties::default().with_headers(headers);
        let cut = fit(&mut properties, 131_072, &bus_core::Headers::new());
        assert_eq!(cut, vec!["huge".to_owned()]);
        assert!(header_frame_size(&properties) <= 131_072);
        let headers = properties.headers().clone().expect("headers kept");
        assert_eq!(
            headers.inner().get("big").map(value_size),
            Some(1_004),
            "values that fit once the largest is cut stay whole"
        );
        assert_eq!(headers.inner().get("MT-Reason"), Some(&AMQPValue::LongString(LongString::from("fault"))));
    }

    #[test]
    fn many_small_headers_are_left_out_until_the_frame_fits_keeping_the_reason() {
        let mut entries: Vec<(String, AMQPValue)> =
            (0..4_000).map(|i| (format!("h{i:05}"), AMQPValue::LongString(LongString::from("v".repeat(30))))).collect();
        entries.push(("MT-Fault-Message".to_owned(), AMQPValue::LongString(LongString::from("why"))));
        let table = table(entries.iter().map(|(n, v)| (n.as_str(), v.clone())).collect());
        let mut properties = BasicProperties::default().with_headers(table);
        assert!(header_frame_size(&properties) > 131_072);
        let mut kept = bus_core::Headers::new();
        kept.insert("MT-Fault-Message", "why");
        let cut = fit(&mut properties, 131_072, &kept);
        assert!(header_frame_size(&properties) <= 131_072, "{}", header_frame_size(&properties));
        assert!(!cut.is_empty() && !cut.contains(&"MT-Fault-Message".to_owned()));
        let headers = properties.headers().clone().expect("headers kept");
        assert!(headers.inner().contains_key("MT-Fault-Message"), "the reason stays");
    }
}
