"""SpeechBrain's PyTorch BEATs (`speechbrain.lobes.models.beats`, 1.1.2) as the independent
reference for BEATs parity (`python -m unimoe.convert parity FILE.pt` and the tests).

SpeechBrain's module imports `torchaudio.compliance.kaldi` for its waveform -> fbank step, and no
torchaudio wheel matches the locked torch (docs/design.md, "BEATs"). The reference is fed
filterbanks, so that step never runs: when torchaudio is absent, a stand-in whose `fbank` raises is
put in `sys.modules` for the import only. Two SpeechBrain 1.1.2 departures from the official BEATs
are bridged here and nowhere else: `extract_features` starts from a waveform (its `preprocess` is
pointed at the given fbank), and the encoder's final layer_norm of layer_norm_first models (no
released checkpoint has one) is applied only with `output_all_hiddens` (applied here).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import pathlib
import sys
import types
from collections.abc import Iterator
from typing import Any

import numpy as np

_STANDIN_MODULES = ("torchaudio", "torchaudio.compliance", "torchaudio.compliance.kaldi")


def _fbank_unavailable(*args, **kwargs):
    raise RuntimeError(
        "torchaudio is not installed: unimoe's BEATs reference takes filterbanks, not waveforms"
    )


@contextlib.contextmanager
def _torchaudio_standin() -> Iterator[None]:
    """A bare torchaudio in `sys.modules` while SpeechBrain imports, when the real one is absent;
    removed after, so no other importer (transformers probes for torchaudio) mistakes it."""
    if importlib.util.find_spec("torchaudio") is not None:
        yield
        return
    modules = {name: types.ModuleType(name) for name in _STANDIN_MODULES}
    modules["torchaudio"].compliance = modules["torchaudio.compliance"]
    modules["torchaudio.compliance"].kaldi = modules["torchaudio.compliance.kaldi"]
    modules["torchaudio.compliance.kaldi"].fbank = _fbank_unavailable
    sys.modules.update(modules)
    # SpeechBrain warns at import that it cannot read the (stand-in's) torchaudio version; it
    # sets its loggers' levels itself, so the logger is switched off instead.
    backend_logger = logging.getLogger("speechbrain.utils.torch_audio_backend")
    backend_logger.disabled = True
    try:
        yield
    finally:
        backend_logger.disabled = False
        for name in _STANDIN_MODULES:
            sys.modules.pop(name, None)


def speechbrain_beats() -> types.ModuleType:
    """`speechbrain.lobes.models.beats` (installed by the Makefile's test step)."""
    try:
        with _torchaudio_standin():
            import speechbrain.lobes.models.beats as module
    except ImportError as err:
        raise ImportError(
            f"the BEATs reference needs speechbrain==1.1.2 ({err}): `make test` installs it, "
            "or pip install --no-deps -r requirements/nodeps.in"
        ) from None
    _drop_lazy_redirects()
    return module


def _drop_lazy_redirects() -> None:
    """SpeechBrain puts lazy modules in `sys.modules` (redirects of its deprecated paths to
    `speechbrain.inference`, ...); anything that later walks `sys.modules` and touches one
    (hypothesis, `warnings`) would import them, which needs the real torchaudio. Unloaded, they
    are dropped: the BEATs module does not use them."""
    from speechbrain.utils.importutils import LazyModule

    for name, module in list(sys.modules.items()):
        if isinstance(module, LazyModule) and module.lazy_module is None:
            del sys.modules[name]


def load(path: str | pathlib.Path) -> Any:
    """SpeechBrain's BEATs with the checkpoint at `path`, loaded by SpeechBrain itself (a strict
    `load_state_dict`; torch maps the file's weight_g / weight_v onto its weight-norm
    parametrization)."""
    return speechbrain_beats().BEATs(ckp_path=str(path), freeze=True).eval()


def features(
    model: Any, fbank_bfm: np.ndarray, num_frames_b: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(features [B, S, D], token padding mask [B, S]) of the reference for a normalised fbank,
    the first num_frames_b[b] frames of row b real and the rest padding (None: none padded)."""
    import torch

    batch, num_frames, _ = fbank_bfm.shape
    fbank = torch.from_numpy(np.ascontiguousarray(fbank_bfm, np.float32))
    lengths_b = np.full(batch, num_frames) if num_frames_b is None else np.asarray(num_frames_b)
    # SpeechBrain turns relative lengths into a mask by `position < length * F`; half a frame
    # below the boundary keeps float rounding off it.
    wav_lens = torch.tensor((lengths_b - 0.5) / num_frames, dtype=torch.float32)
    model.preprocess = lambda wav, *args: fbank
    try:
        with torch.no_grad():
            features_bsd = model.extract_features(torch.zeros(batch, num_frames), wav_lens)[0]
            if model.cfg.layer_norm_first:
                features_bsd = model.encoder.layer_norm(features_bsd)
    finally:
        del model.preprocess
    frame_padding_bf = torch.from_numpy(np.arange(num_frames)[None, :] >= lengths_b[:, None])
    padding_bs = model.forward_padding_mask(features_bsd, frame_padding_bf)
    return features_bsd.numpy(), padding_bs.numpy()
