"""The label that marks a position with nothing to train.

``labels[t]`` is the token to predict at position ``t``, or ``IGNORE_INDEX`` where nothing is trained
(prompt tokens, padding, the last token of each document). ``prepare`` writes it, the model's loss
and scoring skip it, the trainer counts the others. It lives here, beside ``errors.py``, because
data and model both read it and neither may import the other. ``ds_sft.kernels`` imports nothing
of ours outside itself: their ``ignore_index`` argument defaults to the same value (PyTorch's own
default), and the model passes this one explicitly.
"""

IGNORE_INDEX = -100
