"""Export for llama.cpp and Ollama: a GGUF file that serves what the run trained.

- ``tools``: llama.cpp's own converter (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``)
  and quantizer (``llama_model_quantize`` through llama-cpp-python), at the version lorafit pins.
- ``serving``: what the GGUF and the Ollama ``Modelfile`` must carry so the served prompt is the
  trained one (template, EOS/BOS, stop strings, context length), and the checks that say when not.
- ``export``: the command's pipeline: merge (``lorafit.export.merge``) -> convert -> quantize ->
  Modelfile + README.
"""
