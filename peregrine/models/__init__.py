"""Models: the Llama family in plain PyTorch, their configs, loaders and tokenizers."""
