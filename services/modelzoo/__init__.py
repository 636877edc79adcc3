"""Model loading (`loading`) and the tiny random-weight model factory (`tiny`, `spr-tiny-models`).

Import the submodules directly; this package imports nothing so that `import services.modelzoo` stays
cheap (transformers takes seconds to import).
"""
