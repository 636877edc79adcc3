"""The SPR scorers (SPEC §2): localization (``S_loc``, grounding models) and semantic (``S_sem``, CLIP-style).

Shared pieces live here: request checks, image/region preparation, sentence splitting, scorer ids and
the Kafka stage runner (:mod:`.common`, :mod:`.stage`), plus ONNX Runtime sessions (:mod:`.onnx_runtime`)
and the PyTorch -> ONNX export command (:mod:`.onnx_export`).
"""
