"""Hugging Face interoperability of the mllama family: checkpoint import and export, and the full
logits of a checkpoint on Hugging Face processor inputs (tools/convert_hf_checkpoint.py and
tools/mllama_forward.py are their command lines; the name and layout mapping is
``lvx_megatron/models/hf_mapping.py``)."""
