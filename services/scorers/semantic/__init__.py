"""The semantic scorer: ``S_sem = ½ (CLIP(crop, text) + S_local(image, region, text))``."""
