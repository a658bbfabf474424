"""``eft-local serve``: the OpenAI-compatible HTTP server (needs the ``server`` extra)."""
