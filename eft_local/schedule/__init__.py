"""Decode schedules: how the models of a step share the CPU threads, and how that is chosen."""
