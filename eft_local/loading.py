"""Loading a preset's models: load options, the alignment check, KV estimates.

:class:`LoadOptions` are the runtime-wide defaults (a preset's per-model options win);
:func:`check_models` reads vocabularies only; :func:`load_models` loads every role's file
and connects to every remote role's engine (:mod:`eft_local.remote`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eft_local import backend, ggufscan, hub, limits
from eft_local.errors import EftError
from eft_local.presets import Preset
from eft_local.remote.model import endpoint_for, open_remote, top_k_warning
from eft_local.remote.vocab import read_info
from eft_local.schedule import shapes as schedules
from eft_local.vocab import AlignmentReport, align, comparable


@dataclass(frozen=True)
class LoadOptions:
    """Runtime-wide load defaults; a preset's per-model options win over these."""

    n_ctx: int | None = None
    n_threads: int | None = None
    n_gpu_layers: int | None = None
    n_batch: int = 512
    parallel: bool = True  # measured on 2 shared cores: see docs/benchmarks.md
    speculative: bool = True
    draft_k: int | None = None  # None: adaptive block size
    schedule: str | None = None
    """Decode schedule: ``auto`` (measured at load, cached; the default with ``parallel``;
    ``sequential`` unmeasured when every model is wholly on the GPU), ``lanes``,
    ``large-first`` or ``sequential`` (the default without ``parallel``)."""

    download: bool = True
    """Download a preset's missing hub files when it loads (``serve`` turns this off unless
    ``--allow-download``)."""
    n_seq: int = 1
    """Sequences (slots) each local model's context holds at once, each with its own
    ``n_ctx`` tokens of KV cache: how many generations run side by side (``serve -np``,
    ``generate --input -np``; see :attr:`eft_local.backend.LlamaModel.n_seq`)."""
    kv_unified: bool = False
    """With several sequences, one KV cache for all of them (``-kvu``, llama-server's flag)
    instead of a stream each: busy slots with gaps between them still share one pass over
    the weights, but a sequence's rows then differ slightly with what else is cached
    (:mod:`eft_local.backend.sequences`)."""
    flash_attn: str = "auto"
    """llama.cpp's flash attention: ``auto`` (llama.cpp decides: on where it can), ``on``,
    ``off``. Off, a batched sequence's rows equal its rows alone exactly (with a stream per
    sequence); on, they can differ slightly (``docs/threads-and-gpus.md``)."""

    def __post_init__(self) -> None:
        if self.schedule is not None and self.schedule not in ("auto", *schedules.NAMES):
            raise EftError(f"invalid schedule {self.schedule!r}: choose auto, "
                           f"{', '.join(schedules.NAMES)}")
        if self.n_ctx is not None:
            limits.check_n_ctx(self.n_ctx, "load options")
        if self.n_threads is not None:
            limits.check_threads(self.n_threads, "load options")
        limits.check_n_seq(self.n_seq, "load options")
        if self.flash_attn not in backend.FLASH_ATTN:
            raise EftError(f"load options: flash_attn {self.flash_attn!r}: choose auto, on "
                           "or off")


def kv_estimate(path: Path, n_ctx: int | None = None) -> tuple[int, int] | None:
    """One slot's KV cache in bytes, and the context it is for, of a GGUF file (from its
    header, nothing loaded; see :meth:`eft_local.ggufscan.Header.kv_bytes`)."""
    return ggufscan.scan(path).kv_bytes(n_ctx)


def architecture(path: Path) -> str | None:
    """The model architecture a GGUF file names (``llama``, ``qwen2``...), from its header
    alone; None when it does not say."""
    return ggufscan.scan(path).arch


def check_models(preset: Preset, *, download: bool = False,
                 say: Callable[[str], None] | None = None, pieces: bool = False
                 ) -> AlignmentReport:
    """The tokenizer-alignment report for a preset's models (vocabularies only: local
    files' read from the GGUF, remote models' through their engines' endpoints; when an
    engine shows only what each id decodes to, or with ``pieces``, every model is compared
    that way)."""
    paths = {role: hub.resolve(spec, download=download)
             for role, spec in preset.models.items() if not spec.remote}
    vocabs = {role: backend.read_vocab(path) for role, path in paths.items()}
    expected = min((v.n_tokens for v in vocabs.values()), default=None)
    for role, spec in preset.models.items():
        if spec.remote:
            ep = endpoint_for(spec)
            try:
                vocabs[role] = read_info(ep, spec, expected=expected, say=say).vocab
            finally:
                ep.close()
    if pieces or any(v.text_kind == "piece" for v in vocabs.values()):
        vocabs.update({role: backend.read_vocab(path, pieces=True)
                       for role, path in paths.items()})
    ordered = {role: vocabs[role] for role in preset.models}
    return align(comparable(ordered) if not pieces else
                 {r: v.as_pieces() for r, v in ordered.items()}, reference=preset.template_role)


def load_models(preset: Preset, paths: Mapping[str, Path], options: LoadOptions,
                say: Callable[[str], None]) -> dict[str, Any]:
    """Load each role's file (``paths``: the local roles) with the preset's per-model
    options (``options`` as the defaults), and connect to each remote role's engine; on
    any failure the models opened so far are closed. Roles keep the preset's order."""
    opts = options
    gpu = backend.library.supports_gpu_offload()
    cores = opts.n_threads or max(1, os.cpu_count() or 1)
    share = max(1, cores // max(1, len(paths))) if opts.parallel else cores
    loaded: dict[str, Any] = {}
    try:
        for role, path in paths.items():
            spec = preset.models[role]
            layers = spec.n_gpu_layers if spec.n_gpu_layers is not None else (
                opts.n_gpu_layers if opts.n_gpu_layers is not None else (-1 if gpu else 0))
            size = path.stat().st_size / 2**20 if path.is_file() else 0
            say(f"loading {role}: {path.name} ({size:.1f} MiB"
                f"{', GPU offload' if layers and gpu else ', CPU'})")
            loaded[role] = backend.LlamaModel(
                path, n_ctx=spec.n_ctx if spec.n_ctx is not None else opts.n_ctx,
                n_gpu_layers=layers if gpu else 0,
                n_threads=spec.n_threads or share, n_batch=spec.n_batch or opts.n_batch,
                n_seq=opts.n_seq, kv_unified=opts.kv_unified, flash_attn=opts.flash_attn)
            model = loaded[role]
            say(f"{role}: KV cache {limits.size_text(model.kv_bytes_per_seq)} per slot x "
                f"{model.n_seq} (n_ctx {model.n_ctx} each)")
        expected = min((m.n_vocab for m in loaded.values()), default=None)
        for role, spec in preset.models.items():
            if spec.remote:
                say(f"connecting {role}: {spec.describe()}")
                remote = open_remote(spec, expected_vocab=expected, say=say, n_seq=opts.n_seq)
                loaded[role] = remote
                say(f"{role}: {remote.describe()}")
    except BaseException:
        for model in loaded.values():
            model.close()
        raise
    loaded = {role: loaded[role] for role in preset.models if role in loaded}
    weights = preset.formula.weights(preset.params)
    for role, model in loaded.items():
        warning = preset.models[role].remote and top_k_warning(role, weights.get(role, 0.0), model)
        if warning:
            say(warning)
    beyond = [f"{role} {m.n_ctx_train}" for role, m in loaded.items()
              if m.n_ctx > getattr(m, "n_ctx_train", m.n_ctx) > 0]
    if beyond:
        say(f"warning: n_ctx {min(m.n_ctx for m in loaded.values())} is above the training "
            f"context of {', '.join(beyond)} tokens: replies past it may be poor")
    return loaded
