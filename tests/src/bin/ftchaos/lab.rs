//! The redis guest's network: a lab of network-namespace hosts with TAPs
//! bridged onto a LAN, made once per run, whose links the `cut-link` fault
//! cuts.

use ftvmm_tests::lab::Lab;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicU64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum GuestKind {
    Kvstore,
    Redis,
}

/// VM hosts in the lab.
pub(crate) const NET_HOSTS: u8 = 6;

/// The redis guest's network, made once per run: a lab of hosts `v1` to
/// `v6` (network namespaces), each with a TAP bridged onto the LAN; the
/// client, the ftdisk and the proxies run in the root namespace, on the
/// LAN's bridge.
pub(crate) struct NetLab {
    pub(crate) lab: Lab,
    subnet: String,
    pub(crate) next: AtomicU64,
}

impl NetLab {
    pub(crate) fn create() -> Result<NetLab, String> {
        let name = format!("fc{}", std::process::id() % 100_000);
        let subnet = "10.91.0".to_string();
        let hosts: Vec<(String, u8)> = (1..=NET_HOSTS).map(|i| (format!("v{i}"), i)).collect();
        let refs: Vec<(&str, u8)> = hosts.iter().map(|(h, o)| (h.as_str(), *o)).collect();
        let lab = Lab::create(&name, &subnet, &refs, std::process::id()).map_err(|e| e.to_string())?;
        for (h, _) in &hosts {
            lab.add_tap(h, "fttap").map_err(|e| e.to_string())?;
        }
        Ok(NetLab { lab, subnet, next: AtomicU64::new(0) })
    }

    pub(crate) fn bridge_ip(&self) -> String {
        format!("{}.254", self.subnet)
    }

    pub(crate) fn vm_ip(&self) -> String {
        format!("{}.10", self.subnet)
    }

    pub(crate) fn ip(&self, host: &str) -> String {
        self.lab.host(host).map(|h| h.ip.clone()).unwrap_or_default()
    }

    pub(crate) fn ns(&self, host: &str) -> String {
        self.lab.host(host).map(|h| h.ns.clone()).unwrap_or_default()
    }

    /// Forgets where the VM's MAC was (the LAN's bridge and each host's):
    /// the next frames to it are flooded until a live VM answers.
    pub(crate) fn flush_fdb(&self) {
        let mut cmds = vec![format!("ip link set dev {}-br0 type bridge fdb_flush", self.lab.name)];
        for h in &self.lab.hosts {
            cmds.push(format!("ip -n {} link set dev br0 type bridge fdb_flush", h.ns));
        }
        let _ = Command::new("sh").args(["-c", &cmds.join("; ")]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }

    /// Restores every host's link (a scenario may end with one cut).
    pub(crate) fn restore_all(&self) {
        for h in &self.lab.hosts {
            let _ = self.lab.restore(&h.name);
        }
    }
}
