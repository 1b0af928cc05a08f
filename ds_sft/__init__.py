"""ds-sft: supervised fine-tuning of small LLaMA-style models with DeepSpeed.

Data flows one way::

    files -> prepare -> token shards + manifest -> train (DeepSpeed engine) -> checkpoints
          -> eval / export

Package arrows point one way too: ``train`` uses ``data``, ``model`` and ``kernels``; ``eval`` uses
``data`` and ``model``; ``model`` uses ``kernels``; ``kernels`` use nothing of ours.
"""

__version__ = "0.1.0"
