//! The hardware tests' own code, run in CI on a pseudo-terminal that loops
//! back what is written to it (socat's PIPE address), as a wire from TX to
//! RX would: a hardware run executes code that is tested here.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use runnel_hardware_tests::{loopback, Setup};

#[test]
fn the_loopback_test_passes_on_a_looped_back_pty() {
    let dir = tempfile::TempDir::new().unwrap();
    let link = dir.path().join("ttyLOOP");
    let mut socat = Command::new(runnel_tests::serial::socat_bin())
        .arg(format!("PTY,raw,echo=0,link={}", link.display()))
        .arg("PIPE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start socat (apt-get install socat)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !link.exists() {
        assert!(Instant::now() < deadline, "socat made no {}", link.display());
        std::thread::sleep(Duration::from_millis(10));
    }
    let setup = Setup {
        port: link.clone(),
        tx: None,
        bauds: vec![115_200],
    };
    let report = loopback(&setup, 115_200, 1.0);
    assert!(report.lines >= 2000, "{report:?}");
    let _ = socat.kill();
    let _ = socat.wait();
}
