"""Pretrained BERT-family encoders from Hugging Face-format folders, without torch.

* ``bert``: the folder read into an effx ``Encoder`` with any attention family swapped
  in (``load``), its tokenizer, its settings as ``config.model`` keys.
* ``embed``: a text file's lines embedded and written (``python -m effx.embed``).
"""

from effx.pretrained.bert import (Pretrained, PretrainedError, Tokenizer, build_config,
                                  default_folder, load, max_seq_length, model_settings)

__all__ = ["Pretrained", "PretrainedError", "Tokenizer", "build_config", "default_folder",
           "load", "max_seq_length", "model_settings"]
