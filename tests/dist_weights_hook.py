"""Test helper: every rank saves its parameters after training (imported via custom_imports).

Buffers are left out: BN running statistics are per rank (broadcast_buffers=False), as in
every mmengine DDP run."""
import os

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module(force=True)
class DumpRankWeightsHook(Hook):

    def after_train(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        torch.save({k: v.detach().cpu() for k, v in model.named_parameters()},
                   os.path.join(runner.work_dir, f'rank{get_rank()}_weights.pth'))
