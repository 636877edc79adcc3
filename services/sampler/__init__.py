"""The region sampler: dataset images in, `spr.v1.Region` records out."""
