"""CIFAR-10 from the real test-set tar: disjoint per-class splits that cover the data, labels from the class
folders in CIFAR order, model-sized transforms; and real DeiT-Tiny weights loaded at 96 px with 10 classes."""
import compress  # noqa: F401  (first: torchvision guard before timm)

import tarfile

import pytest
import torch

from compress.data.cifar10 import CLASSES, Cifar10, read_images, split_indices
from compress.errors import CompressError

TAR = "cifar10-test/cifar10_test_jpg.tar"


def test_splits_are_disjoint_cover_the_data_and_are_labelled_right(require_asset):
    tar = require_asset(TAR)
    items = read_images(tar)
    assert len(items) == 10000
    assert CLASSES[0] == "airplane" and CLASSES[-1] == "truck" and len(CLASSES) == 10
    for name, image, label in items[::97]:
        assert name.split("/")[-2] == CLASSES[label] and image.size == (32, 32)
    labels = [y for _, _, y in items]
    split = split_indices(labels, 200, seed=0)
    train, val = set(split["train"]), set(split["val"])
    assert not train & val and train | val == set(range(10000))
    for c in range(10):
        assert sum(labels[i] == c for i in val) == 200 and sum(labels[i] == c for i in train) == 800
    assert split_indices(labels, 200, seed=0) == split  # deterministic
    assert split_indices(labels, 200, seed=1)["val"] != split["val"]


def test_datasets_from_tar_and_folder_with_model_sized_transforms(require_asset, tmp_path):
    import timm

    tar = require_asset(TAR)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10)
    source = Cifar10(tar, Cifar10.Config(val_per_class=100))
    val = source.dataset("val", model)
    train = source.dataset("train", model, train=True)
    assert len(val) == 1000 and len(train) == 9000 and source.input_size(model) == (3, 64, 64)
    x, y = val[0]
    assert x.shape == (3, 64, 64) and y == 0 and val[len(val) - 1][1] == 9
    assert torch.equal(val[3][0], val[3][0]) and train[0][0].shape == (3, 64, 64)
    # a folder with test/<class>/*.jpg works the same (two classes extracted here)
    with tarfile.open(tar) as t:
        members = [m for m in t.getmembers() if m.isfile() and m.name.split("/")[-2] in ("cat", "ship")][::100]
        t.extractall(tmp_path, members=members, filter="data")
    folder = Cifar10(tmp_path, Cifar10.Config(val_per_class=3))
    ds = folder.dataset("val", model)
    assert sorted({ds[i][1] for i in range(len(ds))}) == [CLASSES.index("cat"), CLASSES.index("ship")]
    with pytest.raises(CompressError, match="data.root"):
        Cifar10(None, Cifar10.Config()).dataset("val", model)
    with pytest.raises(CompressError, match="val_per_class"):
        Cifar10(tmp_path, Cifar10.Config(val_per_class=10)).dataset("val", model)


def test_real_deit_tiny_weights_at_96_px_with_a_new_head(require_asset, tmp_path):
    from compress.models.build import _read_state_dict, build_model
    from compress.recipe import ModelConfig

    ckpt = require_asset("deit_tiny/deit_tiny_patch16_224.pth")
    model = build_model(ModelConfig(name="deit_tiny_patch16_224", checkpoint=ckpt,
                                    kwargs={"img_size": 96, "num_classes": 10})).eval()
    state = _read_state_dict(ckpt)
    assert model.pos_embed.shape == (1, 1 + 6 * 6, 192)  # resampled from 14x14
    assert torch.equal(model.pos_embed[:, 0], state["pos_embed"][:, 0])  # the class token's embedding is kept
    assert torch.equal(model.blocks[5].mlp.fc2.weight, state["blocks.5.mlp.fc2.weight"])
    assert model.head.weight.shape == (10, 192)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 96, 96))).all()
    with pytest.raises(CompressError, match="shape mismatches"):  # other mismatches still fail clearly
        build_model(ModelConfig(name="deit_tiny_patch16_224", checkpoint=ckpt, kwargs={"embed_dim": 96}))
    ten = dict(state, **{"head.weight": state["head.weight"][:10], "head.bias": state["head.bias"][:10]})
    torch.save(ten, tmp_path / "ten_classes.pth")
    with pytest.raises(CompressError, match="head.weight"):  # num_classes not changed by the user: still an error
        build_model(ModelConfig(name="deit_tiny_patch16_224", checkpoint=tmp_path / "ten_classes.pth",
                                kwargs={"img_size": 96}))
