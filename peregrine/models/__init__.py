"""Models: the Llama family, Qwen3, Phi-3, Gemma 2/3 and the Mixtral / Qwen mixtures of
experts in plain PyTorch, their configs, loaders and tokenizers."""
