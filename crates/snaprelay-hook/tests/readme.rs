//! The README's wiring section shows the complete snaprelay-specific code of a minimal
//! integration; `examples/minimal.rs` is that code, compiled. This keeps the two equal, so
//! the README cannot drift from the API.

#[test]
fn readme_wiring_block_is_the_compiled_minimal_example() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("../../README.md")).unwrap();
    let section = readme
        .split("## Wiring the hook into an application")
        .nth(1)
        .expect("the README has the wiring section");
    let block = section
        .split("```rust\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the wiring section has a rust block");
    let example = std::fs::read_to_string(root.join("examples/minimal.rs")).unwrap();
    let code = example
        .split("// README: begin\n")
        .nth(1)
        .and_then(|rest| rest.split("// README: end").next())
        .expect("the example has the README markers");
    assert_eq!(
        block, code,
        "README.md's wiring block differs from crates/snaprelay-hook/examples/minimal.rs"
    );
}
