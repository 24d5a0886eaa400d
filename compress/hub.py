"""The Hugging Face Hub: ``compress.load("hf-hub:org/name")`` and ``compress export --push-to-hub org/name``.

A Hub repository of a pruned model is an export folder (``model.safetensors``, ``compress.json``,
``recipe.yaml``) plus a model card (``README.md``: the recipe, the dense-vs-pruned table, the trade-off plot
``tradeoff.png``) and, when asked, the ONNX file. Loading downloads the repository's snapshot with the real
``huggingface_hub`` client (its cache, ``HF_HUB_OFFLINE`` and tokens apply as everywhere) and loads it
like a local export. ``hf-hub:org/name@revision`` pins a branch, tag or commit, as timm's names do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from compress import files
from compress.errors import CompressError

PREFIX = "hf-hub:"
CARD_FILES = ("README.md", "tradeoff.png")  # what a Hub folder holds beside the export files


def is_hub_name(path: Union[str, Path]) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def parse(name: str) -> Tuple[str, Optional[str]]:
    """``hf-hub:org/name[@revision]`` -> (repo id, revision or None)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo = name[len(PREFIX):] if name.startswith(PREFIX) else name
    repo, _, revision = repo.partition("@")
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise CompressError(f"{name}: not a Hub repository id ({' '.join(str(e).split())})") from None
    if repo.count("/") != 1:
        raise CompressError(f"{name}: expected {PREFIX}<org>/<name>")
    return repo, revision or None


def resolve(name: str, cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """The local folder of the Hub repository ``name`` (downloaded into the Hub cache, or found there offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo, revision = parse(name)
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir, library_name="compress"))
    except RevisionNotFoundError:
        raise CompressError(f"{name}: the repository has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise CompressError(f"{name}: no such repository on the Hub (or it is private: log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise CompressError(f"{name}: not in the local Hub cache and the Hub cannot be reached "
                            "(offline, or HF_HUB_OFFLINE=1)") from None
    except (HfHubHTTPError, OSError) as e:
        raise CompressError(f"{name}: download failed ({' '.join(str(e).split())[:200]})") from None


# ---- the model card -------------------------------------------------------------------------------


def card_text(manifest: Dict[str, Any], recipe_yaml: Optional[str], repo_id: str, plot: Optional[str]) -> str:
    """The model card (``README.md``): Hub metadata, how to load it, the dense-vs-pruned table, the recipe."""
    from huggingface_hub import ModelCard, ModelCardData

    from compress.tables import summary_table
    from compress.tasks.base import Task

    task = Task.for_manifest(manifest)
    base = manifest["model"]["name"]
    pruners = [entry["spec"]["name"] for entry in manifest.get("pruners", [])]
    data = ModelCardData(
        library_name="compress", license="apache-2.0",
        tags=["compress", "pruning", *pruners, *(["timm"] if manifest["model"].get("builder", "timm") == "timm" else [])],
        pipeline_tag={"classification": "image-classification", "segmentation": "image-segmentation",
                      "diffusion": "text-to-image"}.get(manifest.get("task", "classification")),
        model_name=repo_id.split("/")[-1],
    )
    metrics = manifest.get("metrics") or {}
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"`{base}` pruned with {', '.join(pruners) or 'no pruner'} by "
             "[compress](https://github.com/) (physically smaller / fewer tokens; loads with torch + timm and compress).",
             "", "```python", "import compress", f'model = compress.load("{PREFIX}{repo_id}")  # plain nn.Module, eval mode',
             "```", ""]
    if metrics.get("bench") or metrics.get("pruned"):
        lines += ["## Dense vs pruned", "", summary_table(metrics, task.columns), ""]
    if plot:
        lines += [f"![trade-off]({plot})", ""]
    if recipe_yaml:
        lines += ["## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    card = ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(lines))
    return str(card)


def write_card(folder: Union[str, Path], repo_id: str) -> Path:
    """Write ``README.md`` (and ``tradeoff.png`` where there are figures to plot) into the export ``folder``."""
    from compress.manifest import read_manifest

    folder = Path(folder)
    manifest = read_manifest(folder)
    recipe = folder / "recipe.yaml"
    plot = None
    try:
        from compress.plots import tradeoff_png
    except ImportError:  # the plot needs matplotlib; the card is complete without it
        tradeoff_png = None
    if tradeoff_png is not None and manifest.get("metrics"):
        from compress.tasks.base import Task

        task = Task.for_manifest(manifest)
        label = next((title for key, title, _ in task.columns if key == task.primary), None)
        if tradeoff_png(manifest["metrics"], folder / "tradeoff.png", title=repo_id.split("/")[-1],
                        metric=task.primary or None, metric_label=label) is not None:
            plot = "tradeoff.png"
    files.write_text(folder / "README.md", card_text(manifest, recipe.read_text() if recipe.is_file() else None,
                                                       repo_id, plot))
    return folder / "README.md"


def push(folder: Union[str, Path], repo_id: str, private: bool = False, token: Optional[str] = None) -> str:
    """Create ``repo_id`` if needed and upload the export ``folder`` (with its card) as one commit; the URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    from compress.manifest import read_manifest

    parse(repo_id)
    manifest = read_manifest(folder)
    write_card(folder, repo_id)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                 commit_message=f"compress export of {manifest['model']['name']}")
    except LocalTokenNotFoundError:
        raise CompressError(f"--push-to-hub {repo_id}: not logged in to the Hub (run `hf auth login` or set HF_TOKEN)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CompressError(f"--push-to-hub {repo_id}: upload failed ({' '.join(str(e).split())[:200]})") from None
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"

