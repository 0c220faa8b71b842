"""Layer-wise lr decay and weight-decay exemptions for models with a Vim backbone.

The authors' segmentation code matched parameter names against "blocks", which never occurs in
Vim, so their layer decay was a no-op. Here the depth comes from the backbone's own
``get_layer_depth`` (embeddings 0, block i -> i + 1, final norm and everything outside the
backbone on top), and the scale is ``layer_decay_rate ** (num_layers - 1 - depth)``.
No weight decay for 1-D parameters (norms, biases) and for ``no_weight_decay()`` of the backbone
(pos_embed, cls_token, A_log, A_b_log, D, D_b).
"""
from __future__ import annotations

from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor

from .registry import register_everywhere


def find_layer_depth_owner(model):
    """The module providing ``get_layer_depth`` and the name prefix of its parameters."""
    backbone = getattr(model, 'backbone', None)
    if backbone is not None and hasattr(backbone, 'get_layer_depth'):
        return backbone, 'backbone.'
    if hasattr(model, 'get_layer_depth'):
        return model, ''
    return None, ''


def _flat_depth(name, prefix=''):
    return 0, 1


class VimLayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """``paramwise_cfg=dict(layer_decay_rate=0.9)``; rate 1.0 keeps only the wd exemptions."""

    def add_params(self, params, module, **kwargs):
        rate = self.paramwise_cfg.get('layer_decay_rate', 1.0)
        unknown = set(self.paramwise_cfg) - {'layer_decay_rate'}
        if unknown:
            raise ValueError(f'Unknown paramwise_cfg keys {sorted(unknown)} for '
                             'VimLayerDecayOptimWrapperConstructor (accepts layer_decay_rate).')
        owner, prefix = find_layer_depth_owner(module)
        if owner is None:
            if rate != 1.0:
                raise TypeError(f'{type(module).__name__} has no backbone with get_layer_depth(); '
                                'layer_decay_rate != 1 needs one (VisionMamba has it).')
            owner = getattr(module, 'backbone', module)
            prefix = 'backbone.' if owner is not module else ''
        get_depth = getattr(owner, 'get_layer_depth', _flat_depth)
        if hasattr(owner, 'no_weight_decay'):
            exempt = owner.no_weight_decay()
        else:  # e.g. a ViT baseline: exempt its embeddings like timm does
            exempt = {n for n, _ in owner.named_parameters()
                      if n.split('.')[-1] in ('pos_embed', 'cls_token')}
        no_decay = {prefix + name for name in exempt}
        groups = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            depth, num = get_depth(name, prefix)
            scale = rate ** (num - 1 - depth)
            decay = param.ndim > 1 and name not in no_decay
            key = (depth, decay)
            if key not in groups:
                groups[key] = dict(params=[], names=[], lr=self.base_lr * scale, lr_scale=scale,
                                   weight_decay=(self.base_wd or 0.0) if decay else 0.0, layer_depth=depth)
            groups[key]['params'].append(param)
            groups[key]['names'].append(name)
        lines = []
        for (depth, decay), group in sorted(groups.items()):
            lines.append(f'  depth {depth:2d} lr x{group["lr_scale"]:.4f} wd {group["weight_decay"]:g}'
                         f' {len(group["params"]):4d} tensors, e.g. {group["names"][0]}')
            params.append({k: v for k, v in group.items() if k != 'names'})
        print_log(f'Vim layer decay {rate}: {len(groups)} parameter groups\n' + '\n'.join(lines),
                  logger='current')


register_everywhere('OPTIM_WRAPPER_CONSTRUCTORS', VimLayerDecayOptimWrapperConstructor)
