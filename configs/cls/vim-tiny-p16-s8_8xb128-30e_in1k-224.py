# Long-sequence fine-tuning of Vim-Ti: patch stride 8 (27 x 27 = 729 tokens at 224), 30 epochs,
# constant lr 1e-5, wd 1e-8, from the 224 / stride-16 model (paper: 76.1 -> 78.3 top-1).
_base_ = ['./vim-tiny-p16_8xb128-300e_in1k-224.py']

checkpoint = 'checkpoints/vim_t_midclstok_76p1acc.pth'  # authors' file or our epoch_*.pth
model = dict(
    # The backbone loader checks the file strictly (an error, not a warning, when it does not
    # fit) and resizes the position grid 14x14 -> 27x27 around the middle class-token slot; it
    # drops 'head.*', which it does not own.
    backbone=dict(stride=8, init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    # Loading the same file into the whole classifier afterwards (mmengine runs a parent's
    # Pretrained init after its children's) brings the trained head along: the authors'
    # head.{weight,bias} are renamed to head.fc.* by VimImageClassifier, and the backbone
    # tensors load again through the same grid resizing. (`load_from` would do the same but
    # trips EMAHook, which expects an mmengine 'state_dict' in the file.)
    init_cfg=dict(type='Pretrained', checkpoint=checkpoint),
)

optim_wrapper = dict(optimizer=dict(lr=1e-5, weight_decay=1e-8))
param_scheduler = []  # constant lr
train_cfg = dict(max_epochs=30)
