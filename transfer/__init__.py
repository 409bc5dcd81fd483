"""Shared building blocks of the transfer-learning pipeline.

Each stage in ``stages/`` is a thin command-line entry point; what they share lives here,
one small module per concern:

- ``params`` (reading and validating params.yaml), ``errors`` (one-line messages),
  ``interrupts`` (Ctrl-C and SIGTERM alike), ``atomic`` (writes that never leave half a file);
- ``download`` and ``archive`` (getting the data set in, safely), ``layout`` (what an
  image-folder data set looks like);
- ``images`` (the one decoder, which gives the pixels a viewer shows, and the bounded cache
  of decoded images), ``preprocess`` (the recipe's sizes and normalisation), ``augment``
  (the seeded random crop and flip), ``data`` (data sets, epoch order, loaders);
- ``models`` (backbones and heads), ``checkpoints`` (state_dict files and their sidecars),
  ``features`` (the frozen backbone's stored outputs);
- ``devices``, ``reproducibility`` and ``runtime`` (where and how a stage runs, and its run
  record); ``distributed`` (several processes training as one, through torchrun);
  ``training`` (the tutorial's loop), ``resume`` (the state an interrupted run continues
  from), ``evaluation`` and ``figures``.
"""
