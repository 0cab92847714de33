"""Weight quantization: formats, round-to-nearest, GPTQ and AWQ, checkpoints, evaluation."""
