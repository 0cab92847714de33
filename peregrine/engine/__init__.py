"""The engine: sequences, paged KV cache, scheduler, model runner and the step loop."""
