"""mmpretrain ImageClassifier that also reads the authors' Vim checkpoints as they are.

Their files keep the whole model under 'model' with plain names (``layers.0...``, ``head.weight``);
ours prefix the backbone with ``backbone.`` and name the linear head ``head.fc``. Translating on
load lets ``mmpretrain.apis.get_model(cfg, pretrained=their.pth)`` and ``tools/test.py cfg their.pth``
work without a conversion step.
"""
from __future__ import annotations

import importlib.util

from ..models.checkpoint import WEIGHT_KEYS

AUTHOR_HEAD = {'head.weight': 'head.fc.weight', 'head.bias': 'head.fc.bias'}


def authors_to_classifier(state_dict: dict) -> bool:
    """Rewrite ``state_dict`` in place from the authors' layout; False if it is not theirs."""
    inner = next((state_dict[k] for k in WEIGHT_KEYS if isinstance(state_dict.get(k), dict)), None)
    weights = inner if inner is not None else state_dict
    if 'layers.0.mixer.in_proj.weight' not in weights or any(k.startswith('backbone.') for k in weights):
        return False
    weights = dict(weights)
    state_dict.clear()
    for key, value in weights.items():
        state_dict[AUTHOR_HEAD.get(key, 'backbone.' + key)] = value
    return True


if importlib.util.find_spec('mmpretrain') is not None:
    from mmpretrain.models import ImageClassifier
    from mmpretrain.registry import MODELS

    @MODELS.register_module(force=True)
    class VimImageClassifier(ImageClassifier):
        """ImageClassifier (backbone -> head) accepting the authors' checkpoint layout."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._register_load_state_dict_pre_hook(self._from_authors)

        @staticmethod
        def _from_authors(state_dict, prefix, *args):
            if not prefix:
                authors_to_classifier(state_dict)
