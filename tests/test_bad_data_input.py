"""A corpus of malformed data folders, checkpoints and exports, each tried as a new user would, through the
real CLI (``compress.cli.main``) or ``compress.load``: exit code 2, exactly one stderr line
``compress <cmd>: error: ...`` naming the file or key and the problem, nothing written, nothing of the
user's touched, no pickle executed. Plus the one thing that is not an error: corrupt images among good
ones are skipped and counted (``compress.data.base``)."""
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import pytest
import timm
import torch
from PIL import Image

import compress
from compress.cli import main
from compress.errors import CompressError
from compress.export import save
from compress.models.build import model_spec

from conftest import QUICKSTART

WNIDS = ("n01440764", "n01443537", "n01484850")  # the first ImageNet-1k classes


# -- inputs ------------------------------------------------------------------------------------------------


def image_bytes(kind: str, seed: int) -> bytes:
    """A 40 px noise image as PNG/JPEG bytes, or a broken one: a JPEG cut in half, or random bytes."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randint(0, 256, (500,), generator=g, dtype=torch.uint8).numpy().tobytes()
    pixels = torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG" if kind == "png" else "JPEG")
    data = buf.getvalue()
    return data[: len(data) // 2] if kind == "truncated" else data


def image_folder(root: Path, classes: Dict[str, Sequence[str]], split: str = "val") -> Path:
    """``root/<split>/<class>/<i>.JPEG`` holding images of the given kinds (png/jpg/truncated/random)."""
    for k, (c, kinds) in enumerate(classes.items()):
        d = root / split / c
        d.mkdir(parents=True)
        for i, kind in enumerate(kinds):
            (d / f"{i}.JPEG").write_bytes(image_bytes(kind, seed=100 * k + i))
    return root


GOOD = {WNIDS[0]: ["png", "jpg"], WNIDS[1]: ["jpg", "png"]}


def tiny_vit(num_classes: int, depth: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth,
                             num_classes=num_classes).eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Dict[int, Path]:
    """Tiny exports (ViT, 32 px, 2 blocks) with 10 and with 1000 classes, made once per module."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for classes in (10, 1000):
        kwargs = dict(img_size=32, patch_size=8, depth=2, num_classes=classes)
        out[classes] = save(tiny_vit(classes), root / f"vit{classes}", model_spec("vit_tiny_patch16_224", kwargs),
                            input_size=(3, 32, 32))
    return out


def copy_export(exports, tmp: Path, classes: int = 10) -> Path:
    return Path(shutil.copytree(exports[classes], tmp / "export"))


def edit_manifest(edit: Callable[[dict], object]):
    """An input maker: a copy of the 10-class export whose compress.json went through ``edit``."""
    def make(tmp, exports):
        d = copy_export(exports, tmp)
        manifest = json.loads((d / "compress.json").read_text())
        replaced = edit(manifest)
        (d / "compress.json").write_text(json.dumps(manifest if replaced is None else replaced))
        return bench(d)
    return make


def edit_weights(edit: Callable[[bytes], bytes]):
    def make(tmp, exports):
        d = copy_export(exports, tmp)
        (d / "model.safetensors").write_bytes(edit((d / "model.safetensors").read_bytes()))
        return bench(d)
    return make


def bench(export: Path) -> List[str]:
    return ["bench", "--round-seconds", "0", "--checkpoint", str(export), "--batch-sizes", "1", "--repeats", "1", "--device", "cpu"]


def evaluate(export: Path, data: str) -> List[str]:
    return ["eval", "--checkpoint", str(export), "--data", data, "--workers", "0", "--device", "cpu"]


def eval_folder(classes: Dict[str, Sequence[str]], split: str = "val"):
    """An input maker: ``compress eval`` of the 1000-class export on an ImageNet-layout folder."""
    def make(tmp, exports):
        return evaluate(exports[1000], f"imagenet:{image_folder(tmp / 'imagenet', classes, split)}")
    return make


def fit(*overrides: str) -> List[str]:
    return ["fit", "--recipe", str(QUICKSTART), *(a for o in overrides for a in ("--set", o))]


def fit_checkpoint(write: Callable[[Path], None], name: str = "weights.pth"):
    """An input maker: ``compress fit`` of the quick-start with ``model.checkpoint`` a file ``write`` makes."""
    def make(tmp, exports):
        path = tmp / name
        write(path)
        return fit(f"model.checkpoint={path}")
    return make


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``: the file must be refused before that."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


# -- the corpus ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    make: Callable  # (tmp_path, exports) -> CLI argv, or ("load", path) for the API
    expect: Sequence[str]  # fragments of the message; "{tmp}" is the case's folder


def cut_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def set_key(path: str, value):
    """An edit of the manifest: set (or with ``...`` delete) the dotted key ``path``."""
    def edit(m):
        *parents, last = path.split(".")
        for p in parents:
            m = m[int(p)] if isinstance(m, list) else m[p]
        if value is ...:
            del m[last]
        else:
            m[last] = value
    return edit


def other_model_weights(tmp, exports):
    from safetensors.torch import save_file

    d = copy_export(exports, tmp)
    save_file(tiny_vit(10, depth=3).state_dict(), str(d / "model.safetensors"))
    return bench(d)


def without(name: str):
    def make(tmp, exports):
        (copy_export(exports, tmp) / name).unlink()
        return bench(tmp / "export")
    return make


def manifest_text(data: bytes):
    def make(tmp, exports):
        (copy_export(exports, tmp) / "compress.json").write_bytes(data)
        return bench(tmp / "export")
    return make


def load_api(make_export):
    """The same bad export through ``compress.load`` instead of the CLI."""
    def make(tmp, exports):
        make_export(tmp, exports)
        return ("load", tmp / "export")
    return make


def a_file(tmp: Path, name: str = "data.txt", data: bytes = b"x") -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def loose_images(tmp, exports):
    (tmp / "in" / "val").mkdir(parents=True)
    (tmp / "in" / "val" / "a.png").write_bytes(image_bytes("png", 0))
    return evaluate(exports[1000], f"imagenet:{tmp / 'in'}")


def no_class_folders(tmp, exports):
    (tmp / "in" / "val").mkdir(parents=True)
    return evaluate(exports[1000], f"imagenet:{tmp / 'in'}")


def truncated_pth(path: Path) -> None:
    torch.save(tiny_vit(6).state_dict(), path)
    path.write_bytes(cut_half(path.read_bytes()))


def fit_imagenet(root: Path) -> List[str]:
    return fit("data.kind=imagenet", "data.params={}", f"data.root={root}", "model.kwargs.num_classes=1000")


TOKEN_PRUNER_ON_A_CNN = dict(model={"builder": "timm", "name": "resnet18", "kwargs": {"num_classes": 10}},
                             pruners=[{"spec": {"name": "zero_tprune"}, "kind": "token", "edits": {}}])

CASES = [
    # exports: the weights file
    Case("export-weights-truncated", edit_weights(cut_half),
         ["{tmp}/export/model.safetensors", "not a readable safetensors"]),
    Case("export-weights-random-bytes", edit_weights(lambda b: image_bytes("random", 1)),
         ["{tmp}/export/model.safetensors", "not a readable safetensors"]),
    Case("export-weights-empty", edit_weights(lambda b: b""), ["model.safetensors", "not a readable safetensors"]),
    Case("export-weights-of-another-model", other_model_weights,
         ["{tmp}/export/model.safetensors", "does not fit", "unexpected keys (e.g. blocks.2."]),
    Case("export-without-weights", without("model.safetensors"), ["{tmp}/export", "no model.safetensors"]),
    Case("export-without-manifest", without("compress.json"), ["{tmp}/export", "no compress.json"]),
    Case("checkpoint-is-a-file", lambda tmp, ex: bench(copy_export(ex, tmp) / "model.safetensors"),
         ["{tmp}/export/model.safetensors", "is a file, expected an export folder"]),
    Case("checkpoint-missing", lambda tmp, ex: bench(tmp / "nope"), ["{tmp}/nope", "not found"]),
    # exports: compress.json
    Case("manifest-is-a-list", edit_manifest(lambda m: [m]),
         ["{tmp}/export/compress.json", "JSON list, expected an object"]),
    Case("manifest-is-a-string", edit_manifest(lambda m: "model"), ["compress.json", "JSON str, expected an object"]),
    Case("manifest-not-json", manifest_text(b"{model: 1"), ["{tmp}/export/compress.json", "not valid JSON", "line 1"]),
    Case("manifest-binary", manifest_text(b"\xff\xfe\x00\x81"), ["{tmp}/export/compress.json", "cannot read"]),
    Case("manifest-nested-too-deeply", manifest_text(b"[" * 100_000 + b"]" * 100_000),
         ["{tmp}/export/compress.json", "nested too deeply"]),
    Case("manifest-nested-deep-inside", edit_manifest(set_key("model.kwargs", {"depth": json.loads("[" * 900 + "]" * 900)})),
         ["compress.json", "model.kwargs"]),
    Case("manifest-without-format", edit_manifest(set_key("format", ...)), ["compress.json", "format None"]),
    Case("manifest-without-model", edit_manifest(set_key("model", ...)),
         ["compress.json", "model: required key is missing"]),
    Case("manifest-without-model-name", edit_manifest(set_key("model.name", ...)),
         ["compress.json", "model.name: required key is missing"]),
    Case("manifest-kwargs-not-a-mapping", edit_manifest(set_key("model.kwargs", [1, 2])),
         ["compress.json", "model.kwargs"]),
    Case("manifest-without-pruners", edit_manifest(set_key("pruners", ...)),
         ["compress.json", "pruners: required key is missing"]),
    Case("manifest-pruner-without-spec", edit_manifest(set_key("pruners", [{"kind": "token"}])),
         ["compress.json", "pruners[0].spec: required key is missing"]),
    Case("manifest-unknown-pruner", edit_manifest(set_key("pruners", [{"spec": {"name": "magic"}, "kind": "token"}])),
         ["compress.json", "pruners[0].spec.name: unknown pruner 'magic'", "zero_tprune"]),
    Case("manifest-pruner-bad-parameter",
         edit_manifest(set_key("pruners", [{"spec": {"name": "zero_tprune", "wpr_iters": "x"}}])),
         ["compress.json", "pruners[0].spec.wpr_iters"]),
    Case("manifest-structured-edits-malformed",
         edit_manifest(set_key("pruners", [{"spec": {"name": "heads"}, "kind": "structured", "edits": {"widths": 1}}])),
         ["compress.json", "pruners[0].edits: unknown entries ['widths']"]),
    Case("manifest-unknown-model", edit_manifest(set_key("model.name", "no_such_net")),
         ["compress.json", "model.name: unknown model 'no_such_net'"]),
    Case("manifest-negative-embed-dim", edit_manifest(set_key("model.kwargs.embed_dim", -5)),
         ["{tmp}/export/compress.json", "model.kwargs: vit_tiny_patch16_224 cannot be built", "-5"]),
    Case("manifest-unknown-kwarg", edit_manifest(set_key("model.kwargs.colour", "red")),
         ["compress.json", "model.kwargs", "colour"]),
    Case("manifest-input-size-two-ints", edit_manifest(set_key("input_size", [3, 32])), ["compress.json", "input_size"]),
    Case("manifest-input-size-zero", edit_manifest(set_key("input_size", [3, 0, 32])),
         ["compress.json", "input_size[1]"]),
    Case("manifest-input-size-text", edit_manifest(set_key("input_size", "32")), ["compress.json", "input_size"]),
    Case("manifest-token-pruner-on-a-cnn", edit_manifest(lambda m: m.update(TOKEN_PRUNER_ON_A_CNN)),
         ["compress.json", "pruner 'zero_tprune' works on timm vision transformers", "not on ResNet"]),
    Case("load-api-truncated-weights", load_api(edit_weights(cut_half)),
         ["checkpoint: {tmp}/export/model.safetensors", "not a readable safetensors"]),
    Case("load-api-manifest-without-model", load_api(edit_manifest(set_key("model", ...))),
         ["compress.json", "model: required key"]),
    # eval: the data
    Case("eval-class-count-differs", lambda tmp, ex: evaluate(ex[10], f"imagenet:{image_folder(tmp / 'in', GOOD)}"),
         ["--data", "vit10 on imagenet", "model has 10 classes but the data has 1000"]),
    Case("eval-data-root-is-a-file", lambda tmp, ex: evaluate(ex[1000], f"imagenet:{a_file(tmp)}"),
         ["data.root", "{tmp}/data.txt is a file, expected a folder"]),
    Case("eval-data-root-missing", lambda tmp, ex: evaluate(ex[1000], f"imagenet:{tmp / 'none'}"),
         ["data.root", "folder not found", "{tmp}/none"]),
    Case("eval-split-missing", eval_folder(GOOD, split="train"), ["data.root", "no 'val/' folder"]),
    Case("eval-data-root-is-the-split", lambda tmp, ex: evaluate(ex[1000], f"imagenet:{image_folder(tmp / 'in', GOOD) / 'val'}"),
         ["data.root: {tmp}/in/val has no 'val/' folder", "data.root is the folder above it, {tmp}/in"]),
    Case("eval-split-without-class-folders", no_class_folders, ["data.root", "{tmp}/in/val holds no class folders"]),
    Case("eval-split-with-loose-images", loose_images, ["{tmp}/in/val holds no class folders", "1 images directly"]),
    Case("eval-class-folders-without-images", eval_folder({WNIDS[0]: [], WNIDS[1]: []}),
         ["data.root", "none of the 2 class folders of {tmp}/imagenet/val holds images"]),
    Case("eval-empty-class-and-corrupt-rest", eval_folder({WNIDS[0]: [], WNIDS[1]: ["random"]}),
         ["data.root", "none of the 1 images tried could be read"]),  # the error alone: no warning line first
    Case("eval-class-folders-not-wnids", eval_folder({"cats": ["png"], "dogs": ["png"]}),
         ["not ImageNet-1k wnids", "'cats'"]),
    Case("eval-every-image-corrupt", eval_folder({WNIDS[0]: ["random", "truncated"], WNIDS[1]: ["random"]}),
         ["data.root", "none of the 3 images tried could be read", "{tmp}/imagenet/val/"]),
    Case("eval-cifar10-root-not-a-tar", lambda tmp, ex: evaluate(ex[10], f"cifar10:{a_file(tmp, 'c.tar')}"),
         ["data.root", "{tmp}/c.tar is a file but not a tar archive"]),
    Case("eval-cifar10-only-corrupt-images", lambda tmp, ex: evaluate(
        ex[10], f"cifar10:{image_folder(tmp / 'c', {'cat': ['random'], 'dog': ['truncated']}, split='test')}"),
        ["data.root", "holds no readable test/<class>/*.jpg"]),
    # fit: model.checkpoint, model.kwargs, data.root
    Case("fit-checkpoint-pickled-module", fit_checkpoint(lambda p: torch.save(torch.nn.Linear(2, 2), p)),
         ["model.checkpoint", "{tmp}/weights.pth holds pickled Python objects", "not unpickled"]),
    Case("fit-checkpoint-pickle-payload", fit_checkpoint(lambda p: torch.save({"w": Payload(str(p.parent / "pwned"))}, p)),
         ["model.checkpoint", "{tmp}/weights.pth holds pickled Python objects"]),
    Case("fit-checkpoint-lightning-like", fit_checkpoint(lambda p: torch.save(
        {"state_dict": tiny_vit(6).state_dict(), "epoch": 1, "hyper_parameters": {"root": Path("/data")}}, p), "last.ckpt"),
        ["model.checkpoint", "{tmp}/last.ckpt holds pickled Python objects"]),
    Case("fit-checkpoint-a-tensor", fit_checkpoint(lambda p: torch.save(torch.zeros(3), p)),
         ["model.checkpoint", "{tmp}/weights.pth holds a Tensor, expected a state_dict of tensors"]),
    Case("fit-checkpoint-text", fit_checkpoint(lambda p: p.write_text("this is not a checkpoint")),
         ["model.checkpoint", "cannot read {tmp}/weights.pth as a torch checkpoint"]),
    Case("fit-checkpoint-truncated-pth", fit_checkpoint(truncated_pth),
         ["model.checkpoint", "cannot read {tmp}/weights.pth as a torch checkpoint"]),
    Case("fit-checkpoint-random-safetensors",
         fit_checkpoint(lambda p: p.write_bytes(image_bytes("random", 2)), "w.safetensors"),
         ["model.checkpoint", "{tmp}/w.safetensors is not a readable safetensors file"]),
    Case("fit-checkpoint-an-export-of-another-model", lambda tmp, ex: fit(f"model.checkpoint={ex[10] / 'model.safetensors'}"),
         ["model.checkpoint", "does not fit"]),
    Case("fit-checkpoint-non-tensor-dict", fit_checkpoint(lambda p: torch.save({"lr": 0.1, "epoch": 3}, p)),
         ["model.checkpoint", "{tmp}/weights.pth holds no state_dict of tensors", "'lr' is a float"]),
    Case("fit-checkpoint-is-a-folder", lambda tmp, ex: fit(f"model.checkpoint={tmp}"),
         ["model.checkpoint", "{tmp} is a folder, expected a .pth or .safetensors file"]),
    Case("fit-negative-embed-dim", lambda tmp, ex: fit("model.kwargs.embed_dim=-5"),
         ["model.kwargs: quickstart_vit cannot be built", "-5"]),
    Case("fit-token-pruner-on-a-cnn", lambda tmp, ex: fit("model.name=resnet18", "model.kwargs={num_classes: 6}"),
         ["stages[1].pruner: pruner 'zero_tprune' works on timm vision transformers", "not on ResNet"]),
    Case("fit-data-root-is-a-file", lambda tmp, ex: fit_imagenet(a_file(tmp)),
         ["data.root: {tmp}/data.txt is a file, expected a folder"]),
    Case("fit-train-split-corrupt-only",
         lambda tmp, ex: fit_imagenet(image_folder(tmp / "in", {WNIDS[0]: ["random"]}, "train")),
         ["data.root", "none of the 1 images tried could be read", "{tmp}/in/train/n01440764/0.JPEG"]),
]


@pytest.fixture
def warnings_seen(caplog):
    """The ``compress`` logger's records (the CLI stops them propagating to the root logger caplog watches)."""
    logger = logging.getLogger("compress")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def said(caplog, *fragments: str) -> bool:
    """Whether one warning of the test held all ``fragments``."""
    return any(all(f in r.getMessage() for f in fragments) for r in caplog.records)


def snapshot(root: Path) -> Dict[str, tuple]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, exports, capsys):
    tmp = tmp_path / "case"
    tmp.mkdir()
    argv = case.make(tmp, exports)
    before, before_exports = snapshot(tmp_path), {k: snapshot(p) for k, p in exports.items()}
    expect = [e.format(tmp=tmp) for e in case.expect]
    if argv[0] == "load":
        with pytest.raises(CompressError) as err:
            compress.load(argv[1])
        message = str(err.value)
        assert "\n" not in message
    else:
        out, json_out = tmp_path / "runs", tmp_path / "out.json"
        extra = ["--out", str(out)] if argv[0] == "fit" else ["--json", str(json_out)]
        code = main(argv[:1] + extra + argv[1:])
        captured = capsys.readouterr()
        assert code == 2, captured
        lines = captured.err.splitlines()
        assert len(lines) == 1, captured.err
        assert lines[0].startswith(f"compress {argv[0]}: error: "), lines[0]
        message = lines[0]
        assert not out.exists() and not json_out.exists()
    for fragment in expect:
        assert fragment in message, message
    assert snapshot(tmp_path) == before  # nothing written, nothing of the user's touched
    assert {k: snapshot(p) for k, p in exports.items()} == before_exports
    assert not (tmp / "pwned").exists()  # no pickle payload ran


def test_unreadable_folder_is_named(tmp_path, exports, capsys):
    """A class folder without read permission fails before evaluation, naming it (the check uses
    ``os.access``, which root passes whatever the mode: skipped there)."""
    if os.geteuid() == 0:
        pytest.skip("running as root: a chmod 000 folder stays readable, so there is nothing to detect")
    root = image_folder(tmp_path / "in", GOOD)
    locked = root / "val" / WNIDS[1]
    locked.chmod(0)
    try:
        code = main(evaluate(exports[1000], f"imagenet:{root}"))
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and f"cannot read folder {locked} (permission denied)" in err[0], err


# -- corrupt images among good ones: skipped and counted ------------------------------------------------------


def test_dataset_skips_corrupt_images_across_workers(tmp_path):
    """Through the dataset API and DataLoader workers: every item comes back, a corrupt file's place is
    taken by the next readable image, and the main process learns the count and the first bad file."""
    from compress.data.base import unreadable
    from compress.data.imagenet import ImageNet

    root = image_folder(tmp_path / "in", {WNIDS[0]: ["png", "truncated", "jpg"], WNIDS[1]: ["jpg", "png", "random"]})
    ds = ImageNet(root).dataset("val", tiny_vit(1000))
    assert len(ds) == 6 and unreadable(ds) == {}  # nothing decoded beyond the probe yet
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    x, y = (torch.cat(t) for t in zip(*loader))
    assert x.shape == (6, 3, 32, 32)
    found = unreadable(ds)
    assert found["unreadable_images"] == 2
    assert found["first_unreadable"] == str(root / "val" / WNIDS[0] / "1.JPEG")
    assert "truncated" in found["unreadable_reason"]
    # item 1 (truncated) became item 2, item 5 (random bytes, the last) wrapped round to item 0
    assert torch.equal(x[1], x[2]) and torch.equal(x[5], x[0])
    assert y.tolist() == [0, 0, 0, 1, 1, 0]  # wnid n01440764 is class 0, n01443537 class 1


def test_eval_skips_a_corrupt_image_and_reports_it(tmp_path, exports, warnings_seen):
    """``compress eval`` on a folder with a corrupt JPEG among good ones: exit 0, the count and the file in the
    results and a warning, and metrics over good images only: each good image is filed under the class the
    model predicts for it, so top-1 is 100 % unless a slot is scored on something else (the bad file's
    bytes, a blank, a wrong label)."""
    from timm.data import ImageNetInfo

    from compress.data.imagenet import ImageNet

    staging = image_folder(tmp_path / "staging", {WNIDS[0]: ["png", "jpg", "png", "jpg", "png"]})
    model = compress.load(exports[1000])
    ds = ImageNet(staging).dataset("val", model)
    with torch.inference_mode():
        predicted = model(torch.stack([x for x, _ in ds])).argmax(1).tolist()
    root = tmp_path / "in"
    names = ImageNetInfo().label_names()
    for i, ((path, _), c) in enumerate(zip(ds.samples, predicted)):
        (root / "val" / names[c]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / "val" / names[c] / f"{i}.JPEG")
    bad = root / "val" / names[predicted[0]] / "bad.JPEG"
    bad.write_bytes(image_bytes("truncated", 7))

    out = tmp_path / "results.json"
    assert main(evaluate(exports[1000], f"imagenet:{root}") + ["--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["unreadable_images"] == 1 and results["first_unreadable"] == str(bad)
    assert "truncated" in results["unreadable_reason"]
    assert results["images"] == 6 and results["top1"] == 100.0
    assert said(warnings_seen, "skipped 1 unreadable image", str(bad))


def test_fit_trains_through_corrupt_images(tmp_path, warnings_seen):
    """``compress fit`` on folders with a corrupt image in each split trains, evaluates and exports (it
    crashed mid-training and left files before), and warns naming the bad files."""
    from conftest import only_run

    root = tmp_path / "in"
    image_folder(root, {WNIDS[0]: ["png", "random", "jpg"], WNIDS[1]: ["jpg", "png"]}, "train")
    image_folder(root, {WNIDS[0]: ["jpg", "png"], WNIDS[1]: ["truncated", "png"]}, "val")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"""
name: tiny
model: {{name: vit_tiny_patch16_224, kwargs: {{img_size: 32, patch_size: 8, depth: 2, num_classes: 1000}}}}
data: {{kind: imagenet, root: {root}, batch_size: 2, num_workers: 0}}
stages: [{{kind: finetune, max_steps: 3}}]
trainer: {{accelerator: cpu, devices: 1, log_every_n_steps: 1}}
evaluate: {{bench: false}}
""")
    assert main(["fit", "--recipe", str(recipe), "--out", str(tmp_path / "runs")]) == 0
    run = only_run(tmp_path / "runs")
    assert compress.load(run / "export") is not None
    assert said(warnings_seen, "cannot read image", str(root / "train" / WNIDS[0] / "1.JPEG"))
    assert said(warnings_seen, "cannot read image", str(root / "val" / WNIDS[1] / "0.JPEG"))


def test_empty_class_folder_beside_others_is_skipped_with_a_warning(tmp_path, warnings_seen):
    from compress.data.imagenet import ImageNet

    root = image_folder(tmp_path / "in", {WNIDS[0]: ["png"], WNIDS[1]: [], WNIDS[2]: ["jpg"]})
    ds = ImageNet(root).dataset("val", tiny_vit(1000))
    assert [y for _, y in ds.samples] == [0, 2]  # labels stay the wnids' ImageNet indices
    assert said(warnings_seen, "1 of the 3 class folders", f"{WNIDS[1]}/")


def test_cifar10_skips_a_corrupt_image(tmp_path, warnings_seen):
    from compress.data.cifar10 import read_images

    root = image_folder(tmp_path / "c", {"cat": ["png", "random", "jpg"], "dog": ["jpg"]}, split="test")
    items = read_images(root)
    assert [name for name, _, _ in items] == ["test/cat/0.JPEG", "test/cat/2.JPEG", "test/dog/0.JPEG"]
    assert said(warnings_seen, "skipped 1 unreadable image", "test/cat/1.JPEG")
