"""Stage-I: a generator (or a pool of inverted images) learns to emit pseudo images from a frozen teacher
(METHOD.md §Stage-I: the objective is :class:`derd.losses.StageOneLoss`)."""
