"""Roles evaluated by remote engines: eft-local serve (exact rows), llama-server and
OpenAI-compatible servers (top-K log-probs). :class:`eft_local.remote.model.RemoteModel`
is one more :class:`eft_local.engine.Model`; nothing here imports llama_cpp."""
