"""Plug-ins that let serving engines use this library without glue code of their own.

``gds_kvcache.integrations.vllm``: a vLLM ``OffloadingSpec`` (extra ``[vllm]``).
"""

__all__: list[str] = []
