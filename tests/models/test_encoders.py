import pytest
import torch

from medtl.errors import ConfigError
from medtl.models import WeightsError, create_encoder, resolve_preprocessing


@pytest.fixture(scope="module")
def imagenet_model():
    return create_encoder("efficientnet_lite0", pretrained=True, num_classes=1000).eval()


def test_offline_weights_are_the_real_imagenet_ones(imagenet_model):
    """A photograph of a cat (scikit-image's 'chelsea') must come out as a cat class."""
    from skimage import data
    from torchvision.models import ResNet18_Weights

    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    pre = resolve_preprocessing(imagenet_model)
    img = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float()[None] / 255
    x = torch.nn.functional.interpolate(img, size=(pre.input_size,) * 2, mode="bilinear", antialias=True)
    x = (x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.no_grad():
        top = imagenet_model(x).softmax(-1)[0].argmax().item()
    assert categories[top] == "Egyptian cat"


def test_preprocessing_record_matches_the_weights(imagenet_model):
    pre = resolve_preprocessing(imagenet_model)
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5) and pre.input_size == 224
    assert "sha256 579344248a93" in imagenet_model.pretrained_cfg["weights_source"]


def test_random_init_differs_and_single_channel_folds_first_conv(imagenet_model):
    scratch = create_encoder("efficientnet_lite0", pretrained=False)
    assert not torch.equal(scratch.conv_stem.weight, imagenet_model.conv_stem.weight)
    grey = create_encoder("efficientnet_lite0", pretrained=True, in_chans=1, num_classes=2)
    assert grey.conv_stem.weight.shape[1] == 1
    torch.testing.assert_close(grey.conv_stem.weight, imagenet_model.conv_stem.weight.sum(1, keepdim=True))
    assert grey(torch.zeros(1, 1, 64, 64)).shape == (1, 2)
    assert resolve_preprocessing(grey).in_chans == 1


def test_unknown_encoder_did_you_mean():
    with pytest.raises(ConfigError, match="did you mean 'efficientnet_lite"):
        create_encoder("efficientnet_lite", pretrained=False)


def test_tampered_weights_refused(monkeypatch):
    import medtl.models.catalog as catalog

    monkeypatch.setitem(catalog.KNOWN_SHA256, "efficientnet-lite0-57934424.pth", "0" * 64)
    with pytest.raises(WeightsError, match="sha256"):
        create_encoder("efficientnet_lite0", pretrained=True)


def test_encoder_without_offline_weights_names_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine with no network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match="weights_file"):
        create_encoder("resnet18", pretrained=True)
    # a local weight file in the timm layout loads strictly
    donor = create_encoder("resnet18", pretrained=False, num_classes=1000)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    model = create_encoder("resnet18", pretrained=True, weights_file=tmp_path / "r18.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), donor.state_dict().values()))
    headless = {k: v.contiguous() for k, v in donor.state_dict().items() if not k.startswith("fc.")}
    save_file(headless, str(tmp_path / "enc.safetensors"))  # an encoder-only file loads too
    model = create_encoder("resnet18", pretrained=True, weights_file=tmp_path / "enc.safetensors", num_classes=2)
    assert torch.equal(model.conv1.weight, donor.conv1.weight)
    bad = {k: v for k, v in donor.state_dict().items() if k != "layer1.0.conv1.weight"}
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match="does not fit"):
        create_encoder("resnet18", pretrained=True, weights_file=tmp_path / "bad.safetensors")
