"""A float64, token-by-token implementation of Vim's Algorithm 1, written from the paper.

Deliberately naive (Python loops over tokens, explicit flips) and independent of vim_mm: it
reads a state dict in the authors' parameter naming and is the ground truth the tests compare
the vectorised model against.
"""
import math

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def ssm_scan(u, delta, A, B, C, D):
    """u, delta: (L, E); A: (E, N); B, C: (L, N) -> y (L, E), one token at a time."""
    h = torch.zeros_like(A)
    ys = []
    for t in range(u.shape[0]):
        h = torch.exp(delta[t][:, None] * A) * h + (delta[t] * u[t])[:, None] * B[t][None, :]
        ys.append(h @ C[t] + D * u[t])
    return torch.stack(ys)


def mixer_branch(x, z, p, s, dt_rank, d_state):
    """One direction for one sample: x, z (L, E)."""
    weight, bias = p[f'conv1d{s}.weight'][:, 0], p[f'conv1d{s}.bias']  # (E, K)
    K = weight.shape[1]
    xp = torch.cat([x.new_zeros(K - 1, x.shape[1]), x])
    conv = torch.stack([(xp[t:t + K] * weight.t()).sum(0) for t in range(x.shape[0])]) + bias
    u = F.silu(conv)
    dbl = u @ p[f'x_proj{s}.weight'].t()
    dt, B, C = dbl[:, :dt_rank], dbl[:, dt_rank:dt_rank + d_state], dbl[:, dt_rank + d_state:]
    delta = F.softplus(dt @ p[f'dt_proj{s}.weight'].t() + p[f'dt_proj{s}.bias'])
    A = -torch.exp(p['A_log' if s == '' else 'A_b_log'])
    y = ssm_scan(u, delta, A, B, C, p[f'D{s}'])
    return y * F.silu(z)


def mixer(h, p):
    """h: (L, D) one sample -> (L, D)."""
    E = p['out_proj.weight'].shape[1]
    d_state = p['A_log'].shape[1]
    dt_rank = p['dt_proj.weight'].shape[1]
    xz = h @ p['in_proj.weight'].t()
    x, z = xz[:, :E], xz[:, E:]
    y_f = mixer_branch(x, z, p, '', dt_rank, d_state)
    y_b = mixer_branch(x.flip(0), z.flip(0), p, '_b', dt_rank, d_state).flip(0)
    return ((y_f + y_b) / 2) @ p['out_proj.weight'].t()


def vim_forward(sd, image, with_cls_token=True, stride=16, out_layers=None):
    """Algorithm 1 for one image (C, H, W) in float64.

    Returns the middle class token after norm_f (classification) or, with
    ``with_cls_token=False``, the (L, D) tokens after norm_f (``out_layers=None``) or the
    residual streams after the listed layers.
    """
    sd = {k: v.double() for k, v in sd.items()}
    w = sd['patch_embed.proj.weight']
    tokens = F.conv2d(image.double()[None], w, sd['patch_embed.proj.bias'], stride=stride)
    tokens = tokens[0].flatten(1).t()  # (M, D), row-major grid
    M = tokens.shape[0]
    pos = sd['pos_embed'][0]
    if with_cls_token:
        mid = M // 2
        tokens = torch.cat([tokens[:mid], sd['cls_token'][0], tokens[mid:]])
    tokens = tokens + pos
    depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('layers.'))
    stream, outs = tokens, []
    for i in range(depth):
        p = {k[len(f'layers.{i}.mixer.'):]: v for k, v in sd.items()
             if k.startswith(f'layers.{i}.mixer.')}
        stream = stream + mixer(rms_norm(stream, sd[f'layers.{i}.norm.weight']), p)
        if out_layers is not None and i in out_layers:
            outs.append(stream)
    final = rms_norm(stream, sd['norm_f.weight'])
    if with_cls_token:
        cls = final[M // 2]
        if 'head.weight' in sd:
            return cls @ sd['head.weight'].t() + sd['head.bias']
        return cls
    if out_layers is not None:
        outs[-1] = final if depth - 1 in out_layers else outs[-1]
        return outs
    return final


def authors_state_dict(embed_dims=32, depth=2, d_state=4, grid=3, num_classes=10, seed=0,
                       with_cls_token=True, patch=16, in_chans=3):
    """Random weights with the authors' key names and shapes (class slot in the middle)."""
    g = torch.Generator().manual_seed(seed)
    E, D = 2 * embed_dims, embed_dims
    dt_rank = math.ceil(D / 16)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {'patch_embed.proj.weight': rnd(D, in_chans, patch, patch, scale=0.05),
          'patch_embed.proj.bias': rnd(D),
          'pos_embed': rnd(1, grid * grid + int(with_cls_token), D),
          'norm_f.weight': 1 + rnd(D, scale=0.1)}
    if with_cls_token:
        sd['cls_token'] = rnd(1, 1, D)
    for i in range(depth):
        pre = f'layers.{i}.'
        sd[pre + 'norm.weight'] = 1 + rnd(D, scale=0.1)
        sd[pre + 'mixer.in_proj.weight'] = rnd(2 * E, D)
        sd[pre + 'mixer.out_proj.weight'] = rnd(D, E)
        for s in ('', '_b'):
            sd[pre + f'mixer.conv1d{s}.weight'] = rnd(E, 1, 4)
            sd[pre + f'mixer.conv1d{s}.bias'] = rnd(E)
            sd[pre + f'mixer.x_proj{s}.weight'] = rnd(dt_rank + 2 * d_state, E)
            sd[pre + f'mixer.dt_proj{s}.weight'] = rnd(E, dt_rank)
            sd[pre + f'mixer.dt_proj{s}.bias'] = rnd(E) - 2
            sd[pre + ('mixer.A_log' if s == '' else 'mixer.A_b_log')] = torch.log(
                torch.arange(1, d_state + 1.).repeat(E, 1)) + rnd(E, d_state, scale=0.1)
            sd[pre + f'mixer.D{s}'] = 1 + rnd(E, scale=0.1)
    if num_classes:
        sd['head.weight'] = rnd(num_classes, D)
        sd['head.bias'] = rnd(num_classes)
    return sd


def save_authors_checkpoint(path, sd):
    """torch.save the way the authors' training script does (with a pickled Namespace)."""
    import argparse
    torch.save({'model': sd, 'optimizer': {}, 'lr_scheduler': {}, 'epoch': 299,
                'model_ema': {k: v.clone() for k, v in sd.items()}, 'scaler': {},
                'args': argparse.Namespace(model='vim_tiny_patch16_224', lr=1e-3)}, path)
