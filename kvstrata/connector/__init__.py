"""The vLLM KV connector plug-in (scheduler side and worker side). vLLM is imported only in here."""
