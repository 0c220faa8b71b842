"""Vision Mamba (Vim, Zhu et al. 2024): a plain, bidirectional state-space vision backbone.

Patch embedding -> learned absolute position embedding (class token, if any, in the MIDDLE of
the sequence) -> ``num_layers`` blocks of ``stream + drop_path(mixer(RMSNorm(stream)))`` with the
residual stream kept in float32 -> final RMSNorm. Parameter names follow the authors' release,
so their checkpoints load key for key. Imports nothing but torch.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp

from ..layers import (DropPath, PatchEmbed, RMSNorm, VisionRotaryEmbedding, insert_middle,
                      resize_pos_grid, split_middle, to_2tuple)
from ...ops.norm import add_rms_norm
from ..cuda_graph import GraphCache
from ..mixer import BiMambaMixer

# Presets as data (Table 1 of the paper; "demo" is a CPU-sized model for the built-in demos).
ARCH_SETTINGS = {
    'tiny': dict(embed_dims=192, num_layers=24, d_state=16),
    'small': dict(embed_dims=384, num_layers=24, d_state=16),
    'base': dict(embed_dims=768, num_layers=24, d_state=16),
    'demo': dict(embed_dims=64, num_layers=4, d_state=8),
}
ARCH_ALIASES = {'t': 'tiny', 'ti': 'tiny', 's': 'small', 'b': 'base'}
OUT_TYPES = ('featmap', 'cls_token', 'raw')
NO_WEIGHT_DECAY = ('pos_embed', 'cls_token', 'A_log', 'A_b_log', 'D', 'D_b')


class VimBlock(nn.Module):
    """``stream + drop_path(mixer(norm(stream)))``, with the add moved into the next norm.

    A block receives the previous block's mixer output ``x`` and its stochastic-depth
    ``scale`` next to the ``residual`` stream they belong to, adds and normalises them in one
    pass (``add_rms_norm``), and returns its own ``(out, stream, scale)``. The stream stays
    float32 (float64 models: float64).
    """

    def __init__(self, embed_dims, mixer_cfg: dict, drop_path: float = 0.):
        super().__init__()
        self.norm = RMSNorm(embed_dims, eps=1e-5)
        self.mixer = BiMambaMixer(embed_dims, **mixer_cfg)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, residual=None, scale=None, rope=None, fused: bool = True,
                checkpoint: bool = False):
        """``checkpoint``: keep only the inputs and recompute the rest in backward. The random
        stochastic-depth draw stays outside the recomputed part, so recomputing needs no saved
        RNG state (which cannot be read while a CUDA graph records: ``cuda_graph`` with
        ``with_cp``)."""
        if checkpoint:
            out, residual = cp.checkpoint(self._mix, x, residual, scale, rope, fused,
                                          use_reentrant=False, preserve_rng_state=False)
        else:
            out, residual = self._mix(x, residual, scale, rope, fused)
        return out, residual, self.drop_path.row_scale(out)

    def _mix(self, x, residual, scale, rope, fused):
        hidden, residual = add_rms_norm(x, residual, self.norm.weight, self.norm.eps, scale, fused,
                                        None if rope is not None else _linear_dtype(x))
        if rope is not None:
            hidden = VisionRotaryEmbedding.rotate(hidden, *rope)
        return self.mixer(hidden), residual


def _autocast_16bit(kind: str):
    """Autocast's dtype on this device type where it is on and 16-bit, else None."""
    if not torch.is_autocast_enabled(kind):
        return None
    dtype = torch.get_autocast_dtype(kind)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def _linear_dtype(x: torch.Tensor):
    """The 16-bit dtype autocast would cast a float32 ``x`` to for in_proj (None: x stays as
    it is). The first block's input is the float32 stream: its norm then writes that dtype
    directly instead of float32 that in_proj's autocast copies."""
    return _autocast_16bit(x.device.type) if x.dtype == torch.float32 else None


def add_branch(residual, x, scale=None):
    """The stream after a block: ``residual + scale * x`` in the stream's dtype."""
    x = x.to(residual.dtype)
    return residual + (x if scale is None else x * scale.to(x.dtype)[..., None])


class VisionMamba(nn.Module):
    """Vim backbone for classification (``with_cls_token``) and dense prediction.

    Args:
        arch: 'tiny' | 'small' | 'base' | 'demo' or a dict with ``embed_dims``, ``num_layers``
            and optionally ``d_state``, ``expand``, ``d_conv``, ``dt_rank``.
        img_size: size the position embedding is learned for; any other input size is served
            by resizing it on the fly (non-square and odd sizes included).
        patch_size, stride: patch kernel and stride (stride 8: the long-sequence models).
        out_indices: blocks whose output is returned (negative counts from the end).
        out_type: 'featmap' -> (B, C, h, w) per index; 'cls_token' -> (B, C) (the middle class
            token after the final norm, needs ``with_cls_token``); 'raw' -> (B, L, C).
        final_norm: apply the final RMSNorm to the output of the last block.
        with_cp: activation checkpointing of every block (saves memory at high resolution).
        use_rope: 2-D rotary embedding of the mixer inputs (off in the released models).
        backend: None/'auto', 'cuda' or 'torch' (see ``vim_mm.ops.backend``).
        cuda_graph: replay CUDA graphs, one per input shape, instead of launching every kernel
            from Python (the launches, not the GPU, set Vim's speed at test-time batch sizes
            and in training steps; ``vim_mm.models.cuda_graph``): inference (eval mode, no
            gradients) replays a graph of the forward; training (train mode, gradients) a
            graph of the forward and one of the backward (one forward per backward). CUDA
            inputs only. At most ``cuda_graph`` shapes when an int (True: 4), counting both
            kinds; later new shapes run eagerly. Inference replays read the mixers' cached
            inference weights, kept current by :meth:`_sync_inference_weights` (parameter
            updates that bypass version counters, ``p.data.copy_(...)``: :meth:`eval` or
            :meth:`refresh_inference_weights`).
        init_cfg: None or ``dict(type='Pretrained', checkpoint=PATH, prefix=None)``.
    """

    def __init__(self, arch='tiny', img_size=224, patch_size=16, stride=16, in_channels=3,
                 out_indices=-1, out_type='featmap', with_cls_token=False, final_norm=True,
                 drop_rate=0., drop_path_rate=0., with_cp=False, use_rope=False,
                 backend=None, cuda_graph=False, init_cfg=None):
        super().__init__()
        self.arch_settings = self._parse_arch(arch)
        self.embed_dims = self.arch_settings['embed_dims']
        self.num_layers = self.arch_settings['num_layers']
        if out_type not in OUT_TYPES:
            raise ValueError(f'out_type must be one of {OUT_TYPES}, got {out_type!r}')
        if out_type == 'cls_token' and not with_cls_token:
            raise ValueError("out_type='cls_token' needs with_cls_token=True")
        self.out_type, self.with_cls_token, self.final_norm = out_type, with_cls_token, final_norm
        self.out_indices = self._parse_out_indices(out_indices)
        self.with_cp, self.backend, self.init_cfg = with_cp, backend, init_cfg
        self.cuda_graph = cuda_graph
        self._graphs = GraphCache()
        self._check_init_cfg(init_cfg)
        self.is_init = False

        self.img_size = to_2tuple(img_size)
        self.patch_embed = PatchEmbed(patch_size, stride, in_channels, self.embed_dims)
        self.grid_size = self.patch_embed.grid_size(self.img_size)
        num_tokens = self.grid_size[0] * self.grid_size[1] + int(with_cls_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dims)) if with_cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, self.embed_dims))
        self.pos_drop = nn.Dropout(drop_rate)
        self.rope = VisionRotaryEmbedding(self.embed_dims, self.grid_size) if use_rope else None

        mixer_cfg = {k: v for k, v in self.arch_settings.items()
                     if k not in ('embed_dims', 'num_layers')}
        mixer_cfg['backend'] = backend
        rates = torch.linspace(0, drop_path_rate, self.num_layers).tolist()
        self.layers = nn.ModuleList(VimBlock(self.embed_dims, mixer_cfg, rate) for rate in rates)
        self.norm_f = RMSNorm(self.embed_dims, eps=1e-5)
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(self._adapt_state_dict)

    # ----------------------------------------------------------------------------- set-up
    @staticmethod
    def _parse_arch(arch) -> dict:
        if isinstance(arch, str):
            name = ARCH_ALIASES.get(arch.lower(), arch.lower())
            if name not in ARCH_SETTINGS:
                raise ValueError(f'Unknown Vim arch {arch!r}; presets: {sorted(ARCH_SETTINGS)} '
                                 '(or a dict with embed_dims and num_layers).')
            return dict(ARCH_SETTINGS[name])
        if not isinstance(arch, Mapping) or not {'embed_dims', 'num_layers'} <= set(arch):
            raise ValueError(f'A custom Vim arch must be a dict with embed_dims and num_layers, got {arch!r}')
        allowed = {'embed_dims', 'num_layers', 'd_state', 'expand', 'd_conv', 'dt_rank'}
        if set(arch) - allowed:
            raise ValueError(f'Unknown Vim arch keys {sorted(set(arch) - allowed)}; allowed: {sorted(allowed)}')
        return dict(arch)

    def _parse_out_indices(self, out_indices) -> tuple[int, ...]:
        indices = [out_indices] if isinstance(out_indices, int) else list(out_indices)
        parsed = []
        for index in indices:
            if not -self.num_layers <= index < self.num_layers:
                raise ValueError(f'out_indices {out_indices} out of range for {self.num_layers} layers')
            parsed.append(index % self.num_layers)
        if not parsed:
            raise ValueError('out_indices must name at least one layer')
        return tuple(parsed)

    @staticmethod
    def _check_init_cfg(init_cfg):
        if init_cfg is None:
            return
        cfgs = [init_cfg] if isinstance(init_cfg, Mapping) else list(init_cfg)
        for cfg in cfgs:
            if cfg.get('type') != 'Pretrained':
                raise ValueError(f"VisionMamba initialises itself; init_cfg accepts only "
                                 f"dict(type='Pretrained', checkpoint=PATH, prefix=None), got {dict(cfg)}")
            unknown = set(cfg) - {'type', 'checkpoint', 'prefix', 'map_location'}
            if unknown or 'checkpoint' not in cfg:
                raise ValueError(f'Bad Pretrained init_cfg {dict(cfg)}: needs checkpoint=PATH, '
                                 f'accepts prefix and map_location, unknown keys {sorted(unknown)}')

    @torch.no_grad()
    def reset_parameters(self):
        """The authors' initialisation (timm/Mamba conventions)."""
        nn.init.trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=.02)
        proj = self.patch_embed.proj
        fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        nn.init.trunc_normal_(proj.weight, std=math.sqrt(1. / fan_in) / .87962566103423978)
        nn.init.zeros_(proj.bias)
        for layer in self.layers:
            mixer = layer.mixer
            for module in mixer.modules():
                if isinstance(module, (nn.Linear, nn.Conv1d)):
                    module.reset_parameters()
            mixer.reset_parameters()
            nn.init.kaiming_uniform_(mixer.out_proj.weight, a=math.sqrt(5))
            mixer.out_proj.weight.div_(math.sqrt(self.num_layers))
            nn.init.ones_(layer.norm.weight)
        nn.init.ones_(self.norm_f.weight)

    def init_weights(self):
        """Load ``init_cfg``'s checkpoint, if any. Idempotent; weights were set in __init__."""
        if self.init_cfg is not None:
            from ..checkpoint import load_pretrained
            cfgs = [self.init_cfg] if isinstance(self.init_cfg, Mapping) else self.init_cfg
            for cfg in cfgs:
                load_pretrained(self, cfg['checkpoint'], prefix=cfg.get('prefix'),
                                map_location=cfg.get('map_location', 'cpu'))
        self.is_init = True

    def _adapt_state_dict(self, state_dict, prefix, *args):
        """Any ``load_state_dict`` accepts Vim weights of another grid, kernel or head layout."""
        from ..checkpoint import convert_vim_state_dict
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not own:
            return
        converted, _ = convert_vim_state_dict(own, self)
        for key in own:
            del state_dict[prefix + key]
        state_dict.update({prefix + k: v for k, v in converted.items()})

    # ----------------------------------------------------------------------------- helpers
    @property
    def active_backend(self) -> str:
        """The mixer implementation that runs for this model's current device and grad mode."""
        from ...ops import resolve_backend
        return resolve_backend(self.backend, self.pos_embed.device.type,
                               torch.is_grad_enabled())

    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters()
                if name.split('.')[-1] in NO_WEIGHT_DECAY}

    def get_layer_depth(self, param_name: str, prefix: str = '') -> tuple[int, int]:
        """(layer id, number of layer ids) for layer-wise lr decay, as mmpretrain's ViT.

        Embeddings are layer 0, block i is layer i + 1, the final norm and anything outside
        the backbone (neck, head) the last layer.
        """
        num = self.num_layers + 2
        if not param_name.startswith(prefix):
            return num - 1, num
        name = param_name[len(prefix):]
        if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed'):
            return 0, num
        if name.startswith('layers.'):
            return int(name.split('.')[1]) + 1, num
        return num - 1, num

    def position_embedding(self, grid) -> torch.Tensor:
        """Position embedding for a token grid of any size (class slot kept in the middle)."""
        pos = self.pos_embed
        if tuple(grid) == self.grid_size:
            return pos
        if self.with_cls_token:
            grid_part, cls_slot = split_middle(pos)
            return insert_middle(resize_pos_grid(grid_part, self.grid_size, grid), cls_slot)
        return resize_pos_grid(pos, self.grid_size, grid)

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor):
        mode = self._graph_mode(x)
        max_graphs = 4 if self.cuda_graph is True else int(self.cuda_graph)
        if mode == 'infer':
            from ...ops import graphed_inference
            # auto may take the path with more launches (a shape past max_graphs, run
            # eagerly inside this context, takes it too: slower to launch, same result)
            inputs = self._graph_inputs()
            synced = self._sync_inference_weights(inputs)
            self._graphs.recorded = None
            with graphed_inference():
                out = self._graphs(self._forward, x, inputs, max_graphs)
            if self._cache_generations() != synced[1]:  # a cache re-allocated in the call
                self._keep_graphs_recorded_now(synced[0])
            return out
        if mode == 'train':  # never reads the weight caches (BiMambaMixer.forward_triton)
            return self._graphs.train(self, self._forward, x, max_graphs)
        return self._forward(x)

    def _graph_mode(self, x: torch.Tensor) -> str | None:
        """'infer' (eval mode, no gradients), 'train' (train mode, gradients) or None (eager):
        CUDA graphs only on CUDA, outside another graph's capture."""
        if not (self.cuda_graph and self._graph_device(x)):
            return None
        grad = torch.is_grad_enabled()
        if not self.training and not grad:
            return 'infer'
        if self.training and grad:
            return 'train'
        return None

    @staticmethod
    def _graph_device(x: torch.Tensor) -> bool:
        return x.is_cuda and not torch.cuda.is_current_stream_capturing()

    def _graph_inputs(self):
        return [*self.parameters(), *self.buffers()]

    def _mixers(self) -> list:
        return [layer.mixer for layer in self.layers]

    def _cache_generations(self) -> list:
        return [m._weight_cache.generation for m in self._mixers()]

    def _sync_inference_weights(self, tensors) -> tuple:
        """Before an inference graph dispatch: the mixers' cached inference weights
        (``BiMambaMixer._inference_weights``), which the graphs read by address, made current.

        A replay runs no Python, so a graph recorded before an in-place update of the
        parameters (an optimizer step, ``load_state_dict``, ``p.add_()`` under no_grad; e.g.
        inference graphs recorded at the first validation of a training run, replayed at the
        later ones) would read what the caches held then. Where the sum of the ``tensors``'
        version counters (the parameters and buffers: ``_graph_inputs``) changed since the last
        dispatch, every mixer refreshes its cache in place (the graphs' addresses stay valid);
        where a mixer had to re-allocate its cache instead (its parameters moved: ``.to()``,
        ``.half()``), or one did since (an eager forward after a move: its ``generation``),
        every inference graph is dropped and recorded again, never left reading freed tensors
        (training graphs never read the caches: ``BiMambaMixer.forward_triton`` uses them only
        with grad mode off). Moves of the parameters themselves drop every graph in
        :class:`GraphCache`. The sum is exact for in-place updates (versions only grow); a
        changed set of tensors is a move. Writes through ``p.data`` bump no version counter:
        :meth:`eval` and :meth:`refresh_inference_weights` re-derive regardless.

        Cost when nothing changed (the common case: every replay of a test run): one version
        sum (22 us) and the 24 mixers' cache generations (16 us), 39 us of CPU time per replay
        for Vim-Ti and Vim-S alike (412 tensors each; ``timeit``, 5000 calls, on the
        development machine's Xeon CPU), next to ~440 us for ``_graph_inputs`` itself. After a
        change, once: ~430 us to check all 24 mixers' caches (Vim-Ti and Vim-S), plus the
        refills of those whose parameters changed (~10 small kernels per mixer and cached
        dtype). Returns (versions, generations) as synced.
        """
        try:
            versions = sum(t._version for t in tensors)
        except RuntimeError:  # inference tensors (made under inference_mode): no versions
            versions = sum(0 if t.is_inference() else t._version for t in tensors)
        synced, generations = self._graphs.synced, self._cache_generations()
        if synced == (versions, generations):
            return synced
        moved = [m.refresh_inference_weights() for m in self._mixers()]  # every one, in place
        if any(moved) or (synced is not None and generations != synced[1]):
            self._graphs.clear(training=False)  # (no inference graph before the first sync)
        synced = self._graphs.synced = (versions, self._cache_generations())
        return synced

    def _keep_graphs_recorded_now(self, versions):
        """A mixer's cache was re-allocated during a dispatch (recording after its parameters
        moved): the graph recorded in it reads the new tensors; any other one is dropped."""
        self._graphs.clear(keep=self._graphs.recorded, training=False)
        self._graphs.synced = (versions, self._cache_generations())

    def refresh_inference_weights(self):
        """Re-derive every mixer's cached inference weights from the parameters as they are
        now, in place, whatever their version counters say: for writes that bypass them
        (``p.data.copy_(...)``: mmengine's EMAHook swaps the averaged weights in so before
        validation and test, then the loop calls ``model.eval()``, which calls this). Graphs
        keep reading valid tensors; where a cache had to be re-allocated they are dropped."""
        if any([m.refresh_inference_weights(force=True) for m in self._mixers()]):
            self._graphs.clear(training=False)

    def train(self, mode: bool = True):
        """``eval()`` (``mode=False``) also runs :meth:`refresh_inference_weights`: weights
        written through ``.data`` before it (an EMA swap) reach eager inference and the
        recorded inference graphs alike."""
        super().train(mode)
        if not mode:
            self.refresh_inference_weights()
        return self

    def _embed(self, x: torch.Tensor):
        """(the stream before the first layer, the token grid): patch tokens, the class token
        inserted, plus the position embedding; float32 even under autocast (float64 models stay
        float64). At inference on the Triton path under a 16-bit autocast, patches and position
        are one kernel (:func:`~vim_mm.ops.triton_patch_embed.patch_embed_with_position`)."""
        dtype = self._fused_embedding_dtype(x)
        if dtype is not None:
            from ...ops.triton_patch_embed import patch_embed_with_position
            grid, proj = self.patch_embed.check(x), self.patch_embed.proj
            return patch_embed_with_position(x, proj.weight, proj.bias,
                                             self.position_embedding(grid),
                                             self.patch_embed.patch_size[0], dtype,
                                             cls_token=self.cls_token), grid
        tokens, grid = self.patch_embed(x)
        if self.with_cls_token:
            tokens = insert_middle(tokens, self.cls_token.expand(tokens.shape[0], -1, -1))
        stream_dtype = torch.promote_types(self.pos_embed.dtype, torch.float32)
        return self.pos_drop(tokens + self.position_embedding(grid)).to(stream_dtype), grid

    def _fused_embedding_dtype(self, x: torch.Tensor):
        """Autocast's dtype where :meth:`_embed` runs one kernel: the Triton path (CUDA, or
        Triton's interpreter) in inference (grad mode off) under a bf16/fp16 autocast, square
        non-overlapping patches, a float32 position embedding, an image batch and its tokens
        within the kernel's 32-bit offsets; else None."""
        from ...ops.triton_patch_embed import offsets_fit
        kind, patch = x.device.type, self.patch_embed
        if (torch.is_grad_enabled() or self.active_backend != 'triton'
                or patch.patch_size != patch.stride or len(set(patch.patch_size)) != 1
                or x.dim() != 4 or not offsets_fit(x, patch.patch_size[0], self.embed_dims)
                or (self.training and self.pos_drop.p > 0)
                or self.pos_embed.dtype != torch.float32):
            return None
        return _autocast_16bit(kind)

    def _forward(self, x: torch.Tensor):
        stream, grid = self._embed(x)
        rope = None
        if self.rope is not None:
            cos, sin = self.rope.cos_sin(grid, x.device)
            if self.with_cls_token:  # the class token is not rotated
                cos = insert_middle(cos[None], cos.new_ones(1, 1, cos.shape[-1]))[0]
                sin = insert_middle(sin[None], sin.new_zeros(1, 1, sin.shape[-1]))[0]
            rope = (cos, sin)

        outs = []
        last = self.num_layers - 1
        fused = self.active_backend != 'torch'  # the PyTorch path stays PyTorch end to end
        x, residual, scale = stream, None, None
        checkpoint = self.with_cp and self.training and torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            x, residual, scale = layer(x, residual, scale, rope, fused, checkpoint)
            if index in self.out_indices:
                norm = index == last and self.final_norm
                if self._fused_featmap(residual, x, scale):
                    from ...ops.triton_featmap import add_norm_to_featmap
                    outs.append(add_norm_to_featmap(residual, x, self.norm_f.weight if norm
                                                    else None, self.norm_f.eps, grid,
                                                    cls_token=self.with_cls_token))
                    continue
                stream = add_branch(residual, x, scale)
                feat = self.norm_f(stream) if norm else stream
                outs.append(self._format_output(feat, grid))
        return tuple(outs)

    def _fused_featmap(self, residual: torch.Tensor, x: torch.Tensor, scale) -> bool:
        """Whether an output's residual add, final norm and transpose run as one kernel
        (:func:`~vim_mm.ops.triton_featmap.add_norm_to_featmap`): feature maps (a class token
        left out of them as :meth:`_format_output` does), on the Triton path (CUDA, or Triton's
        interpreter) in inference (grad mode off, no stochastic-depth scale), a float32 stream
        within the kernel's 32-bit offsets."""
        if (self.out_type != 'featmap' or torch.is_grad_enabled() or scale is not None
                or residual.dtype != torch.float32 or self.active_backend != 'triton'):
            return False
        from ...ops.triton_featmap import offsets_fit
        return offsets_fit(residual, x)

    def _format_output(self, feat, grid):
        if self.out_type == 'raw':
            return feat
        if self.out_type == 'cls_token':
            return feat[:, (feat.shape[1] - 1) // 2]
        if self.with_cls_token:
            mid = (feat.shape[1] - 1) // 2
            feat = torch.cat([feat[:, :mid], feat[:, mid + 1:]], dim=1)
        return feat.transpose(1, 2).reshape(feat.shape[0], -1, *grid).contiguous()
