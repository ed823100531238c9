//! Runs the Python package's own tests (clients/python/tests) against the real binary: proof
//! from outside Rust that a non-Rust host can drive the worker, and that a second process can
//! claim and read exports in place (the test process is that second process).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

/// Test modules that must have run: a file left out of discovery would otherwise pass silently.
const MODULES: &[&str] = &[
    "test_client",
    "test_package_client",
    "test_unix_client",
    "test_claim_shm",
    "test_exports_server",
    "test_cuda_attach",
    "test_torch_views",
    "test_packaging",
];

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
    for module in MODULES {
        assert!(
            stderr.contains(&format!("({module}.")),
            "the Python tests of {module} did not run:\n{stderr}"
        );
    }
    // This binary has exports: the tests against them must have run, not skipped.
    assert!(
        !stderr.contains("no memory.export yet"),
        "the export tests skipped against a binary that has memory.export:\n{stderr}"
    );
    // What cannot run here (no GPU, no numpy, no torch) is skipped, and says so.
    for line in stderr.lines().filter(|l| l.contains("SKIPPED")) {
        eprintln!("{line}");
    }
}
