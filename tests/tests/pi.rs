//! runnel as a Raspberry Pi runs it: under systemd (the notify protocol
//! against a test NOTIFY_SOCKET, the unit checked by `systemd-analyze
//! verify`), and as built by `cross/build` (the aarch64 binary under
//! qemu-aarch64-static, the .deb's contents).
//!
//! The package tests need `cross/build` to have run: `tests/run_all.sh`
//! runs it and sets RUNNEL_AARCH64_BIN and RUNNEL_DEB (and
//! RUNNEL_REQUIRE_CROSS=1, so that in CI they cannot skip).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use runnel_tests::{run_ok, runnel_bin, toml_path, workspace_root, write_file, Agent, Fifo};
use tempfile::TempDir;

const STOP_WITHIN: Duration = Duration::from_secs(6);

/// What the agent sent to the notify socket, as (when, text).
fn receive(sock: &UnixDatagram, until: Instant, out: &mut Vec<(Instant, String)>) {
    let mut buf = vec![0u8; 4096];
    while Instant::now() < until {
        let left = until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        sock.set_read_timeout(Some(left.min(Duration::from_millis(100))))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            out.push((Instant::now(), String::from_utf8_lossy(&buf[..n]).to_string()));
        }
    }
}

#[test]
fn the_notify_socket_gets_ready_status_and_watchdog_pings_that_stop_when_python_wedges() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path();
    let flows = dir.join("flows");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    write_file(
        &flows,
        "wedge.py",
        "import itertools\nfrom runnel import Dataflow, op, sources, sinks\n\ndef step(x):\n    if x[\"n\"] == 2:\n        any(itertools.repeat(False, 10**12))\n    return x\n\nflow = Dataflow(\"wedge\")\nx = op.input(\"in\", flow, sources.file(\"in.fifo\"))\nop.output(\"out\", op.map(\"py_map\", x, step), sinks.file(\"out.jsonl\"))\n",
    );
    let mut fifo = Fifo::create(&flows.join("in.fifo"));
    let config = write_file(
        dir,
        "runnel.toml",
        &format!(
            "device_id = \"pi\"\nflows_dir = {}\nstate_dir = {}\nstatus_interval = 0\npython_step_timeout = 1\n",
            toml_path(&flows),
            toml_path(&dir.join("state"))
        ),
    );
    let sock_text = sock_path.display().to_string();
    // A 3 s watchdog: pings come every second while healthy.
    let mut agent = Agent::start_with_env(
        dir,
        &config,
        "stderr.txt",
        &[("NOTIFY_SOCKET", &sock_text), ("WATCHDOG_USEC", "3000000")],
    );
    let mut got = Vec::new();
    receive(&sock, Instant::now() + Duration::from_secs(5), &mut got);
    let texts: Vec<&str> = got.iter().map(|(_, t)| t.as_str()).collect();
    let ready = texts
        .iter()
        .position(|t| t.lines().any(|l| l == "READY=1"))
        .unwrap_or_else(|| panic!("no READY=1 in {texts:?}\n{}", agent.stderr()));
    assert!(
        texts[ready].contains("STATUS=1 flow(s)"),
        "READY comes with a status line: {texts:?}"
    );
    assert!(
        agent.stderr().contains("starting flow \"wedge\""),
        "READY after the flows loaded"
    );
    let pings = texts
        .iter()
        .skip(ready)
        .filter(|t| t.trim_end() == "WATCHDOG=1")
        .count();
    assert!(pings >= 3, "a ping about every second while healthy: {texts:?}");
    // One reading is fine, the next wedges the Python thread in C code.
    fifo.send("{\"n\": 1}\n{\"n\": 2}\n");
    let mut later = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let unhealthy = loop {
        receive(&sock, Instant::now() + Duration::from_millis(200), &mut later);
        if let Some((at, _)) = later.iter().find(|(_, t)| t.starts_with("STATUS=UNHEALTHY")) {
            break *at;
        }
        assert!(
            Instant::now() < deadline,
            "no STATUS=UNHEALTHY: {later:?}\n{}",
            agent.stderr()
        );
    };
    let status = later
        .iter()
        .find(|(_, t)| t.starts_with("STATUS=UNHEALTHY"))
        .unwrap()
        .1
        .clone();
    assert!(status.contains("Python thread is stuck"), "{status}");
    // From then on, no pings: systemd would restart the service.
    receive(&sock, Instant::now() + Duration::from_secs(4), &mut later);
    let after: Vec<&String> = later
        .iter()
        .filter(|(at, t)| *at > unhealthy && t.trim_end() == "WATCHDOG=1")
        .map(|(_, t)| t)
        .collect();
    assert!(after.is_empty(), "pings after the wedge: {later:?}");
    let _ = agent.terminate(STOP_WITHIN);
    let mut last = Vec::new();
    receive(&sock, Instant::now() + Duration::from_millis(300), &mut last);
    assert!(
        later.iter().chain(&last).any(|(_, t)| t.trim_end() == "STOPPING=1"),
        "STOPPING=1 when it stops: {later:?} {last:?}"
    );
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let unit = std::fs::read_to_string(workspace_root().join("cross/debian/runnel.service")).unwrap();
    for key in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=runnel",
        "ConfigurationDirectory=runnel",
        "ProtectSystem=strict",
        "PrivateTmp=true",
        "NoNewPrivileges=true",
        "SupplementaryGroups=dialout",
        "MemoryMax=",
        "User=runnel",
    ] {
        assert!(unit.contains(key), "the unit lacks {key}");
    }
    // verify checks that ExecStart is executable: point it at the binary built here.
    let tmp = TempDir::new().unwrap();
    let copy = tmp.path().join("runnel.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/bin/runnel", &runnel_bin().display().to_string()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (apt-get install systemd)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // Unknown keys and bad values are warnings with exit 0: there must be none.
    assert!(
        !err.lines().any(|l| l.contains("runnel.service")),
        "systemd-analyze verify warns:\n{err}"
    );
}

/// `cross/build`'s outputs, or `None` (the test says why) when they were
/// not built and RUNNEL_REQUIRE_CROSS is not set.
fn cross_outputs() -> Option<(PathBuf, PathBuf)> {
    let get = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    match (get("RUNNEL_AARCH64_BIN"), get("RUNNEL_DEB")) {
        (Some(bin), Some(deb)) => {
            assert!(
                bin.is_file() && deb.is_file(),
                "{} or {} is missing",
                bin.display(),
                deb.display()
            );
            Some((bin, deb))
        }
        _ if std::env::var("RUNNEL_REQUIRE_CROSS").as_deref() == Ok("1") => {
            panic!("RUNNEL_REQUIRE_CROSS=1 but RUNNEL_AARCH64_BIN / RUNNEL_DEB are not set (run cross/build)")
        }
        _ => {
            eprintln!(
                "skipped: set RUNNEL_AARCH64_BIN and RUNNEL_DEB (cross/build --print-paths), or run tests/run_all.sh"
            );
            None
        }
    }
}

/// The aarch64 binary under qemu (the host's arm64 libraries from
/// libpython3.11:arm64, found as on a Pi).
fn qemu(bin: &Path) -> Command {
    let mut cmd = Command::new("qemu-aarch64-static");
    cmd.arg(bin).current_dir(workspace_root()).env_remove("RUNNEL_LOG");
    cmd
}

#[test]
fn the_aarch64_binary_runs_under_qemu_checks_every_example_and_replays_the_demo_like_x86() {
    let Some((bin, _)) = cross_outputs() else { return };
    // The size budget of the stripped aarch64 binary.
    let size = std::fs::metadata(&bin).unwrap().len();
    assert!(size <= 6_000_000, "the aarch64 binary is {size} bytes, over 6 MB");
    let t = Duration::from_secs(120);
    let version = run_ok(qemu(&bin).arg("--version"), t);
    assert_eq!(
        version.stdout_text().trim(),
        format!("runnel {}", env!("CARGO_PKG_VERSION"))
    );
    let mut examples: Vec<PathBuf> = std::fs::read_dir(workspace_root().join("flows/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "py"))
        .collect();
    examples.push(workspace_root().join("flows/demo.py"));
    assert!(examples.len() >= 4, "{examples:?}");
    for flow in &examples {
        let done = run_ok(qemu(&bin).arg("check").arg(flow), t);
        assert!(done.stdout_text().contains("ok: "), "{}", runnel_tests::show(&done));
    }
    let arm = run_ok(qemu(&bin).args(["replay", "flows/demo.py"]), t);
    let x86 = run_ok(
        Command::new(runnel_bin())
            .args(["replay", "flows/demo.py"])
            .current_dir(workspace_root())
            .env_remove("RUNNEL_LOG"),
        t,
    );
    assert!(arm.stdout.len() > 1000, "{}", runnel_tests::show(&arm));
    assert!(arm.stdout == x86.stdout, "aarch64 and x86 replays differ");
}

#[test]
fn the_deb_puts_every_file_in_its_place() {
    let Some((bin, deb)) = cross_outputs() else { return };
    let info = Command::new("dpkg-deb").arg("--info").arg(&deb).output().unwrap();
    let info = String::from_utf8_lossy(&info.stdout).to_string();
    for field in ["Package: runnel", "Architecture: arm64", "libpython3.11", "adduser"] {
        assert!(info.contains(field), "control lacks {field}:\n{info}");
    }
    let tmp = TempDir::new().unwrap();
    let root = tmp.path();
    let x = Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root).status().unwrap();
    assert!(x.success());
    let mode = |p: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(root.join(p))
            .unwrap_or_else(|e| panic!("{p} is not in the package: {e}"))
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("usr/bin/runnel"), 0o755);
    assert_eq!(
        std::fs::read(root.join("usr/bin/runnel")).unwrap(),
        std::fs::read(&bin).unwrap()
    );
    assert_eq!(mode("etc/runnel/runnel.toml"), 0o644);
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/runnel.service")).unwrap();
    assert_eq!(
        unit,
        std::fs::read_to_string(workspace_root().join("cross/debian/runnel.service")).unwrap()
    );
    for f in [
        "usr/share/runnel/examples/demo.py",
        "usr/share/runnel/examples/captures/greenhouse.jsonl",
        "usr/share/runnel/examples/serial_gps.py",
        "usr/share/runnel/stubs/runnel/sources.pyi",
        "usr/share/runnel/bytewax_adapter.py",
        "usr/share/doc/runnel/README.md",
    ] {
        assert_eq!(mode(f), 0o644, "{f}");
    }
    // The maintainer scripts make the user and the folders, and enable the unit.
    let ctl = root.join("control");
    let e = Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctl).status().unwrap();
    assert!(e.success());
    let postinst = std::fs::read_to_string(ctl.join("postinst")).unwrap();
    for needle in [
        "adduser --system",
        "dialout",
        "/etc/runnel/flows",
        "deb-systemd-helper enable runnel.service",
    ] {
        assert!(postinst.contains(needle), "postinst lacks {needle}:\n{postinst}");
    }
    let conffiles = std::fs::read_to_string(ctl.join("conffiles")).unwrap();
    assert!(conffiles.contains("/etc/runnel/runnel.toml"), "{conffiles}");
}
