//! The committed CRD must be what the types generate, or a cluster gets a schema the operator does
//! not expect.

#[test]
fn committed_crd_matches_the_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/inferencepool.yaml");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    let generated = inferpool_crds::crd_yaml().unwrap_or_else(|e| panic!("crdgen: {e}"));
    assert!(
        committed == generated,
        "crds/inferencepool.yaml is stale; regenerate it with `make crd` (cargo run -p inferpool-crds --bin crdgen)"
    );
}

#[test]
fn crd_fits_in_a_client_side_apply_annotation() {
    // `kubectl apply` without --server-side stores the whole object in an annotation of at most
    // 256 KiB; a larger CRD could only be installed with server-side apply or `kubectl create`.
    let generated = inferpool_crds::crd_yaml().unwrap_or_else(|e| panic!("crdgen: {e}"));
    let json = serde_json::to_string(&serde_saphyr::from_str::<serde_json::Value>(&generated).unwrap_or_default())
        .unwrap_or_default();
    assert!(json.len() > 1000 && json.len() < 256 * 1024, "CRD is {} bytes as JSON", json.len());
}

#[test]
fn every_example_is_a_valid_pool() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let path = entry.unwrap_or_else(|e| panic!("{dir}: {e}")).path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let pool: inferpool_crds::InferencePool =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(pool.spec.validate(), Ok(()), "{}", path.display());
        seen += 1;
    }
    assert!(seen >= 3, "expected the CPU, GPU and Redis examples, found {seen}");
}
