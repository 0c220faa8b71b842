"""Make mmengine 0.10.7 load checkpoints under torch >= 2.6.

torch 2.6 switched ``torch.load`` to ``weights_only=True``; mmengine's local loader calls it
without the argument, so resuming (its checkpoints pickle the message hub and config) and loading
the authors' files (they pickle an argparse namespace) fail. We re-register mmengine's loader for
local paths: tensors-only first, then a full unpickle of the (local, user-chosen) file with a log
line saying so.
"""
import os
import pickle

import torch
from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader


@CheckpointLoader.register_scheme(prefixes='', force=True)
def load_from_local(filename, map_location):
    filename = os.path.expanduser(filename)
    if not os.path.isfile(filename):
        raise FileNotFoundError(f'Checkpoint {filename} does not exist; check the path '
                                '(tools/train.py --resume PATH, load_from, init_cfg.checkpoint).')
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        print_log(f'{filename} holds pickled Python objects besides tensors; loading it with '
                  'weights_only=False (load only checkpoints you trust)', logger='current')
        return torch.load(filename, map_location=map_location, weights_only=False)
