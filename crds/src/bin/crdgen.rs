//! Prints the InferencePool CustomResourceDefinition as YAML (`crds/inferencepool.yaml`).

fn main() -> std::process::ExitCode {
    match inferpool_crds::crd_yaml() {
        Ok(yaml) => {
            print!("{yaml}");
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("crdgen: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
