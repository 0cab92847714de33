"""peregrine: a readable, fast LLM inference and serving engine."""

from peregrine.config import EngineConfig
from peregrine.llm import LLM
from peregrine.lora.request import LoRARequest
from peregrine.outputs import CompletionOutput, Logprob, RequestOutput
from peregrine.sampling_params import SamplingParams
from peregrine.structured.grammar import StructuredOutputs

__all__ = ["LLM", "EngineConfig", "SamplingParams", "StructuredOutputs", "RequestOutput",
           "CompletionOutput", "Logprob", "LoRARequest"]
__version__ = "0.1.0"
