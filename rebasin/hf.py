"""Loading checkpoints as ``transformers`` modules (for ``--verify`` and α calibration).

Module parameter names can differ from checkpoint tensor names (transformers ≥ 5 renames
some, e.g. ViT's ``encoder.layer.N.attention.attention.query`` → ``layers.N.attention.q_proj``),
so whatever works on a module resolves the family's spec against the module's own names:
permutation groups are keyed by group, not by tensor name, so a π found on the checkpoint
applies to the module unchanged.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import torch

from rebasin.errors import RebasinError
from rebasin.io.checkpoint import ensure_finite
from rebasin.specs import Spec, resolve_spec

_prefetch: threading.Thread | None = None  # the import running in the background, if any


def require_transformers(what: str) -> Any:
    """Import transformers, or fail with a line saying which feature needs it. Waits for a
    :func:`prefetch_model_code` import in flight: Python hands a second thread a module that is
    still being initialised (its attributes missing) rather than waiting for it."""
    if _prefetch is not None and _prefetch is not threading.current_thread():
        _prefetch.join()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:
        raise RebasinError(f"{what} needs transformers: pip install 'rebasin-engine[hf]'") from exc
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def prefetch_model_code(config: dict[str, Any]) -> None:
    """Import transformers and the model class ``config`` names in a background thread: a first
    import costs seconds of Python (transformers imports its modeling code lazily), which can run
    while the caller does other work. :func:`require_transformers` waits for it to finish."""
    global _prefetch

    def load() -> None:
        try:
            transformers = require_transformers("calibration")
            for arch in config.get("architectures") or []:
                getattr(transformers, arch, None)
        except Exception:  # the caller's own import reports any problem
            pass
    if _prefetch is not None:
        return
    _prefetch = threading.Thread(target=load, name="rebasin-prefetch-transformers", daemon=True)
    _prefetch.start()


def load_hf_model(model_dir: str | Path, *, what: str = "this command",
                  dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model class named by ``config.architectures`` (else ``AutoModel``), weights loaded, in eval mode."""
    transformers = require_transformers(what)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise RebasinError(f"{what} needs a model directory with config.json", file=model_dir)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    arch = (config.architectures or [None])[0]
    cls = (getattr(transformers, arch, None) if arch else None) or transformers.AutoModel
    try:
        model = cls.from_pretrained(model_dir, dtype=dtype).eval()
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RebasinError(f"transformers cannot load it ({first})", file=model_dir) from None
    for name, p in model.named_parameters():
        ensure_finite(p.detach(), model_dir, name)
    return model


def module_spec(model: torch.nn.Module, family: str, *, where: object = None) -> Spec:
    """The family's spec resolved against the module's own state-dict names and shapes."""
    state = model.state_dict()
    return resolve_spec(model.config.to_dict(), {k: tuple(v.shape) for k, v in state.items()}, family=family,
                        where=where)


def primary_output(out: Any) -> torch.Tensor:
    """The tensor a model's user reads: CLIP's image-text logits, else ``logits``, else the first output."""
    for key in ("logits_per_image", "logits"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return out[0]
