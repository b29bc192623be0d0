use std::io::Write;

use lapin::Connection;

use crate::faulted::Faulted;
use crate::redrive::shown;
use crate::scan::QueueScan;
use crate::{Error, Result};

/// `busctl show`: the headers and pretty body of one message of `<endpoint>_error`, else of
/// `<endpoint>_skipped`.
pub(crate) async fn show(
    connection: &Connection,
    endpoint: &str,
    message_id: &str,
    out: &mut impl Write,
) -> Result<()> {
    for queue in [format!("{endpoint}_error"), format!("{endpoint}_skipped")] {
        let mut scan = match QueueScan::open(connection, &queue).await {
            Ok(scan) => scan,
            Err(Error::NoSuchQueue(_)) => continue,
            Err(error) => return Err(error),
        };
        let mut found = false;
        while let Some(fetched) = scan.next().await? {
            if Faulted::of(&fetched.message).message_id.eq_ignore_ascii_case(message_id) {
                writeln!(out, "queue: {queue}")?;
                for (name, value) in fetched.message.headers.iter() {
                    let text = value.as_str().map_or_else(|| value.to_string(), str::to_owned);
                    writeln!(out, "{}: {}", shown(name), shown(&text))?;
                }
                let body = serde_json::from_slice::<serde_json::Value>(&fetched.body)
                    .ok()
                    .and_then(|json| serde_json::to_string_pretty(&json).ok())
                    .unwrap_or_else(|| String::from_utf8_lossy(&fetched.body).into_owned());
                writeln!(out)?;
                for line in body.lines() {
                    writeln!(out, "{}", bus_core::logged::escaped(line, usize::MAX))?;
                }
                found = true;
                break;
            }
        }
        scan.finish().await?;
        if found {
            return Ok(());
        }
    }
    Err(Error::Usage(format!("no message {message_id} in {endpoint}_error or {endpoint}_skipped")))
}
