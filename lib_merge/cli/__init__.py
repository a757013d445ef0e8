"""`python -m lib_merge …`: the command line (`main`), the demo, `inspect`, and the synthetic checkpoints the demo,
the tests and the benchmarks are built from (`synth`)."""
