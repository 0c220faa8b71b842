"""Load the authors' Vim checkpoints (and our own) into any VisionMamba configuration.

Handles every difference between a checkpoint and the model it feeds: the weights' location in
the file ('state_dict', 'model', 'model_ema' or plain), a key prefix ('backbone.' of full-model
checkpoints, 'module.' of DDP), the classification head and RoPE buffers, the class-token slot in
the MIDDLE of ``pos_embed`` (taken out for dense models, put back for classifiers), the position
grid size and the patch-embedding kernel. Anything that cannot load is reported, and a file that
loads nothing is an error: a model never silently stays at random init.
"""
from __future__ import annotations

import logging
import math
import os
import pickle

import torch
import torch.nn.functional as F

from .layers import insert_middle, resize_pos_grid, split_middle

logger = logging.getLogger('vim_mm')
WEIGHT_KEYS = ('state_dict', 'model', 'model_ema', 'module')


def read_checkpoint(path, map_location='cpu') -> dict:
    """``torch.load`` with explanatory errors.

    Tries ``weights_only=True`` first; the authors' files also pickle their argparse namespace,
    which only loads with ``weights_only=False`` (only for files you trust).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'Vim checkpoint not found: {path!r}. Download the authors\' weights '
            '(e.g. vim_t_midclstok_76p1acc.pth) and point init_cfg.checkpoint at the file.')
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        logger.info('vim_mm: %s pickles Python objects besides tensors; loading it with '
                    'weights_only=False', path)
    except Exception as exc:
        raise RuntimeError(f'Cannot read Vim checkpoint {path!r}: {exc}. Is it a file written '
                           'by torch.save (and not truncated)?') from exc
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise RuntimeError(f'Cannot read Vim checkpoint {path!r}: {exc}') from exc


def extract_state_dict(checkpoint, prefix: str | None = None, model_keys=()) -> dict:
    """The parameter dict inside ``checkpoint``, with ``prefix`` removed.

    With ``prefix=None``, 'module.' is dropped and 'backbone.' is dropped when the keys carry it
    and ``model_keys`` (the target's names) do not.
    """
    state = checkpoint
    for key in WEIGHT_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint)
        raise ValueError(f'No weights found in the checkpoint (top-level keys: {found}); expected '
                         f"tensors under one of {WEIGHT_KEYS} or at the top level.")
    state = {k[len('module.'):] if k.startswith('module.') else k: v
             for k, v in state.items() if torch.is_tensor(v)}
    if prefix is None and not (set(state) & set(model_keys)) and any(
            k.startswith('backbone.') for k in state):
        prefix = 'backbone.'
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f'No key of the checkpoint starts with prefix {prefix!r}.')
    return state


def _square_grid(n: int):
    side = math.isqrt(n)
    return (side, side) if side * side == n else None


def _split_pos_embed(pos: torch.Tensor):
    """(grid tokens, class slot or None, grid size) of a checkpoint's pos_embed."""
    n = pos.shape[1]
    if _square_grid(n):
        return pos, None, _square_grid(n)
    if _square_grid(n - 1):
        grid, cls_slot = split_middle(pos)
        return grid, cls_slot, _square_grid(n - 1)
    raise ValueError(f'Cannot infer the position grid of a pos_embed with {n} tokens (neither '
                     f'{n} nor {n - 1} is a square); convert it with the model it was trained with.')


def convert_vim_state_dict(state: dict, model) -> tuple[dict, list[str]]:
    """Adapt a Vim state dict to ``model`` (a VisionMamba); returns (state, notes)."""
    notes = []
    state = dict(state)
    own = model.state_dict()
    for name in [k for k in state if k.startswith('head.') or k.startswith('rope.')]:
        if name not in own:
            state.pop(name)
            notes.append(f'dropped {name} (unused by this model)')

    if 'pos_embed' in state and 'pos_embed' in own and state['pos_embed'].shape != own['pos_embed'].shape:
        grid_part, cls_slot, src_grid = _split_pos_embed(state['pos_embed'])
        pos = resize_pos_grid(grid_part, src_grid, model.grid_size)
        if src_grid != tuple(model.grid_size):
            notes.append(f'resized the position grid {src_grid} -> {tuple(model.grid_size)}')
        if model.with_cls_token:
            if cls_slot is None:
                cls_slot = own['pos_embed'][:, (own['pos_embed'].shape[1] - 1) // 2:][:, :1]
                notes.append('checkpoint has no class-token position; kept the model\'s own')
            pos = insert_middle(pos, cls_slot)
        elif cls_slot is not None:
            notes.append('removed the class-token slot from the middle of pos_embed')
        state['pos_embed'] = pos
    if 'cls_token' in state and 'cls_token' not in own:
        state.pop('cls_token')
        notes.append('dropped cls_token (dense model)')

    key = 'patch_embed.proj.weight'
    if key in state and key in own and state[key].shape != own[key].shape:
        src, dst = state[key], own[key]
        if src.shape[:2] != dst.shape[:2]:
            raise ValueError(f'Checkpoint does not fit this VisionMamba configuration: {key} is '
                             f'{tuple(src.shape)}, the model needs {tuple(dst.shape)} '
                             '(embed_dims or in_channels differ: wrong arch?).')
        resized = F.interpolate(src.float(), size=dst.shape[-2:], mode='bicubic', align_corners=False)
        # keep the response to a constant image: total kernel mass per output channel
        resized = resized * (src.shape[-2] * src.shape[-1]) / (dst.shape[-2] * dst.shape[-1])
        state[key] = resized.to(src.dtype)
        notes.append(f'resized the patch kernel {tuple(src.shape[-2:])} -> {tuple(dst.shape[-2:])}')
    return state, notes


def load_pretrained(model, path, prefix: str | None = None, map_location='cpu') -> dict:
    """Load ``path`` into ``model``; log what was adapted, missing and unexpected.

    Raises when the file is missing or unreadable, when no parameter matches, or when a matching
    name has an incompatible shape.
    """
    checkpoint = read_checkpoint(path, map_location)
    own = model.state_dict()
    state = extract_state_dict(checkpoint, prefix, own.keys())
    state, notes = convert_vim_state_dict(state, model)
    matched = set(state) & set(own)
    if not matched:
        raise ValueError(
            f'Checkpoint {path!r} matches none of VisionMamba\'s {len(own)} parameters '
            f'(its first keys: {sorted(state)[:5]}). For a full-model checkpoint pass '
            "prefix='backbone.' in init_cfg; for another architecture this file is the wrong one.")
    bad = [f'{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}'
           for k in sorted(matched) if state[k].shape != own[k].shape]
    if bad:
        raise ValueError(f'Checkpoint {path!r} does not fit this VisionMamba configuration '
                         f'(arch/d_state differ?):\n  ' + '\n  '.join(bad[:10]))
    result = model.load_state_dict(state, strict=False)
    report = dict(missing=list(result.missing_keys), unexpected=list(result.unexpected_keys),
                  notes=notes, loaded=len(matched))
    logger.info('vim_mm: loaded %d/%d tensors from %s%s', len(matched), len(own), path,
                ''.join(f'\n  - {n}' for n in notes))
    if report['missing']:
        logger.warning('vim_mm: missing in checkpoint (left at init): %s', report['missing'])
    if report['unexpected']:
        logger.warning('vim_mm: unexpected in checkpoint (ignored): %s', report['unexpected'])
    return report
