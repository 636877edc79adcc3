"""The SPR scorers (SPEC §2): localization (``S_loc``, grounding models) and semantic (``S_sem``, CLIP-style).

Shared pieces live here: request checks, image/region preparation, sentence splitting, scorer ids and
the Kafka stage runner (:mod:`.common`, :mod:`.stage`), plus ONNX Runtime sessions (:mod:`.onnx_runtime`),
the PyTorch -> ONNX export command (:mod:`.onnx_export`), the models' image preprocessing without the
transformers processors (:mod:`.preprocess`) and a fully known sample region (:mod:`.sample`).
The localization backends are Grounding DINO / OWLv2 (PyTorch or onnxruntime) and the policy MLLM on
Triton (:mod:`.localization.mllm`).
"""
