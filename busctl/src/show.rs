use std::io::Write;

use lapin::Connection;

use crate::faulted::Faulted;
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
        let mut shown = false;
        while let Some(fetched) = scan.next().await? {
            scan.hold(fetched.tag);
            if Faulted::of(&fetched.message).message_id.eq_ignore_ascii_case(message_id) {
                writeln!(out, "queue: {queue}")?;
                for (name, value) in fetched.message.headers.iter() {
                    let text = value.as_str().map_or_else(|| value.to_string(), str::to_owned);
                    writeln!(out, "{name}: {text}")?;
                }
                let body = serde_json::from_slice::<serde_json::Value>(&fetched.body)
                    .ok()
                    .and_then(|json| serde_json::to_string_pretty(&json).ok())
                    .unwrap_or_else(|| String::from_utf8_lossy(&fetched.body).into_owned());
                writeln!(out, "\n{body}")?;
                shown = true;
                break;
            }
        }
        scan.finish().await?;
        if shown {
            return Ok(());
        }
    }
    Err(Error::Usage(format!("no message {message_id} in {endpoint}_error or {endpoint}_skipped")))
}
