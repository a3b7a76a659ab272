//! The `ftdisk` binary, run as a child process.

use shared_disk::{Arbiter, ClientError, DiskClient, ServerKind, TasOutcome};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("ftdisk-bin-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running ftdisk, killed when dropped.
struct Ftdisk {
    child: Child,
    addr: String,
}

impl Drop for Ftdisk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ftdisk() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ftdisk"));
    cmd.env("FTDISK_LOG", "warn").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

/// Starts ftdisk on a free port and waits for its "serving" line.
fn spawn(image: &Path) -> (Ftdisk, String) {
    spawn_with(&["--image".as_ref(), image.as_os_str()], "127.0.0.1:0")
}

/// Starts ftdisk with `args` on `listen` and waits for its "serving" line.
fn spawn_with(args: &[&std::ffi::OsStr], listen: &str) -> (Ftdisk, String) {
    let mut child = ftdisk().args(args).args(["--listen", listen]).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines, rx) = mpsc::channel();
    // Keeps draining stderr, so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            let _ = lines.send(line);
        }
    });
    let mut server = Ftdisk { child, addr: String::new() };
    loop {
        let line = rx.recv_timeout(TIMEOUT).expect("ftdisk did not say it is serving");
        if line.starts_with("ftdisk: serving ") {
            server.addr = line.rsplit(" on ").next().unwrap().to_string();
            return (server, line);
        }
    }
}

/// Runs ftdisk expecting it to fail at once; returns its stderr.
fn fails(args: &[&str]) -> String {
    let out = ftdisk().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let errors: Vec<_> = stderr.lines().filter(|l| l.starts_with("ftdisk: error: ")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    errors[0].to_string()
}

#[test]
fn a_missing_image_is_an_error() {
    let dir = TempDir::new("missing");
    let image = dir.0.join("nope.img");
    let error = fails(&["--image", image.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert!(error.contains("nope.img"), "{error}");
}

#[test]
fn bad_arguments_are_errors() {
    let dir = TempDir::new("badargs");
    let image = dir.0.join("disk.img");
    std::fs::write(&image, vec![0u8; 1000]).unwrap();
    let error = fails(&["--image", image.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert!(error.contains("512"), "{error}");
    std::fs::write(&image, vec![0u8; 4096]).unwrap();
    let error = fails(&["--image", image.to_str().unwrap(), "--listen", "not-an-address"]);
    assert!(error.contains("not-an-address"), "{error}");
    let out = ftdisk().arg("--image").arg(&image).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn serves_a_qemu_img_image() {
    let dir = TempDir::new("qemu");
    let image = dir.0.join("disk.img");
    // qemu-img (Debian's qemu-utils) is part of the project's machines;
    // without it this test fails rather than skips.
    let created = Command::new("qemu-img")
        .args(["create", "-f", "raw"])
        .arg(&image)
        .arg("64M")
        .output()
        .expect("qemu-img is needed for this test (apt-get install qemu-utils)");
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let (server, line) = spawn(&image);
    assert_eq!(line, format!("ftdisk: serving {} ({} bytes) on {}", image.display(), 64 << 20, server.addr));
    let mut c = DiskClient::connect(&server.addr, TIMEOUT).unwrap();
    assert_eq!(c.size(), 64 << 20);
    assert_eq!(c.test_and_set(0, "primary@a").unwrap(), TasOutcome::Won { generation: 1 });
    c.write((64 << 20) - 512, &[0x5a; 512], 1).unwrap();
    c.flush(1).unwrap();
    assert_eq!(c.read((64 << 20) - 512, 512).unwrap(), vec![0x5a; 512]);
    assert_eq!(
        std::fs::read_to_string(dir.0.join("disk.img.owner")).unwrap(),
        "ftdisk-owner 1\ngeneration 1\nowner primary@a\n"
    );
    drop(server);
    let on_disk = std::fs::read(&image).unwrap();
    assert_eq!(on_disk.len(), 64 << 20);
    assert!(on_disk[(64 << 20) - 512..].iter().all(|b| *b == 0x5a));
}

#[test]
fn serves_an_arbiter_only_record_that_survives_a_restart() {
    let dir = TempDir::new("arbiter");
    let state = dir.0.join("pair.state");
    let args = ["--arbiter-only".as_ref(), "--state".as_ref(), state.as_os_str()];
    let (server, line) = spawn_with(&args, "127.0.0.1:0");
    assert_eq!(
        line,
        format!("ftdisk: serving the arbitration record {} (arbiter only) on {}", state.display(), server.addr)
    );
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "ftdisk-owner 1\ngeneration 0\nowner \n");
    let mut a = Arbiter::connect(&server.addr, TIMEOUT).unwrap();
    assert_eq!(a.kind(), ServerKind::ArbiterOnly);
    assert_eq!(a.generation().unwrap(), 0);
    assert_eq!(a.test_and_set(0, "primary@a").unwrap(), TasOutcome::Won { generation: 1 });
    let err = DiskClient::connect(&server.addr, TIMEOUT).unwrap_err();
    assert!(matches!(err, ClientError::NoDisk { .. }), "{err}");

    // Killed (no clean shutdown) and restarted on the same port.
    let addr = server.addr.clone();
    drop(server);
    let (_server, _) = spawn_with(&args, &addr);
    assert_eq!(a.owner().unwrap(), (1, "primary@a".to_string()));
    assert_eq!(a.test_and_set(0, "backup@b").unwrap(), TasOutcome::Lost { generation: 1, owner: "primary@a".into() });
}

#[test]
fn exactly_one_mode_is_a_usage_error_otherwise() {
    let dir = TempDir::new("modes");
    let image = dir.0.join("disk.img");
    std::fs::write(&image, vec![0u8; 4096]).unwrap();
    let state = dir.0.join("state");
    let (image, state) = (image.to_str().unwrap(), state.to_str().unwrap());
    let listen = ["--listen", "127.0.0.1:0"];
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["--image", image, "--arbiter-only", "--state", state],
        vec!["--arbiter-only"],
        vec!["--state", state],
        vec!["--image", image, "--state", state],
    ];
    for args in cases {
        let out = ftdisk().args(&args).args(listen).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    }
    assert!(!dir.0.join("state").exists(), "a usage error created the state file");
    // A state file that cannot be made is a one-line error.
    let error = fails(&["--arbiter-only", "--state", "/nonexistent-dir/state", "--listen", "127.0.0.1:0"]);
    assert!(error.contains("/nonexistent-dir/state"), "{error}");
}

#[test]
fn help_documents_both_modes() {
    let out = ftdisk().arg("--help").stdout(Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["--image", "--arbiter-only", "--state", "--listen", "IMAGE.owner", "Exit status"] {
        assert!(help.contains(word), "--help does not mention {word}:\n{help}");
    }
}
