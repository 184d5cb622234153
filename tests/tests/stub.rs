//! The type stubs users' IDEs read (`flows/runnel/*.pyi`) must match the
//! `runnel` package compiled into the binary.
//!
//! `tests/flows/check_stub.py` does the comparison inside runnel's embedded
//! interpreter (`runnel check` runs it); these tests run it on the real
//! stubs, and on a copy with a function deleted to show that it notices.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use runnel_tests::{run_with_timeout, runnel_bin, workspace_root, Finished};

const TIMEOUT: Duration = Duration::from_secs(60);
const CHECKER: &str = "tests/flows/check_stub.py";

/// `runnel check tests/flows/check_stub.py`, from the workspace root, with
/// `RUNNEL_STUB_DIR` set to `stub_dir` if given.
fn check_stubs(stub_dir: Option<&Path>) -> Finished {
    let mut cmd = Command::new(runnel_bin());
    cmd.arg("check").arg(CHECKER).current_dir(workspace_root());
    match stub_dir {
        Some(dir) => cmd.env("RUNNEL_STUB_DIR", dir),
        None => cmd.env_remove("RUNNEL_STUB_DIR"),
    };
    run_with_timeout(&mut cmd, TIMEOUT)
}

/// Copies every file of the folder `from` into the folder `to`.
fn copy_stub_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display())) {
        let path = entry.expect("read a directory entry").path();
        if path.is_file() {
            let dest = to.join(path.file_name().expect("a file has a name"));
            std::fs::copy(&path, &dest).unwrap_or_else(|e| panic!("copy {}: {e}", path.display()));
        }
    }
}

/// `source` without the top-level `def NAME(...)` and its body (up to the
/// next top-level `def` or `class`, or the end).
fn without_function(source: &str, name: &str) -> String {
    let start = source
        .find(&format!("\ndef {name}("))
        .unwrap_or_else(|| panic!("the stub defines no function {name}"))
        + 1;
    let rest = &source[start + 1..];
    let end = ["\ndef ", "\nclass "]
        .iter()
        .filter_map(|next| rest.find(next))
        .min()
        .map(|i| start + 1 + i + 1)
        .unwrap_or(source.len());
    format!("{}{}", &source[..start], &source[end..])
}

#[test]
fn stubs_match_the_embedded_package() {
    let done = check_stubs(None);
    assert!(
        done.success(),
        "{} failed ({}): flows/runnel/*.pyi no longer match the runnel package. stderr:\n{}",
        done.command,
        done.status,
        done.stderr_text()
    );
    assert!(done.stdout_text().contains("ok: "), "stdout:\n{}", done.stdout_text());
}

#[test]
fn check_names_a_function_missing_from_the_stubs() {
    let stubs = tempfile::tempdir().expect("create a temp dir");
    copy_stub_dir(&workspace_root().join("flows").join("runnel"), stubs.path());
    let op_stub = stubs.path().join("op.pyi");
    let source = std::fs::read_to_string(&op_stub).expect("read the copied op.pyi");
    let edited = without_function(&source, "key_rm");
    assert!(!edited.contains("def key_rm("), "key_rm was not removed");
    assert!(edited.contains("def map_value("), "removed too much:\n{edited}");
    std::fs::write(&op_stub, edited).expect("write the edited op.pyi");

    let done = check_stubs(Some(stubs.path()));
    let stderr = done.stderr_text();
    assert!(
        !done.success(),
        "{} succeeded although op.pyi lacks key_rm. stdout:\n{}",
        done.command,
        done.stdout_text()
    );
    assert!(
        stderr.contains("runnel.op.key_rm") && stderr.contains("missing from the stub"),
        "stderr does not name the missing function runnel.op.key_rm:\n{stderr}"
    );
}
