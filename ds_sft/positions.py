"""How many positions a model has: the length of its RoPE table, the longest row it can attend over.

Trainers name it differently (:data:`POSITION_FIELDS`, in the order ds-sft reads them), and weights
whose config names none get :data:`DEFAULT_POSITIONS`. The model layer builds its table from these
(``model.checkpoint``'s config aliases, ``ModelConfig``'s default) and ``prepare --base_model`` reads
them from a model's files to refuse a ``--seq_len`` the model cannot take
(:func:`ds_sft.data.model_match.model_positions`). It lives here, beside ``vocab.py``, because data
and model both use it and neither may import the other.
"""

POSITION_FIELDS = ("max_seq_len", "block_size", "max_position_embeddings", "seq_len")
DEFAULT_POSITIONS = 2048
