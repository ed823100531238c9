//! Runs the stdlib-only Python client's own tests (clients/python/tests) against the real
//! binary: proof from outside Rust that a non-Rust host can drive the worker.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

#[test]
fn python_client_tests_pass_against_the_binary() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("python3")
        .args([
            "-m",
            "unittest",
            "discover",
            "-s",
            "clients/python/tests",
            "-v",
        ])
        .current_dir(root)
        .env("MEMCOORD_BIN", env!("CARGO_BIN_EXE_memcoord"))
        .output()
        .expect("python3 is needed to run the Python client's tests");
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert!(
        out.status.success(),
        "Python client tests failed:\n{stderr}"
    );
    assert!(
        stderr.contains("OK"),
        "unittest did not report OK:\n{stderr}"
    );
}
