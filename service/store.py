"""GLOWING_MODEL_TAG: the served models from BentoML's model store instead of a directory.

    python -m export --artifacts artifacts      # registers glowing-models:<content hash>
    GLOWING_MODEL_TAG=glowing-models:latest bentoml serve
    GLOWING_MODEL_TAG=glowing-models:latest bentoml build    # packs that version into the Bento

A registered model is laid out as an artifacts directory (manifest.json + onnx/, see
export/register.py), so resolving a tag is replacing ``settings.artifacts`` with the model's
path: everything downstream (preflight, loading, /info) is the directory path unchanged.
Inside a Bento, BentoML points the store at the Bento's own models, so ``:latest`` there is
the one version the Bento was built with.
"""

from __future__ import annotations

from pathlib import Path

from service.loading import StartupError
from service.settings import Settings


def declared(settings: Settings):
    """The ``bentoml.models.BentoModel`` that `bentoml build` packs (a service class attribute), or None."""
    if not settings.model_tag:
        return None
    import bentoml

    return bentoml.models.BentoModel(settings.model_tag)


def resolve(settings: Settings) -> Settings:
    """``settings`` with ``artifacts`` at the tagged model's files; unchanged without GLOWING_MODEL_TAG."""
    if not settings.model_tag:
        return settings
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        model = bentoml.models.get(settings.model_tag)
    except BentoMLException as err:  # NotFound, or an invalid tag
        raise StartupError(f"GLOWING_MODEL_TAG={settings.model_tag}: not in BentoML's model store ({err}); "
                           "`python -m export` registers an export (`bentoml models list glowing-models` "
                           "lists the versions), or unset it to serve GLOWING_ARTIFACTS") from None
    return settings.model_copy(update={"artifacts": Path(model.path), "model_tag": str(model.tag)})
