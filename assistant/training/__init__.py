"""Training: align a composition's vision encoder with its decoder on LLaVA-format data, LLaVA's two stages.

- ``assistant train align``: encoder and decoder frozen, only the projector trains, on captions;
- ``assistant train finetune``: the projector and a LoRA adapter of the decoder train, on
  question–answer conversations (QLoRA on an nf4 base when asked).

Modules: :mod:`~assistant.training.examples` (LLaVA example → token ids, labels, image
slots, in serving's prompt layout), :mod:`~assistant.training.features` (the on-disk
encoder-feature cache), :mod:`~assistant.training.trainable` (what each stage trains, and
the loss), :mod:`~assistant.training.checkpoints` (save, resume), and
:mod:`~assistant.training.trainer` (the run).
"""
