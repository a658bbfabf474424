"""``eft-local explore``'s library: which GGUF file for which role."""
