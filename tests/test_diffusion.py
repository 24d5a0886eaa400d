"""The diffusion task: tiny UNets with the real MiniLM text encoder, pipeline folders, prompt data."""
import pytest
import torch

from compress.errors import CompressError

from diffusion_zoo import TINY, caption_folder, need_diffusion, tiny_model


@pytest.fixture(scope="module")
def model():
    need_diffusion()
    return tiny_model()


def test_prompts_are_encoded_by_minilm(model):
    cond, pooled = model.encode_prompts(["a photo of a cat", "a photo of a kitten", "a photo of a ship"])
    assert cond.shape == (3, 16, 384) and pooled.shape == (3, 384)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.2  # cat is nearer kitten than ship


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_decreases_on_a_fixed_batch(prediction):
    from compress.tasks.diffusion import DiffusionModule, weighted_mse

    need_diffusion()
    m = tiny_model(prediction_type=prediction, min_snr_gamma=5.0)
    module = DiffusionModule(m, stage=None)
    torch.manual_seed(1)
    batch = (torch.rand(8, 3, 16, 16) * 2 - 1, ["a red square", "a blue circle"] * 4, torch.zeros(8))
    b = module.noisy_batch(batch)
    assert b.weight.max() <= 1.0 + 1e-6 and b.weight.min() > 0  # min-SNR weights
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    losses = []
    for _ in range(12):
        loss = weighted_mse(m(b.noisy, b.t, b.cond), b.target, b.weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_generate_gives_images_and_guidance_changes_them(model):
    a = model.generate(["a photo of a cat"] * 2, steps=3, guidance=1.0, seed=0)
    b = model.generate(["a photo of a cat"] * 2, steps=3, guidance=4.0, seed=0)
    assert a.shape == (2, 3, 16, 16) and 0 <= a.min() and a.max() <= 1
    assert not torch.allclose(a, b)


def _pipeline_folder(root, with_unet=True):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, BertConfig, BertModel

    from compress.models.diffusion import minilm_path

    torch.manual_seed(0)
    text = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64))
    text.save_pretrained(root / "text_encoder")
    AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(root / "tokenizer")
    DDIMScheduler(prediction_type="v_prediction").save_pretrained(root / "scheduler")
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                  sample_size=16).save_pretrained(root / "vae")
    unet = UNet2DConditionModel(**{**TINY, "sample_size": 8, "in_channels": 4, "out_channels": 4,
                                   "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8})
    if with_unet:
        unet.save_pretrained(root / "unet")
    return unet


def test_pipeline_folder_loads_unet_scheduler_text_encoder_and_vae(tmp_path):
    from compress.models import build_model
    from compress.recipe import ModelConfig

    need_diffusion()
    unet = _pipeline_folder(tmp_path)
    cfg = ModelConfig(name="sd_pipeline", checkpoint=tmp_path, kwargs={"max_tokens": 8})
    m = build_model(cfg)
    assert cfg.kwargs["pipeline"] == str(tmp_path)  # recorded so an export can rebuild the helpers
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), m.unet.state_dict().values()))
    assert m.prediction_type == "v_prediction" and m.vae is not None and m.image_size == 16
    assert m.latent_shape() == (4, 8, 8)
    assert m.generate(["a cat"], steps=2).shape == (1, 3, 16, 16)
    small = build_model(ModelConfig(name="sd_pipeline", checkpoint=tmp_path, kwargs={"max_tokens": 8, "image_size": 8}))
    assert small.latent_shape() == (4, 4, 4) and small.generate(["a cat"], steps=1).shape == (1, 3, 8, 8)


def test_pipeline_folder_without_unet_is_one_line_error(tmp_path):
    from compress.models import build_model
    from compress.recipe import ModelConfig

    need_diffusion()
    _pipeline_folder(tmp_path, with_unet=False)
    with pytest.raises(CompressError, match=r"model.checkpoint: .* is not a diffusers pipeline folder: it has no unet/"):
        build_model(ModelConfig(name="sd_pipeline", checkpoint=tmp_path))


def test_caption_folder_pairs_and_cfg_dropout(tmp_path, model):
    from compress.data.prompts import Prompts, PromptsParams

    need_diffusion()
    caption_folder(tmp_path)
    src = Prompts(tmp_path, PromptsParams(cfg_dropout=1.0))
    x, prompt, label = src.dataset("val", model)[1]
    assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1 and prompt == "a blue circle" and label == -1
    assert src.dataset("train", model, train=True)[0][1] == ""  # dropped caption


def test_caption_file_naming_a_missing_image_is_one_line_error(tmp_path, model):
    from compress.data.prompts import Prompts

    caption_folder(tmp_path, missing=True)
    with pytest.raises(CompressError, match=r"metadata.jsonl:7: image not found: .*gone.png"):
        Prompts(tmp_path).dataset("train", model)


def test_cifar10_class_prompts(require_asset, model):
    from compress.data.prompts import Prompts, PromptsParams

    tar = require_asset("cifar10-test/cifar10_test_jpg.tar")
    ds = Prompts(tar, PromptsParams(source="cifar10", val_per_class=20)).dataset("val", model)
    assert len(ds) == 200  # classes interleaved, so the first N prompts of an evaluation cover them all
    assert ds.prompts[:3] == ["a photo of an airplane", "a photo of an automobile", "a photo of a bird"]


def test_ema_is_lightnings_weight_averaging_checkpointed_and_copied_in(tmp_path):
    """``ema_decay``: the stage ends with the EMA of the weights after each optimizer step, and a checkpoint
    written mid-stage holds the averaging state (so a resume keeps it)."""
    import lightning.pytorch as pl

    from compress.recipe import StageConfig
    from compress.tasks.diffusion import DiffusionModule

    need_diffusion()
    decay = 0.5
    m = tiny_model(ema_decay=decay)
    stage = StageConfig(kind="finetune", max_steps=3, optimizer={"name": "adamw", "lr": 1e-2})
    module = DiffusionModule(m, stage)
    seen = []

    class Record(pl.Callback):  # the raw weights after every optimizer step
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({k: v.detach().clone() for k, v in m.unet.named_parameters()})

    torch.manual_seed(0)
    batch = (torch.rand(4, 3, 16, 16) * 2 - 1, ["a red square", "a blue circle"] * 2, torch.zeros(4))
    data = torch.utils.data.DataLoader([batch] * 3, batch_size=None)
    trainer = pl.Trainer(max_steps=3, callbacks=[Record()], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu")
    trainer.fit(module, train_dataloaders=data)
    name = "conv_in.weight"
    expected = seen[0][name]
    for step in seen[1:]:
        expected = decay * expected + (1 - decay) * step[name]
    final = dict(m.unet.named_parameters())[name]
    assert not torch.allclose(seen[-1][name], expected, atol=1e-6)  # the EMA is not just the last weights
    torch.testing.assert_close(final.detach(), expected)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    assert int(ckpt["averaging_state"]["n_averaged"]) == 3 and "current_model_state" in ckpt
