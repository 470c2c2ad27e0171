//! What end-to-end tests share: the sidecar binary next to the test binary, real photos, and the
//! operator's admin key.

use std::path::PathBuf;

/// The `inferpool-sidecar` binary that cargo built with the tests (`target/<profile>/`).
pub fn sidecar_bin() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(|deps| deps.parent()).map(PathBuf::from).unwrap_or_default();
    let bin = dir.join("inferpool-sidecar");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} is missing: run `cargo build -p inferpool-sidecar` (make test does)", bin.display()),
        ))
    }
}

/// A real photo from scikit-image's data directory in the project venv (`make setup` installs it).
pub fn photo(name: &str) -> std::io::Result<Vec<u8>> {
    let lib = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/venv/lib");
    let missing = |what: String| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{what}; run `make setup`"));
    let dir = std::fs::read_dir(&lib)
        .map_err(|e| missing(format!("{}: {e}", lib.display())))?
        .filter_map(|e| Some(e.ok()?.path().join("site-packages/skimage/data")))
        .find(|p| p.exists())
        .ok_or_else(|| missing("scikit-image is not installed in the venv".to_owned()))?;
    std::fs::read(dir.join(name)).map_err(|e| missing(format!("{name}: {e}")))
}

/// The admin key material of the operators the tests start; every replica of one operator needs
/// the same key, as the chart's generated Secret gives them.
pub const OPERATOR_ADMIN_KEY: &str = "inferpool end-to-end tests' operator admin key";
