//! The `host` block of the envelope: which process wrote a message.

use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use crate::Headers;

/// The process that wrote a message, as MassTransit's envelope `host` describes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HostInfo {
    /// Machine name.
    pub machine_name: Option<String>,
    /// Process name (for us: the executable's name).
    pub process_name: Option<String>,
    /// Process id.
    pub process_id: Option<i64>,
    /// .NET assembly; for us the executable's name.
    pub assembly: Option<String>,
    /// .NET assembly version; for us the bus version.
    pub assembly_version: Option<String>,
    /// .NET runtime version; for us the Rust compiler version.
    pub framework_version: Option<String>,
    /// MassTransit version; for us `rust-bus {version}`.
    pub mass_transit_version: Option<String>,
    /// Operating system.
    pub operating_system_version: Option<String>,
}

impl HostInfo {
    /// This process, computed once.
    pub fn current() -> Arc<HostInfo> {
        static CURRENT: OnceLock<Arc<HostInfo>> = OnceLock::new();
        CURRENT
            .get_or_init(|| {
                let process = std::env::current_exe()
                    .ok()
                    .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                    .unwrap_or_else(|| "unknown".to_owned());
                Arc::new(HostInfo {
                    machine_name: Some(gethostname::gethostname().to_string_lossy().into_owned()),
                    process_name: Some(process.clone()),
                    process_id: Some(i64::from(std::process::id())),
                    assembly: Some(process),
                    assembly_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
                    framework_version: Some(format!("rustc {}", env!("BUS_RUSTC_VERSION"))),
                    mass_transit_version: Some(format!("rust-bus {}", env!("CARGO_PKG_VERSION"))),
                    operating_system_version: Some(format!("{} {}", std::env::consts::OS, std::env::consts::ARCH)),
                })
            })
            .clone()
    }

    /// The `MT-Host-*` headers MassTransit adds to messages moved to `_error`.
    pub fn to_fault_headers(&self, headers: &mut Headers) {
        let pairs = [
            ("MT-Host-MachineName", &self.machine_name),
            ("MT-Host-ProcessName", &self.process_name),
            ("MT-Host-Assembly", &self.assembly),
            ("MT-Host-AssemblyVersion", &self.assembly_version),
            ("MT-Host-MassTransitVersion", &self.mass_transit_version),
            ("MT-Host-FrameworkVersion", &self.framework_version),
            ("MT-Host-OperatingSystemVersion", &self.operating_system_version),
        ];
        for (name, value) in pairs {
            if let Some(value) = value {
                headers.insert(name, value.as_str());
            }
        }
        if let Some(pid) = self.process_id {
            headers.insert("MT-Host-ProcessId", pid.to_string());
        }
    }
}
