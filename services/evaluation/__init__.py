"""Referring expression comprehension (REC) evaluation: datasets, accuracy at IoU thresholds, paired
bootstrap confidence intervals, the table and the plot (`spr-rec-eval`)."""
