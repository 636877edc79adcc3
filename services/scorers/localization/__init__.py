"""The localization scorer: grounds every mentioned phrase in the region and computes ``S_loc``."""
