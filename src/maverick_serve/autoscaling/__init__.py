"""Autoscaling policies per tier (decisions from signals; Serve applies the counts)."""
