"""Where an encoder's weights are on this machine: offline first, and the command that fetches what is missing.

Weights are looked for, in order: the file the user names (``encoder.weights_file``), the library's own cache
(the Hugging Face hub cache for timm, open_clip and transformers, honouring ``HF_HOME`` / ``HF_HUB_CACHE``;
torch's hub cache for torchvision, honouring ``TORCH_HOME``; ``~/.torchxrayvision`` for TorchXRayVision).
Nothing is downloaded unless ``MEDTL_DOWNLOAD=1`` is set (and ``HF_HUB_OFFLINE`` is not): a missing weight
fails at once with the command that fetches it, where the libraries' own loaders would retry a hub for a
minute on a machine with no network. Imports no torch, so ``medtl encoders`` can say what is here at once.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from medtl.errors import WeightsError
from medtl.models._registry import EncoderSpec
from medtl.models.catalog import TORCHVISION_FILES

# the weight files a Hugging Face repository of each library holds, in the order they are preferred
HF_WEIGHTS = {
    "timm": ("model.safetensors", "pytorch_model.bin"),
    "open_clip": ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
    "transformers": ("model.safetensors", "pytorch_model.bin"),
}
HF_CONFIG = {"timm": "config.json", "open_clip": "open_clip_config.json", "transformers": "config.json"}
# TorchXRayVision's weight files (xrv.models.model_urls) of the registered weights
XRV_URLS = {
    "densenet121-res224-all": "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
    "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
}
TORCHVISION_URL = "https://download.pytorch.org/models/"


def downloads_allowed() -> bool:
    """``MEDTL_DOWNLOAD=1`` lets medtl fetch missing weights; ``HF_HUB_OFFLINE`` (set by the user) wins."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    return os.environ.get("MEDTL_DOWNLOAD") == "1" and not offline


def _missing(what: str, fetch: str) -> WeightsError:
    return WeightsError(
        f"{what} are not on this machine. Fetch them once where there is a network: {fetch} "
        "(or set MEDTL_DOWNLOAD=1 to let medtl download them), or pass a local file: weights_file=PATH "
        "(CLI: --weights-file)"
    )


def hf_cached(repo: str, filename: str) -> Path | None:
    """``repo``'s ``filename`` in the Hugging Face cache, or None (nothing is fetched)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return Path(found) if isinstance(found, str) else None


def hf_folder(repo: str, library: str, need_weights: bool = True) -> Path:
    """The cached snapshot folder of ``repo`` holding the ``library``'s config (and weights when
    ``need_weights``); downloaded only when :func:`downloads_allowed`, else a WeightsError naming the command."""
    wanted = (HF_CONFIG[library],) + (HF_WEIGHTS[library] if need_weights else ())
    config = hf_cached(repo, HF_CONFIG[library])
    weights = [p for f in HF_WEIGHTS[library] if (p := hf_cached(repo, f)) is not None]
    if config is not None and (weights or not need_weights):
        return config.parent
    if downloads_allowed():
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=list(wanted) + ["*.json", "*.txt"]))
    raise _missing(f"the weights of {repo} ({library})", f"`hf download {repo}`")


def hf_weights_file(repo: str, library: str = "timm") -> Path:
    """The cached weight file of ``repo`` (safetensors preferred), or a WeightsError naming the command."""
    for filename in HF_WEIGHTS[library]:
        found = hf_cached(repo, filename)
        if found is not None:
            return found
    if downloads_allowed():
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, HF_WEIGHTS[library][0]))
    raise _missing(f"the weights of {repo}", f"`hf download {repo} {HF_WEIGHTS[library][0]}`")


def _fetch(url: str, path: Path) -> Path:
    """Download ``url`` to ``path`` (only when :func:`downloads_allowed`), torch's way."""
    import torch.hub

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(path), progress=False)
    return path


def torch_hub_dir() -> Path:
    """torch's hub cache of weight files (``torch.hub.get_dir()/checkpoints``), found without importing torch."""
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    home = os.environ.get("TORCH_HOME", os.path.join(xdg, "torch"))
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


def torchvision_file(filename: str) -> Path:
    """torchvision's weight file ``filename`` in torch's hub cache, or a WeightsError naming the command."""
    path = torch_hub_dir() / filename
    if path.is_file():
        return path
    if downloads_allowed():
        return _fetch(TORCHVISION_URL + filename, path)
    raise _missing(
        f"torchvision's weights {filename}", f"`curl -L --create-dirs -o {path} {TORCHVISION_URL}{filename}`"
    )


def xrv_path(url: str) -> Path:
    """Where TorchXRayVision keeps the weight file of ``url`` (its ``utils.get_cache_dir()``)."""
    return Path(os.path.expanduser(os.path.join("~", ".torchxrayvision", "models_data"))) / url.rsplit("/", 1)[-1]


def xrv_file(weights: str, url: str | None = None) -> Path:
    """TorchXRayVision's weight file for ``weights`` (its url from ``xrv.models.model_urls``) in its cache
    (``~/.torchxrayvision/models_data``), or a WeightsError naming the command."""
    url = url or XRV_URLS.get(weights, "")
    path = xrv_path(url)
    if url and path.is_file():
        return path
    if url and downloads_allowed():
        return _fetch(url, path)
    raise _missing(f"TorchXRayVision's weights {weights!r}", f"`curl -L --create-dirs -o {path} {url}`")


def weights_status(spec: EncoderSpec) -> tuple[bool, str]:
    """(whether ``spec``'s default weights are on this machine, where they are or what they need) — for
    ``medtl encoders``; reads file names only."""
    try:
        if spec.source == "bundled" and spec.offline_weights is not None:
            path, _ = spec.offline_weights()  # type: ignore[misc]  # the spec's locator returns (path, prefix)
            return Path(path).is_file(), f"bundled ({Path(path).name})"
        if spec.source == "monai":
            return False, "none published: train from scratch or pass --weights-file"
        if spec.source == "torchvision":
            path = torch_hub_dir() / TORCHVISION_FILES.get(spec.ref, "?")
            return path.is_file(), str(path)
        if spec.source == "xrv":
            return xrv_file(spec.ref).is_file(), str(xrv_path(XRV_URLS.get(spec.ref, "")))
        if not spec.hub_id:
            return False, "resolved when built"
        library = spec.source if spec.source in HF_WEIGHTS else "timm"
        ok = any(hf_cached(spec.hub_id, f) is not None for f in HF_WEIGHTS[library])
        return ok, f"Hugging Face cache ({spec.hub_id})"
    except WeightsError:
        return False, "missing"


def library_installed(source: str) -> bool:
    """Whether the library building ``source`` encoders is installed (the foundation ones are an extra)."""
    module = {"xrv": "torchxrayvision", "open_clip": "open_clip", "transformers": "transformers"}.get(source)
    return module is None or importlib.util.find_spec(module) is not None


__all__ = [
    "downloads_allowed",
    "hf_cached",
    "hf_folder",
    "hf_weights_file",
    "torch_hub_dir",
    "torchvision_file",
    "xrv_file",
    "weights_status",
    "library_installed",
]
