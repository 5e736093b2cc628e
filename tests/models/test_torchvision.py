"""torchvision's families in the encoder registry: torchvision's own weight files load as they are (the
same outputs as torchvision's model), layer groups, training, saving and Grad-CAM work as for timm's."""

import dataclasses

import numpy as np
import pytest
import torch
import torchvision

from medtl.errors import ConfigError, WeightsError
from medtl.explain import compute_saliency
from medtl.models import create_encoder, encoder_groups, list_encoders, resolve_preprocessing
from medtl.models.checkpoint import load_model, save_model
from medtl.models.groups import set_trainable

TV = ["tv_resnet18", "tv_resnet50", "tv_densenet121", "tv_efficientnet_b0", "tv_convnext_tiny", "tv_vit_b_16"]


def test_every_family_is_registered_with_stages_as_layer_groups():
    assert set(TV) <= set(list_encoders())
    for name, stages in [("tv_resnet18", 5), ("tv_efficientnet_b0", 9), ("tv_convnext_tiny", 6), ("tv_vit_b_16", 14)]:
        model = create_encoder(name, pretrained=False, num_classes=2)
        groups = encoder_groups(model)
        assert len(groups) == stages, name
        set_trainable(model, 1)  # the top group and the head train, nothing else
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in groups[-1]} | {id(p) for p in model.get_classifier().parameters()}


@pytest.mark.parametrize(
    "name, arch",
    [("tv_resnet18", "resnet18"), ("tv_efficientnet_b0", "efficientnet_b0"), ("tv_convnext_tiny", "convnext_tiny")],
)
def test_a_torchvision_weight_file_gives_torchvision_s_outputs(name, arch, tmp_path):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(weights=None).eval()
    path = tmp_path / f"{arch}.pth"
    torch.save(reference.state_dict(), path)
    model = create_encoder(name, pretrained=True, weights_file=path, num_classes=1000).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
    assert model.pretrained_cfg["weights_source"].startswith(f"{arch}.pth (sha256 ")
    # an encoder-only file (no ImageNet head) loads; the new head is medtl's
    body = {k: v for k, v in reference.state_dict().items() if not k.startswith(model.head_path + ".")}
    assert len(body) == len(reference.state_dict()) - 2
    torch.save(body, tmp_path / "body.pth")
    two = create_encoder(name, weights_file=tmp_path / "body.pth", num_classes=2).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            two.forward_head(two.forward_features(x), pre_logits=True),
            model.forward_head(model.forward_features(x), pre_logits=True),
        )


def test_a_file_of_another_network_and_a_missing_download_are_refused(tmp_path, monkeypatch):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match="does not fit tv_resnet50"):
        create_encoder("tv_resnet50", weights_file=tmp_path / "r18.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # no cached file; no network here
    monkeypatch.setattr(
        torch.hub, "load_state_dict_from_url", lambda *a, **k: (_ for _ in ()).throw(OSError("no network"))
    )
    with pytest.raises(WeightsError, match=r"download.pytorch.org/models/resnet18-.*weights_file"):
        create_encoder("tv_resnet18")


def test_vit_reads_its_own_size_only():
    model = create_encoder("tv_vit_b_16", pretrained=False, num_classes=2)
    assert resolve_preprocessing(model).input_size == 224
    with pytest.raises(ConfigError, match="reads 224 px only"):
        resolve_preprocessing(model, 64)


@pytest.mark.parametrize("name, size", [("tv_resnet18", 64), ("tv_densenet121", 128), ("tv_vit_b_16", 224)])
def test_grad_cam_maps_the_input_plane(name, size):
    torch.manual_seed(0)
    model = create_encoder(name, pretrained=False, num_classes=2).eval()
    x = torch.zeros(1, 3, size, size)
    x[..., : size // 2, : size // 2] = 2.0  # one bright quadrant
    cam = compute_saliency(model, x, class_idx=0, method="gradcam")
    assert cam.shape == (size, size) and np.isfinite(cam).all() and cam.max() == pytest.approx(1.0)


def test_a_torchvision_encoder_trains_saves_and_reloads(tmp_path, small_manifest):
    from medtl.train import fit, prepare_data
    from tests.conftest import tiny_config

    cfg = tiny_config(small_manifest, strategy="partial", unfreeze_groups=1, frozen_epochs=0)
    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, name="tv_resnet18", pretrained=False))
    torch.manual_seed(0)
    model = create_encoder("tv_resnet18", pretrained=False, num_classes=2)
    pre = resolve_preprocessing(model, 64)
    train, val, _ = prepare_data(cfg.data, pre, 0).datasets(cfg.data, pre)
    stem = model.net.conv1.weight.detach().clone()
    top = model.net.layer4[1].conv2.weight.detach().clone()
    fit(model, train, val, cfg.train, num_classes=2)
    assert torch.equal(stem, model.net.conv1.weight.cpu()) and not torch.equal(
        top, model.net.layer4[1].conv2.weight.cpu()
    )
    model.cpu()
    save_model(model, tmp_path / "m.safetensors", "tv_resnet18", ["a", "b"], pre)
    loaded, _ = load_model(tmp_path / "m.safetensors")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
