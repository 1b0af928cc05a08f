"""Evaluation: validation loss per source, GSM8K accuracy, fixed-prompt generations (``ds-sft eval``)."""
