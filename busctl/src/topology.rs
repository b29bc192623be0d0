//! `busctl topology`: exchanges and what they route to, as a tree from the exchanges nothing
//! routes to (the message types' exchanges, mostly).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use crate::management::{BindingInfo, Management};
use crate::Result;

pub(crate) async fn print(management: &Management, out: &mut impl Write) -> Result<()> {
    let exchanges: BTreeMap<String, String> = management
        .exchanges()
        .await?
        .into_iter()
        .filter(|e| !e.name.is_empty() && !e.name.starts_with("amq."))
        .map(|e| (e.name, e.kind))
        .collect();
    // The default exchange's implicit bindings say nothing: every queue has one.
    let bindings: Vec<BindingInfo> =
        management.bindings().await?.into_iter().filter(|b| exchanges.contains_key(&b.source)).collect();
    let targets: BTreeSet<&str> =
        bindings.iter().filter(|b| b.destination_type == "exchange").map(|b| b.destination.as_str()).collect();
    for (name, kind) in &exchanges {
        if !targets.contains(name.as_str()) {
            writeln!(out, "{name} ({kind})")?;
            branch(name, &exchanges, &bindings, 1, &mut vec![name.clone()], out)?;
        }
    }
    Ok(())
}

/// What `source` routes to, indented by `depth`; `path` stops a cycle of exchange bindings.
fn branch(
    source: &str,
    exchanges: &BTreeMap<String, String>,
    bindings: &[BindingInfo],
    depth: usize,
    path: &mut Vec<String>,
    out: &mut impl Write,
) -> Result<()> {
    let indent = "  ".repeat(depth);
    for binding in bindings.iter().filter(|b| b.source == source) {
        let key = if binding.routing_key.is_empty() { String::new() } else { format!(" [{}]", binding.routing_key) };
        let destination = &binding.destination;
        if binding.destination_type == "exchange" {
            let kind = exchanges.get(destination).map_or("exchange", String::as_str);
            writeln!(out, "{indent}-> {destination} ({kind}){key}")?;
            if !path.contains(destination) {
                path.push(destination.clone());
                branch(destination, exchanges, bindings, depth + 1, path, out)?;
                path.pop();
            }
        } else {
            writeln!(out, "{indent}-> queue {destination}{key}")?;
        }
    }
    Ok(())
}
