"""Multi-process runs without GPUs (gloo), which mmengine 0.10.7's launcher cannot start.

Its ``pytorch`` launcher calls ``torch.cuda.set_device`` unconditionally and it hands DDP
``device_ids=[LOCAL_RANK]``, which DDP rejects for CPU modules. On a machine without CUDA we
initialise the process group ourselves (mmengine then skips its own init) and wrap the model
with a DDP that keeps ``device_ids=None``.
"""
import datetime

import torch
import torch.distributed as dist
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS


@MODEL_WRAPPERS.register_module(force=True)
class MMCPUDistributedDataParallel(MMDistributedDataParallel):
    """MMDistributedDataParallel for CPU modules (mmengine always passes device_ids)."""

    def __init__(self, module, device_ids=None, **kwargs):
        super().__init__(module=module, device_ids=None, **kwargs)


def prepare_cpu_distributed(cfg) -> bool:
    """For ``--launcher pytorch`` without CUDA: gloo process group + CPU DDP wrapper."""
    if cfg.get('launcher', 'none') != 'pytorch' or torch.cuda.is_available():
        return False
    if not dist.is_initialized():
        timeout = cfg.get('env_cfg', {}).get('dist_cfg', {}).get('timeout')
        kwargs = {} if timeout is None else dict(timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group(backend='gloo', **kwargs)
    wrapper = dict(cfg.get('model_wrapper_cfg') or {})
    wrapper.setdefault('type', 'MMCPUDistributedDataParallel')
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper
    return True
