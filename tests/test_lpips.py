"""LPIPS against the lpips package itself (its code and its calibration file), on random VGG weights saved in
torchvision's format; and every way the two weight files can be missing or wrong."""

import hashlib
import pickle
from pathlib import Path

import lpips  # the test extra: the reference implementation
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.vgg import cfgs, make_layers

from diffusion.errors import UsageError
from diffusion.evaluation import lpips as ours


@pytest.fixture(scope="module")
def random_vgg(tmp_path_factory):
    """Random VGG16 weights in torchvision's file format (`features.*` and `classifier.*` keys; a small classifier,
    which LPIPS does not use, keeps the file small)."""
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)
    path = tmp_path_factory.mktemp("hub") / ours.VGG_NAME
    torch.save(state, path)
    return path


@pytest.fixture
def vgg_file(random_vgg, monkeypatch):
    """The random weights, accepted as if they were the ImageNet ones."""
    monkeypatch.setattr(ours, "VGG_SHA256_PREFIX", hashlib.sha256(random_vgg.read_bytes()).hexdigest()[:8])
    return random_vgg


def reference(vgg_file: Path):
    """The lpips package's LPIPS (its calibration weights, its code) with our random VGG weights."""
    net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    slice_of = {
        i: k + 1 for k, tap in enumerate(ours.TAPS) for i in range(tap + 1) if i > (ours.TAPS[k - 1] if k else -1)
    }
    state = {
        f"net.slice{slice_of[int(key.split('.')[1])]}.{key.removeprefix('features.')}": value
        for key, value in torch.load(vgg_file, weights_only=True).items()
        if key.startswith("features.") and int(key.split(".")[1]) <= ours.TAPS[-1]
    }
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("net.")]
    return net


def test_equals_the_lpips_package_with_and_without_resizing(vgg_file):
    torch.manual_seed(1)
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    ref = reference(vgg_file)
    with torch.no_grad():
        plain = ours.LPIPS.from_files(vgg_file, size=None)(a, b)
        resized = ours.LPIPS.from_files(vgg_file, size=64)(a, b)
        up = lambda x: F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)  # noqa: E731
        torch.testing.assert_close(plain, ref(a, b).flatten(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(resized, ref(up(a), up(b)).flatten(), rtol=1e-4, atol=1e-6)
    assert (plain > 0).all() and not torch.allclose(plain, resized)


def test_zero_on_equal_inputs_frozen_and_differentiable_in_its_inputs(vgg_file):
    d = ours.LPIPS.from_files(vgg_file, size=None)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    assert torch.equal(d(x, x.detach()), torch.zeros(2))
    d(x, torch.zeros_like(x)).sum().backward()
    assert x.grad.abs().sum() > 0 and not any(p.requires_grad for p in d.parameters())


def test_missing_files_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.delenv("DIFFUSION_LPIPS_VGG", raising=False)
    with pytest.raises(UsageError, match=r"vgg16-397923af\.pth.*IMAGENET1K_V1.*DIFFUSION_LPIPS_VGG"):
        ours.vgg_path()
    monkeypatch.delenv("DIFFUSION_LPIPS_LIN", raising=False)
    monkeypatch.setattr(ours.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match="pip install lpips.*DIFFUSION_LPIPS_LIN"):
        ours.lin_path()
    monkeypatch.setenv("DIFFUSION_LPIPS_LIN", str(tmp_path / "nope.pth"))
    with pytest.raises(UsageError, match="nope.pth is not a file"):
        ours.lin_path()


def test_the_installed_package_calibration_file_is_found_without_env(monkeypatch):
    monkeypatch.delenv("DIFFUSION_LPIPS_LIN", raising=False)
    assert ours.lin_path() == Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"


def test_a_file_that_is_not_imagenet_vgg16_is_refused_by_its_digest(random_vgg):
    with pytest.raises(UsageError, match="not that file.*IMAGENET1K_V1"):
        ours.LPIPS.from_files(random_vgg)


def test_wrong_shapes_and_code_in_a_file_are_refused(vgg_file, tmp_path):
    bad = tmp_path / "lin.pth"
    torch.save({f"lin{k}.model.1.weight": torch.zeros(1, 8, 1, 1) for k in range(5)}, bad)
    with pytest.raises(UsageError, match="expected LPIPS weights"):
        ours.LPIPS.from_files(vgg_file, bad)

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    planted = tmp_path / "planted.pth"
    planted.write_bytes(pickle.dumps({"lin0.model.1.weight": Payload()}))
    with pytest.raises(UsageError, match="not a readable LPIPS weight file"):
        ours.LPIPS.from_files(vgg_file, planted)
    assert not marker.exists()


def test_consistency_training_with_lpips_trains_the_student_and_keeps_vgg_out_of_the_checkpoint(vgg_file, monkeypatch):
    from diffusion import schedule
    from diffusion.training.consistency import ConsistencyModule
    from diffusion.unet import UNet

    load = ours.LPIPS.from_files.__func__
    monkeypatch.setattr(ours.LPIPS, "from_files", classmethod(lambda cls: load(cls, vgg_file, size=None)))  # fast
    unet = lambda c: UNet(in_channels=c, out_channels=c, resolution=16, ch=16, ch_mult=(1, 1), num_res_blocks=1,  # noqa: E731
                          attn_resolutions=(), dropout=0.0, norm_groups=8)  # fmt: skip
    module = ConsistencyModule(unet(3), schedule.linear(1000), torch.optim.Adam, method="ct", loss="lpips",
                               grid="karras")  # fmt: skip
    loss = module.training_loss(torch.rand(2, 3, 16, 16) * 2 - 1, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())
    assert not [k for k in module.state_dict() if "features" in k or "lins" in k]  # 59 MB of frozen VGG: not saved

    with pytest.raises(UsageError, match="RGB images.*1 channels"):
        ConsistencyModule(unet(1), schedule.linear(1000), torch.optim.Adam, method="ct", loss="lpips")
