"""The bidirectional Mamba mixer of Vim ("bimamba v2"), with its fast and reference paths.

``in_proj`` gives x and z; the forward branch scans the sequence left to right, the backward
branch scans the same x and z reversed with its own conv1d/x_proj/dt_proj/A/D, and
``out_proj`` reads the average of the two gated outputs (``if_divide_out=True`` in the release).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import bimamba_inner_cuda, linear_channel_first, mamba_inner_torch, resolve_backend
from .weight_cache import InferenceWeights, WeightCache


class BiMambaMixer(nn.Module):

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank='auto', dt_min=1e-3, dt_max=1e-1, dt_init_floor=1e-4,
                 backend: str | None = None):
        super().__init__()
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == 'auto' else dt_rank
        self.backend = backend
        self.dt_init = (dt_min, dt_max, dt_init_floor)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        for suffix in ('', '_b'):
            self.add_module('conv1d' + suffix, nn.Conv1d(self.d_inner, self.d_inner, d_conv,
                                                         groups=self.d_inner, padding=d_conv - 1))
            self.add_module('x_proj' + suffix,
                            nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            self.add_module('dt_proj' + suffix, nn.Linear(self.dt_rank, self.d_inner, bias=True))
            self.register_parameter('A' + suffix + '_log' if suffix else 'A_log',
                                    nn.Parameter(torch.empty(self.d_inner, d_state)))
            self.register_parameter('D' + suffix, nn.Parameter(torch.empty(self.d_inner)))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self._weight_cache = WeightCache()  # a plain attribute: not in the state dict
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Mamba's init: S4D-real A, D = 1, dt log-uniform in [dt_min, dt_max] via the bias."""
        dt_min, dt_max, floor = self.dt_init
        std = self.dt_rank ** -0.5
        for suffix in ('', '_b'):
            dt_proj = getattr(self, 'dt_proj' + suffix)
            nn.init.uniform_(dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                           + math.log(dt_min)).clamp(min=floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
            getattr(self, 'A_b_log' if suffix else 'A_log').copy_(torch.log(A))
            getattr(self, 'D' + suffix).fill_(1.)

    def direction_params(self, suffix: str) -> dict:
        return dict(conv_w=getattr(self, 'conv1d' + suffix).weight,
                    conv_b=getattr(self, 'conv1d' + suffix).bias,
                    x_proj_w=getattr(self, 'x_proj' + suffix).weight,
                    dt_proj_w=getattr(self, 'dt_proj' + suffix).weight,
                    dt_bias=getattr(self, 'dt_proj' + suffix).bias,
                    A=-torch.exp(self.A_b_log if suffix else self.A_log),
                    D=getattr(self, 'D' + suffix))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, d_model) -> (B, L, d_model)."""
        needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad
                                                  or self.in_proj.weight.requires_grad)
        backend = resolve_backend(self.backend, hidden_states.device.type, needs_grad)
        if backend == 'triton':
            return self.forward_triton(hidden_states)
        fwd, bwd = self.direction_params(''), self.direction_params('_b')
        xz = linear_channel_first(self.in_proj.weight, hidden_states.transpose(1, 2))  # (B, 2E, L)
        if backend == 'cuda':
            return bimamba_inner_cuda(xz, fwd, bwd, self.out_proj.weight, self.out_proj.bias)
        return self.forward_torch(xz, fwd, bwd)

    def forward_torch(self, xz, fwd, bwd):
        x, z = xz.chunk(2, dim=1)
        y = mamba_inner_torch(x, z, *fwd.values())
        y_b = mamba_inner_torch(x.flip(-1), z.flip(-1), *bwd.values()).flip(-1)
        return F.linear(((y + y_b) / 2).transpose(1, 2), self.out_proj.weight, self.out_proj.bias)

    def forward_triton(self, hidden_states):
        """Token-major (batch, L, channels) throughout, no flips and no transposes.

        The backward branch's causal conv on the reversed sequence is an anti-causal conv with
        mirrored taps (one Triton kernel makes both directions when no gradient is needed; the
        PyTorch twin otherwise), and the scans run that branch right to left. The fused Triton
        scan takes ``x_proj``'s rows reordered to [B, C, dt] and padded to a multiple of 16 so
        that every token's B and C are aligned vectors; the CUDA C++ inference scan (no
        gradients, 16-bit activations: ``vim_mm/ops/cuda_scan.py``) reads x_proj's output as
        it is (rows padded to 16 bytes, for the GEMM) and applies dt_proj itself. Where no
        gradient is needed, the weights that branch derives come from
        :meth:`_inference_weights` (cached) where grad mode is off: never in a training step
        (grad mode on, also where a frozen block needs no gradient), so training CUDA graphs
        never read the cache and re-derive from the parameters they read in place."""
        from ..ops.triton_conv import bidirectional_conv, bidirectional_conv_torch
        from ..ops.triton_scan import bidirectional_selective_scan
        N, R = self.d_state, self.dt_rank
        dtype = self._compute_dtype(hidden_states)
        grads = torch.is_grad_enabled() and any(
            t.requires_grad for t in (hidden_states, *self.parameters()))
        cached = (None if torch.is_grad_enabled()  # grads implies grad mode
                  else self._inference_weights(hidden_states.device, dtype))
        in_proj = self.in_proj.weight if cached is None else cached.in_proj
        xz = F.linear(hidden_states, in_proj)  # (B, L, 2E)
        x, z = xz.chunk(2, dim=-1)
        conv_params = (self.conv1d.weight, self.conv1d.bias, self.conv1d_b.weight,
                       self.conv1d_b.bias)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *conv_params))
        inference = not grads or not any(  # nothing the scan reads needs a grad
            t.requires_grad for t in (x, *(p for name, p in self.named_parameters()
                                           if not name.startswith(('in_proj.', 'out_proj.')))))
        if inference and self._use_cuda_scan(x, z):  # (u will have x's shape and dtype)
            from ..ops.cuda_scan import bidirectional_scan_infer
            w = self._derive_weights(dtype) if cached is None else cached  # grads: out_proj's
            us, x2 = self._conv_xproj(x, conv_params, w)
            # [dt | B | C]: x_proj's rows are padded to 16 bytes (cuBLAS's fast GEMMs need it)
            x_dbls = [d[..., :R + 2 * N] for d in x2]
            y = bidirectional_scan_infer(us[0], x_dbls[0], us[1], x_dbls[1], z, w.fwd, w.bwd)
            # y = [y_fwd, y_bwd] (gated, halved): out_proj over [W, W] adds the directions
            return F.linear(y, w.out_proj, self.out_proj.bias)
        conv = bidirectional_conv_torch if needs_grad else bidirectional_conv
        us = conv(x, *conv_params)
        fwd, bwd = self.direction_params(''), self.direction_params('_b')
        pad = -(2 * N + R) % 16
        args = []
        for u, p in zip(us, (fwd, bwd)):
            w = p['x_proj_w']
            w = torch.cat([w[R:], w[:R], w.new_zeros(pad, w.shape[1])])
            x_dbl = F.linear(u, w)  # (B, L, [B | C | dt | pad])
            delta = F.linear(x_dbl[..., 2 * N:2 * N + R], p['dt_proj_w'])  # (B, L, E)
            args += [u.transpose(1, 2), delta.transpose(1, 2), p['A'],
                     x_dbl[..., :N].transpose(1, 2), x_dbl[..., N:2 * N].transpose(1, 2),
                     p['D'].float(), p['dt_bias'].float()]
        y = bidirectional_selective_scan(*args, z.transpose(1, 2))  # (B, E, L), token-major
        return F.linear(y.transpose(1, 2), self.out_proj.weight, self.out_proj.bias)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype ``F.linear(x, in_proj.weight)`` computes in: autocast's where it is on
        (autocast leaves float64 alone), else x's."""
        kind = x.device.type
        if torch.is_autocast_enabled(kind) and self.in_proj.weight.dtype != torch.float64:
            return torch.get_autocast_dtype(kind)
        return x.dtype

    def _derive_weights(self, dtype: torch.dtype) -> InferenceWeights:
        """The C++-scan branch's weights, from the parameters as they are now (differentiable
        where they need gradients). The casts are the casts autocast would make, the pad the
        pad, so ``F.linear`` gives bit-identical outputs with these as with the parameters."""
        from ..ops.cuda_conv_xproj import stack_conv_weights
        from ..ops.cuda_scan import _direction, kernel_weights
        width = self.dt_rank + 2 * self.d_state
        dirs = self.direction_params(''), self.direction_params('_b')
        scan = [dict(zip(('dt_proj_w', 'dt_bias', 'A', 'D'), _direction(p)))  # as the scan takes
                for p in dirs]
        for p in scan:  # and the forms the kernel computes with
            p.update(kernel_weights(p))
        return InferenceWeights(
            in_proj=self.in_proj.weight.to(dtype),
            x_proj=torch.stack([F.pad(p['x_proj_w'], (0, 0, 0, -width % 8)).to(dtype)
                                for p in dirs]),
            out_proj=self.out_proj.weight.repeat(1, 2).to(dtype), fwd=scan[0], bwd=scan[1],
            **dict(zip(('conv_taps', 'conv_bias'), stack_conv_weights(
                self.conv1d.weight, self.conv1d.bias, self.conv1d_b.weight, self.conv1d_b.bias))))

    def _inference_weights(self, device: torch.device, dtype: torch.dtype,
                           force: bool = False) -> InferenceWeights:
        """:meth:`_derive_weights` without gradients, cached per (device, compute dtype) while
        the parameters keep their storages (``data_ptr``) and versions (``_version``: in-place
        updates, an optimizer step, ``load_state_dict``).

        Why: re-deriving them launches ~10 tiny kernels per layer and call (the exps of A_log,
        x_proj's pads, autocast's casts of in_proj, x_proj and the repeated out_proj, the scan's
        fp32 copies); ~0.9 ms of a 20 ms step at 1024 px batch 16 on an H200, replayed in CUDA
        graphs. A change of versions alone refreshes the tensors in place: a recorded graph
        reads them by address (new ones would leave it reading freed memory). A graph replay
        runs no Python, so it sees in-place parameter updates only after a forward or
        :meth:`refresh_inference_weights` has refreshed the cache (``VisionMamba`` does before
        every inference replay). Writes through ``p.data`` (mmengine's EMA swaps weights so)
        leave ``_version`` alone: the cache sees them only when ``force`` re-derives anyway."""
        params = list(self.parameters())
        if any(p.is_inference() for p in params):  # no version counters: derived uncached
            with torch.no_grad():
                return self._derive_weights(dtype)
        cache = self._weight_cache
        if [p.data_ptr() for p in params] != [s.data_ptr() for s in cache.sources]:
            cache.drop()  # moved or re-allocated (.to(), .half(), ...): derive anew
            cache.sources = [p.detach() for p in params]
        versions, key = [p._version for p in params], (torch.device(device), dtype)
        old, weights = cache.entries.get(key, (None, None))
        if force or versions != old:
            with torch.inference_mode(False), torch.no_grad():  # normal tensors: refreshable
                fresh = self._derive_weights(dtype)
                fresh.in_proj = fresh.in_proj.detach()  # .to() in its own dtype: the parameter
                if weights is None:
                    weights = fresh
                else:  # in place: a recorded CUDA graph reads these tensors by address
                    for mine, new in zip(weights.tensors(), fresh.tensors()):
                        if mine.data_ptr() != new.data_ptr():  # else both alias a parameter
                            mine.copy_(new)
            cache.entries[key] = versions, weights
        return weights

    def refresh_inference_weights(self, force: bool = False) -> bool:
        """Bring every cached :meth:`_inference_weights` up to date with the parameters (in
        place where they kept their storages): a recorded CUDA graph reads the cache, not the
        parameters, so call this before replaying one after the parameters changed in place.
        ``force``: re-derive even where the versions did not change (writes through
        ``p.data``). Returns whether the cache was re-allocated instead (the parameters moved):
        graphs recorded with the old tensors must then be dropped."""
        cache = self._weight_cache
        generation = cache.generation
        for device, dtype in list(cache.entries):
            self._inference_weights(device, dtype, force)
        return cache.generation != generation

    def _conv_xproj(self, x, conv_params, w: InferenceWeights):
        """The C++-scan branch's u (2, B, L, E) and x_proj outputs (2, B, L, padded rows): the
        fused CUDA C++ kernel (``vim_mm/ops/cuda_conv_xproj.py``; H200, 16 x 4097 tokens: 68
        us) where it applies and $VIM_MM_CONV_XPROJ is not 'pair'; else the Triton conv (no
        gradient here), then both x_proj as one batched GEMM (83 us together; 38.5-39.6 us for
        the GEMM against 43.3 for two F.linear)."""
        from ..ops.cuda_conv_xproj import conv_xproj, conv_xproj_applies, conv_xproj_choice
        from ..ops.triton_conv import bidirectional_conv
        if conv_xproj_choice() == 'fused' and not conv_xproj_applies(x, w.conv_taps, w.x_proj):
            return conv_xproj(x, w.conv_taps, w.conv_bias, w.x_proj)
        us = bidirectional_conv(x, *conv_params)
        return us, torch.bmm(us.flatten(1, 2), w.x_proj.transpose(1, 2)).unflatten(
            1, us.shape[1:3])

    def _use_cuda_scan(self, u, z) -> bool:
        """Whether inference takes the CUDA C++ scan (faster than the Triton scan on every
        shape timed, ``vim_mm/ops/cuda_scan.py``): by default wherever it applies;
        ``VIM_MM_INFER_SCAN=triton`` never, ``=cuda`` always (an error where it cannot)."""
        from ..ops.cuda_scan import cuda_scan_applies, infer_scan_choice
        choice = infer_scan_choice()
        if choice == 'triton':
            return False
        why_not = cuda_scan_applies(u, z, self.d_state, self.dt_rank)
        if why_not and choice == 'auto':
            return False
        if why_not:
            raise RuntimeError(f'VIM_MM_INFER_SCAN=cuda: the CUDA C++ inference scan {why_not}; '
                               'unset it (the scan is then chosen per input) or set it to triton.')
        return True
