//! Makes `target/<profile>/mount.rawfs` exist next to `rawfs`.
//!
//! mount(8) runs helpers named `mount.TYPE`, but a cargo binary cannot be named `mount.rawfs`
//! (a crate name cannot contain `.`). The helper binary is built as `mount_rawfs`, and this
//! script puts a relative symlink `mount.rawfs -> mount_rawfs` beside it, so `cargo build`
//! gives `target/<profile>/mount.rawfs` as DESIGN.md promises, and `install` of that path
//! copies the real binary.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        return;
    };
    // OUT_DIR is target/<profile>/build/rawfs-<hash>/out.
    let Some(profile_dir) = out.ancestors().nth(3).map(PathBuf::from) else {
        return;
    };
    let link = profile_dir.join("mount.rawfs");
    // Re-run (and re-create the link) whenever it has gone missing.
    println!("cargo:rerun-if-changed={}", link.display());
    if std::fs::symlink_metadata(&link).is_ok() {
        return;
    }
    if let Err(e) = std::os::unix::fs::symlink("mount_rawfs", &link) {
        println!("cargo:warning=cannot create {}: {e}", link.display());
    }
}
