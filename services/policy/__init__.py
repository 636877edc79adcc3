"""The policy MLLM: generation logic (`runner`) and its Triton python-backend model repository."""
