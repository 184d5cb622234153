//! The hardware tests' own code, run in CI on pseudo-terminals made by
//! socat: a wire from TX to RX (socat's PIPE), and two ports wired to each
//! other (a pty pair) that the test "unplugs" by killing socat. A hardware
//! run executes code that is tested here.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use runnel_hardware_tests::{loopback, unplug, Setup};

fn socat(args: &[String], links: &[&Path]) -> Child {
    let child = Command::new(runnel_tests::serial::socat_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start socat (apt-get install socat)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !links.iter().all(|l| l.exists()) {
        assert!(Instant::now() < deadline, "socat made no {links:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn pty(link: &Path) -> String {
    format!("PTY,raw,echo=0,link={}", link.display())
}

#[test]
fn the_loopback_test_passes_on_a_looped_back_pty_and_keeps_up_with_115200_baud() {
    let dir = tempfile::TempDir::new().unwrap();
    let link = dir.path().join("ttyLOOP");
    let mut child = socat(&[pty(&link), "PIPE".into()], &[&link]);
    let setup = Setup {
        port: link.clone(),
        tx: None,
        bauds: vec![115_200],
    };
    let report = loopback(&setup, 115_200, 1.0);
    // A pty has no line rate of its own: runnel must at least keep up with
    // what a 115200 baud line would carry.
    assert!(report.lines_per_second() >= 0.8 * report.line_rate, "{report:?}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_unplug_test_passes_on_a_pty_pair_that_goes_away_and_comes_back() {
    let dir = tempfile::TempDir::new().unwrap();
    let (port, tx): (PathBuf, PathBuf) = (dir.path().join("ttyA"), dir.path().join("ttyB"));
    let args = [pty(&port), pty(&tx)];
    let mut child = Some(socat(&args, &[&port, &tx]));
    let setup = Setup {
        port: port.clone(),
        tx: Some(tx.clone()),
        bauds: vec![115_200],
    };
    unplug(&setup, 115_200, &mut |what| match what {
        "unplug" => {
            let _ = std::fs::remove_file(&port);
            let _ = std::fs::remove_file(&tx);
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        _ => {
            std::thread::sleep(Duration::from_millis(500));
            child = Some(socat(&args, &[&port, &tx]));
        }
    });
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
}
