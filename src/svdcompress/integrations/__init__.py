"""Integrations built on the core: Hugging Face models (``hf``), ONNX export (``export``) and
the latency benchmark (``bench``). Each registers what it adds (architectures, layer kinds)
with the core; optional dependencies are imported when used, with the pip command if missing."""
