"""The open encoder registry: tiny checkpoints in each library's own layout, written here into a temporary
Hugging Face hub cache (or TorchXRayVision's cache), loaded through the real code with no network."""

import json
import subprocess
import sys

import pytest
import torch
from huggingface_hub import constants

from medtl.errors import ConfigError, WeightsError
from medtl.models import create_encoder, encoder_groups, get_encoder_spec, list_encoders, resolve_preprocessing
from medtl.models.checkpoint import load_model, save_model
from medtl.models.encoders import cam_layer_name
from medtl.models.hub import weights_status


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache; ``put(repo)`` gives a snapshot folder to write a repository's files in."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MEDTL_DOWNLOAD", raising=False)

    def put(repo: str):
        root = cache / ("models--" + repo.replace("/", "--"))
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text("0" * 40)
        snap = root / "snapshots" / ("0" * 40)
        snap.mkdir(parents=True)
        return snap

    return put


def _same(a: torch.nn.Module, b_state: dict, prefix: str = "") -> bool:
    sd = a.state_dict()
    return all(torch.equal(sd[prefix + k], v) for k, v in b_state.items() if prefix + k in sd)


def _round_trip(model, tmp_path, pre, x):
    """Saved with save_model and rebuilt with load_model: the same outputs."""
    model.eval()
    save_model(model, tmp_path / "m.safetensors", model.pretrained_cfg["medtl_encoder"], ["a", "b"], pre)
    again, _ = load_model(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.allclose(model(x), again(x), atol=1e-5)
    return again


def test_timm_name_with_tag_loads_from_the_hub_cache(hub, tmp_path):
    import timm
    from safetensors.torch import save_file

    donor = timm.create_model("resnet10t", num_classes=1000)
    save_file(donor.state_dict(), str(hub("timm/resnet10t.c3_in1k") / "model.safetensors"))
    model = create_encoder("timm:resnet10t.c3_in1k", num_classes=2)
    assert _same(model, {k: v for k, v in donor.state_dict().items() if not k.startswith("fc.")})
    assert "resnet10t.c3_in1k" in model.pretrained_cfg["weights_source"]
    assert len(encoder_groups(model)) >= 4  # stem and stages: partial fine-tuning works


def test_hf_hub_timm_repository_and_its_saved_run(hub, tmp_path):
    import timm
    from timm.models import save_for_hf

    donor = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0)
    save_for_hf(
        donor,
        str(hub("medtl-test/tiny-vit")),
        model_args={"img_size": 32, "patch_size": 8, "depth": 2},
        safe_serialization=True,
    )
    model = create_encoder("hf-hub:medtl-test/tiny-vit", num_classes=2)
    assert _same(model, donor.state_dict())
    pre = resolve_preprocessing(model)
    assert pre.input_size == 32
    assert cam_layer_name(model) == "token_grid"  # a ViT: Grad-CAM on the patch-token grid
    x = torch.rand(2, 3, 32, 32)
    seen = []
    model.token_grid.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    model(x)
    assert seen == [(2, donor.embed_dim, 4, 4)]
    _round_trip(model, tmp_path, pre, x)


def test_transformers_vit_in_the_hub_cache_with_its_preprocessing(hub, tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=32
    )
    donor = Dinov2Model(config)
    snap = hub("medtl-test/tiny-rad-dino")
    donor.save_pretrained(str(snap))
    processor = {
        "image_mean": [0.1, 0.2, 0.3],
        "image_std": [0.4, 0.5, 0.6],
        "crop_size": {"height": 32, "width": 32},
        "resample": 3,
    }
    (snap / "preprocessor_config.json").write_text(json.dumps(processor))
    model = create_encoder("transformers:medtl-test/tiny-rad-dino", num_classes=2)
    assert _same(model, donor.state_dict(), prefix="net.")
    pre = resolve_preprocessing(model)
    assert (pre.mean, pre.std, pre.input_size, pre.interpolation) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 32, "bicubic")
    assert cam_layer_name(model) == "token_grid"
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 2)
    assert len(encoder_groups(model)) == 4  # embeddings, each layer, the final norm
    for f in snap.iterdir():  # the run is rebuilt from its own record: the hub cache is not needed
        f.unlink()
    _round_trip(model, tmp_path, pre, x)


def test_open_clip_image_tower_alone(hub, tmp_path):
    from open_clip.model import _build_vision_tower
    from safetensors.torch import save_file

    vision = {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16}
    tower = _build_vision_tower(16, vision)
    snap = hub("medtl-test/tiny-clip")
    text = {"context_length": 8, "vocab_size": 10, "width": 16, "heads": 2, "layers": 1}
    cfg = {
        "model_cfg": {"embed_dim": 16, "vision_cfg": vision, "text_cfg": text},
        "preprocess_cfg": {"mean": [0.3] * 3, "std": [0.2] * 3},
    }
    (snap / "open_clip_config.json").write_text(json.dumps(cfg))
    state = {f"visual.{k}": v.contiguous() for k, v in tower.state_dict().items()}
    state["text.unused"] = torch.zeros(1)  # the text tower's weights are in the file, and left there
    save_file(state, str(snap / "open_clip_model.safetensors"))
    model = create_encoder("open_clip:hf-hub:medtl-test/tiny-clip", num_classes=2)
    assert _same(model, tower.state_dict(), prefix="net.")
    pre = resolve_preprocessing(model)
    assert (pre.mean, pre.std, pre.input_size) == ((0.3,) * 3, (0.2,) * 3, 32)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            model.forward_head(model.forward_features(x), pre_logits=True), tower.eval()(x), atol=1e-5
        )
    assert cam_layer_name(model) == "token_grid"
    _round_trip(model, tmp_path, pre, x)


def test_torchxrayvision_densenet_one_channel_and_its_scaling(tmp_path, monkeypatch):
    import torchxrayvision as xrv

    monkeypatch.setenv("HOME", str(tmp_path))
    cache = tmp_path / ".torchxrayvision" / "models_data"
    cache.mkdir(parents=True)
    donor = xrv.models.DenseNet(weights=None)
    url = xrv.models.model_urls["densenet121-res224-all"]["weights_url"]
    torch.save(donor, cache / url.rsplit("/", 1)[-1])  # the library's own format: a whole pickled model
    model = create_encoder("xrv_densenet121", num_classes=2)
    assert _same(
        model, {k: v for k, v in donor.state_dict().items() if not k.startswith(("classifier", "op_"))}, "net."
    )
    pre = resolve_preprocessing(model)
    assert pre.in_chans == 1 and pre.input_size == 224
    # medtl scales to [0, 1], then (x - mean) / std: xrv's [-1024, 1024]
    assert (0.0 - pre.mean[0]) / pre.std[0] == -1024 and (1.0 - pre.mean[0]) / pre.std[0] == 1024
    assert model(torch.rand(1, 1, 64, 64)).shape == (1, 2)


def test_missing_weights_fail_at_once_with_the_command(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError, match="hf download timm/resnet18.a1_in1k"):
        create_encoder("resnet18")
    with pytest.raises(WeightsError, match=r"curl -L .*resnet18-f37072fd\.pth"):
        create_encoder("tv_resnet18")
    with pytest.raises(WeightsError, match="hf download microsoft/rad-dino"):
        create_encoder("rad_dino")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="curl -L .*densenet121"):
        create_encoder("xrv_densenet121")


def test_open_names_parse_and_refuse_clearly():
    assert get_encoder_spec("timm:convnext_small.dinov2").hub_id == "timm/convnext_small.dinov2"
    assert get_encoder_spec("tv:resnet101").source == "torchvision"
    with pytest.raises(ConfigError, match="SOURCE:REF"):
        get_encoder_spec("nosuch:thing")
    with pytest.raises(ConfigError, match="resnet18"):
        get_encoder_spec("resnet181")  # the nearest registered name
    model = create_encoder("tv:resnet34", pretrained=False, num_classes=2)
    assert model.arch == "resnet34" and len(encoder_groups(model)) == 5


def test_catalog_names_torchvision_files_as_torchvision_does():
    import torchvision

    from medtl.models.catalog import TORCHVISION_FILES

    for arch, filename in TORCHVISION_FILES.items():
        assert torchvision.models.get_model_weights(arch).DEFAULT.url.endswith("/" + filename)


def test_weights_status_without_torch(hub):
    assert weights_status(get_encoder_spec("efficientnet_lite0"))[0]
    assert not weights_status(get_encoder_spec("resnet18"))[0]
    hub("timm/resnet18.a1_in1k").joinpath("model.safetensors").write_bytes(b"x")
    assert weights_status(get_encoder_spec("resnet18"))[0]
    code = "import sys; from medtl.models import list_encoders, catalog, hub; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert {"rad_dino", "biomedclip", "xrv_densenet121", "dinov2_small"} <= set(list_encoders())
