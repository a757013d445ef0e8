"""A faithful fake of the AUTOMATIC1111 WebUI's `modules` package (v1.10.1 semantics), for tests only.

It reproduces the behaviours that break real integrations (integration reference §7.4): a tiny real torch model with
the real checkpoint key layout stored in fp16, the hijack that renames text-encoder keys, the reload-by-filename rule,
the conditioning cache keyed on the checkpoint info object, LoRA backups reset only through `load_state_dict`, a
non-reentrant queue lock, and "images" computed from the weights actually loaded. Never installed; a fixture puts
`tests/fakes` on sys.path.
"""
