"""Other engines run on the same model and workload as ours: transformers and llama.cpp."""
