"""The training cascade of the paper: corpus, tokenizer, FIM transform, data packing, trainer."""
