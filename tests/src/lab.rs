//! Network-namespace labs: named "hosts" on one LAN, for the tests and the
//! demo (through the `ftlab` binary).
//!
//! A lab `L` is a bridge `L-br0` in the root namespace (which also sits on
//! the LAN, at `.254`) and, per host `H`, a namespace `L-H` whose `eth0` is
//! one end of a veth pair whose other end, `L-vN`, is on the bridge. A host
//! can carry a TAP device bridged onto the LAN (`br0` in its namespace holds
//! `eth0`, the TAP and the host's address), as a VM host's would be.
//!
//! Nothing is left behind: creating a lab first removes whatever an earlier
//! run of the same name left, and every lab records its owner's pid under
//! [`STATE_DIR`], so that any later `create` also sweeps the labs of owners
//! that died without cleaning up. Dropping a [`Lab`] removes it.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Where labs record their owner's pid.
pub const STATE_DIR: &str = "/run/ftlab";

/// A lab's error: the command that failed and what it said.
#[derive(Debug)]
pub struct LabError(pub String);

impl std::fmt::Display for LabError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LabError {}

/// Runs a shell command; its stderr becomes the error.
fn sh(cmd: &str) -> Result<(), LabError> {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| LabError(format!("cannot run sh: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError(format!("`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr).trim())))
    }
}

/// Runs a command whose failure does not matter (cleanup).
fn sh_quiet(cmd: &str) {
    let _ = Command::new("sh").args(["-c", cmd]).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Whether this process may create namespaces (is root).
pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// One host of a lab.
#[derive(Debug, Clone)]
pub struct LabHost {
    pub name: String,
    /// Its network namespace.
    pub ns: String,
    /// Its address on the LAN.
    pub ip: String,
    /// The root-namespace end of its link.
    veth: String,
}

/// A running lab; dropped, it is removed.
#[derive(Debug)]
pub struct Lab {
    pub name: String,
    pub hosts: Vec<LabHost>,
    /// The process whose death orphans the lab.
    owner: u32,
    /// Not removed when dropped.
    keep: bool,
}

fn state_file(lab: &str) -> PathBuf {
    PathBuf::from(STATE_DIR).join(format!("{lab}.pid"))
}

fn pid_alive(pid: u32) -> bool {
    PathBuf::from(format!("/proc/{pid}")).exists()
}

impl Lab {
    /// Creates lab `name` on the /24 `subnet` (e.g. "10.77.0") with `hosts`
    /// (name, last octet), owned by process `owner` (its death lets a later
    /// create sweep the lab). Interface names must fit in 15 bytes, so
    /// `name` may have at most 9.
    pub fn create(name: &str, subnet: &str, hosts: &[(&str, u8)], owner: u32) -> Result<Lab, LabError> {
        if name.is_empty() || name.len() > 9 || !name.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(LabError(format!("lab name {name:?}: want 1 to 9 letters or digits")));
        }
        if !is_root() {
            return Err(LabError("labs need root (network namespaces)".into()));
        }
        sweep_orphans();
        destroy(name);
        let br = format!("{name}-br0");
        sh(&format!("ip link add {br} type bridge && ip link set {br} up && ip addr add {subnet}.254/24 dev {br}"))?;
        let mut lab = Lab { name: name.to_string(), hosts: Vec::new(), owner, keep: false };
        let _ = std::fs::create_dir_all(STATE_DIR);
        lab.owner = owner;
        lab.save();
        for (i, (host, octet)) in hosts.iter().enumerate() {
            let ns = format!("{name}-{host}");
            let veth = format!("{name}-v{}", i + 1);
            let ip = format!("{subnet}.{octet}");
            // Pushed before it exists so that a failure half-way is cleaned up.
            lab.hosts.push(LabHost { name: host.to_string(), ns: ns.clone(), ip: ip.clone(), veth: veth.clone() });
            sh(&format!(
                "ip netns add {ns} && ip link add {veth} type veth peer name eth0 netns {ns} && \
                 ip link set {veth} master {br} up && ip -n {ns} addr add {ip}/24 dev eth0 && \
                 ip -n {ns} link set eth0 up && ip -n {ns} link set lo up"
            ))?;
            lab.save();
        }
        Ok(lab)
    }

    /// The state file: the owner's pid, then a line per host.
    fn save(&self) {
        let mut text = format!("{}\n", self.owner);
        for h in &self.hosts {
            text.push_str(&format!("{} {} {} {}\n", h.name, h.ns, h.ip, h.veth));
        }
        let _ = std::fs::write(state_file(&self.name), text);
    }

    /// The running lab `name`, as its state file describes it (for `ftlab`
    /// commands after `ftlab up`). It is not removed when dropped.
    pub fn open(name: &str) -> Result<Lab, LabError> {
        let text = std::fs::read_to_string(state_file(name)).map_err(|e| LabError(format!("no lab {name:?}: {e}")))?;
        let mut lines = text.lines();
        let owner = lines.next().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
        let hosts = lines
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                match f.as_slice() {
                    [name, ns, ip, veth] => Some(LabHost {
                        name: name.to_string(),
                        ns: ns.to_string(),
                        ip: ip.to_string(),
                        veth: veth.to_string(),
                    }),
                    _ => None,
                }
            })
            .collect();
        Ok(Lab { name: name.to_string(), hosts, owner, keep: true })
    }

    /// Leaves the lab running when this value is dropped (`ftlab up`).
    pub fn keep(mut self) {
        self.keep = true;
    }

    /// The host called `name`.
    pub fn host(&self, name: &str) -> Result<&LabHost, LabError> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| LabError(format!("lab {} has no host {name:?}", self.name)))
    }

    /// Cuts `host`'s link to the LAN, as a dead host's would be.
    pub fn cut(&self, host: &str) -> Result<(), LabError> {
        sh(&format!("ip link set {} down", self.host(host)?.veth))
    }

    /// Brings `host`'s link back.
    pub fn restore(&self, host: &str) -> Result<(), LabError> {
        sh(&format!("ip link set {} up", self.host(host)?.veth))
    }

    /// Gives `host` a TAP device `tap` bridged onto the LAN, as a VM host's
    /// NIC backend would be: `br0` in its namespace holds `eth0`, the TAP
    /// and the host's own address.
    pub fn add_tap(&self, host: &str, tap: &str) -> Result<(), LabError> {
        let h = self.host(host)?;
        let ns = &h.ns;
        sh(&format!(
            "ip -n {ns} link add br0 type bridge && ip -n {ns} addr del {ip}/24 dev eth0 && \
             ip -n {ns} link set eth0 master br0 && ip -n {ns} tuntap add dev {tap} mode tap && \
             ip -n {ns} link set {tap} master br0 up && ip -n {ns} addr add {ip}/24 dev br0 && \
             ip -n {ns} link set br0 up",
            ip = h.ip
        ))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.keep {
            destroy(&self.name);
        }
    }
}

/// Removes lab `name`: kills what runs in its namespaces, deletes them, its
/// links and its bridge. Harmless when there is no such lab.
pub fn destroy(name: &str) {
    let prefix = format!("{name}-");
    let list = Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default();
    for line in String::from_utf8_lossy(&list).lines() {
        let ns = line.split_whitespace().next().unwrap_or_default();
        if ns.starts_with(&prefix) {
            sh_quiet(&format!("ip netns pids {ns} | xargs -r kill -9; ip netns del {ns}"));
        }
    }
    // Deleting a namespace deletes its veth ends, and with them ours; the
    // bridge and any stray links are ours to delete.
    let links = Command::new("ip").args(["-o", "link", "show"]).output().map(|o| o.stdout).unwrap_or_default();
    for line in String::from_utf8_lossy(&links).lines() {
        let Some(dev) = line.split(": ").nth(1).map(|d| d.split('@').next().unwrap_or(d)) else { continue };
        if dev.starts_with(&prefix) {
            sh_quiet(&format!("ip link del {dev}"));
        }
    }
    let _ = std::fs::remove_file(state_file(name));
}

/// Removes the labs whose owner died.
pub fn sweep_orphans() {
    let Ok(entries) = std::fs::read_dir(STATE_DIR) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(lab) = path.file_stem().and_then(|s| s.to_str()).map(str::to_string) else { continue };
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let owner = text.lines().next().and_then(|l| l.trim().parse::<u32>().ok());
        if !owner.is_some_and(pid_alive) {
            destroy(&lab);
        }
    }
}
