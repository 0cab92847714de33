"""Models: the Llama family, Qwen3, Phi-3 and Gemma 2/3 in plain PyTorch, their configs, loaders
and tokenizers."""
